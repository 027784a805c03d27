"""GLM-Image specifics — the only per-model code: loading, prompt layout, prior tokens, glyphs, schedule.

Both policies (``policies.ar`` and ``policies.flow``) work through this adapter; a new generator family is
a new adapter with the same methods. Conventions (GLM-Image release; diffusers ``GlmImagePipeline``):

* AR prompt: ``prompt<sop>th tw<eop><sop>ph pw<eop><bos>`` built by ``GlmImageProcessor``; the model writes
  the preview grid (ph x pw) first, then the full grid (th x tw), one token per 32 px.
* Decoder condition: full-grid tokens upsampled 2x nearest -> ``prior_token_id`` (B, (H/16)(W/16)).
* Glyph condition: ByT5/T5 states of the quoted substrings of the prompt (``""`` when none), left zero-padded.
* Schedule: t = linspace(1000, 1, S+1)[:-1], sigma = t/1000 shifted by mu = sqrt(seq/256)*0.75 + 0.25
  (``time_shift_type="linear"``); x_sigma = (1-sigma) x0 + sigma eps, v = eps - x0; the transformer sees t - 1.
* CFG: v = v_u + g (v_c - v_u); the unconditional branch drops the prior tokens (``prior_token_drop=True``,
  a **bool** tensor) and uses the glyph embedding of ``""``; two calls as in the pipeline, or one doubled batch
  (``decoder.cfg_batch``).
* Editing (``GlmImagePipeline(image=...)``): the source image's VAE latents (``latent_dist.mode()``, normalised)
  and its upsampled VQ prior ids go once through the transformer at timestep 0 with no text, writing every
  layer's keys/values into a ``GlmImageKVCache``; each denoising call's conditional branch then attends to them
  ("read"), the unconditional one does not ("skip").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import torch

from tandem.core.errors import ConfigError
from tandem.policies.base import DTYPES, resolve_device
from tandem.policies.compat import glm_image_grid_shape



@dataclass
class Grids:
    """Token grids of one target size: full grid (th, tw) and preview grid (ph, pw)."""

    th: int
    tw: int
    ph: int
    pw: int

    @property
    def num_preview(self) -> int:
        return self.ph * self.pw

    @property
    def num_full(self) -> int:
        return self.th * self.tw


def load_pipeline(path: str, dtype: str = "float32", device: str = "auto", create_tiny_if_missing: bool = False):
    """``GlmImagePipeline.from_pretrained(path)`` in ``dtype`` on ``device``; clear error if the folder is wrong."""
    from diffusers import GlmImagePipeline

    if create_tiny_if_missing:
        from tandem.policies.tiny import ensure_tiny_glm_image

        ensure_tiny_glm_image(path)
    if not (Path(path) / "model_index.json").is_file():
        raise ConfigError(
            f"model.path: no GLM-Image pipeline at {path} (expected model_index.json and the component folders "
            f"written by GlmImagePipeline.save_pretrained; download the weights to a local folder and point model.path at it)"
        )
    pipe = GlmImagePipeline.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(resolve_device(device))
    for module in (pipe.vision_language_encoder, pipe.transformer, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    # The VAE decodes and encodes one image at a time (diffusers' slicing): one 1024² image already fills a GPU,
    # and the peak stays one image's, so the transformer, not the VAE, bounds a rollout call's size.
    pipe.vae.enable_slicing()
    return pipe


class GlmImageAdapter:
    """Stateless helpers over the components of a loaded ``GlmImagePipeline``."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.processor = pipe.processor
        self.vae_scale = pipe.vae_scale_factor
        self.patch = pipe.transformer.config.patch_size

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    # ------------------------------------------------------------------ AR side
    def grids(self, height: int, width: int) -> Grids:
        th, tw, ph, pw = glm_image_grid_shape(self.processor, height, width)
        return Grids(th, tw, ph, pw)

    def ar_inputs(self, prompts: Sequence[str], height: int, width: int) -> dict:
        """Tokenised prompts in the release layout (left padded): input_ids, attention_mask, image_grid_thw."""
        inputs = self.processor(
            text=list(prompts), target_h=height, target_w=width, padding=True, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in inputs.items()}

    def vq_grid(self, height: int, width: int) -> Tuple[int, int]:
        """(gh, gw): the VQ token grid the image processor makes of a ``height`` x ``width`` image.

        transformers' ``smart_resize`` with the processor's settings: scale the image into its side bounds
        (√min_pixels .. √max_pixels; the release: up to 2048), halve it, round to a multiple of patch·merge; one
        token per patch. Within the bounds that is one token per 32 px (the target grid's rule); a larger image
        is shrunk to the bound."""
        from transformers.models.glm_image.image_processing_glm_image import smart_resize

        ip = self.processor.image_processor
        h, w = smart_resize(height, width, ip.patch_size * ip.merge_size, min_pixels=ip.size["shortest_edge"],
                            max_pixels=ip.size["longest_edge"])
        return h // ip.patch_size, w // ip.patch_size

    def source_size(self, height: int, width: int) -> Tuple[int, int]:
        """(H', W') pixel size of a ``height`` x ``width`` source brought to the processor's bounds: its VQ grid
        (``vq_grid``) times the pixels per VQ token on the DiT side, 2·vae_scale·patch (the prior ids are upsampled
        2x nearest, one per DiT patch). A source of that size has as many DiT patches as upsampled prior ids, and
        the processor keeps its grid as it is (the same grid again)."""
        gh, gw = self.vq_grid(height, width)
        px = 2 * self.vae_scale * self.patch
        return gh * px, gw * px

    def fit_sources(self, images: np.ndarray) -> np.ndarray:
        """Source images (P, H, W, 3) uint8 resized (bicubic) to ``source_size``, or as they are when they fit.

        Both paths of an edit must see the same source: the AR model reads its VQ tokens (the processor would
        shrink a source past its bound on its own) and the DiT its VAE latents with the upsampled VQ ids (which
        only floors the size to 16 px): resized here first, the two lengths agree (``GlmImagePipeline(image=...)``
        fails on a source above the bound for this reason)."""
        from PIL import Image

        h, w = images.shape[1:3]
        size = self.source_size(h, w)
        if size == (h, w):
            return images
        resized = [Image.fromarray(np.asarray(im)).resize(size[::-1], Image.BICUBIC) for im in images]
        return np.stack([np.asarray(im) for im in resized])

    def edit_inputs(self, prompts: Sequence[str], images: np.ndarray, height: int, width: int) -> dict:
        """Processor outputs (left padded) for edit instructions ``prompts`` on source ``images`` (P, H, W, 3) uint8
        (brought to the processor's bounds first: ``fit_sources``), as
        ``GlmImagePipeline.generate_prior_tokens(image=...)`` builds them: the chat template's image item puts
        each source's image tokens before the text. Keys: input_ids, attention_mask (P, L); pixel_values
        (P·n, C·p²) the sources' patches, packed; image_grid_thw (2P, 3) (source grid, target grid) per sample;
        images_per_sample (P,) = 2. The target is the full grid only (no preview grid)."""
        from PIL import Image

        images = self.fit_sources(np.asarray(images))
        messages = [[{"role": "user", "content": [{"type": "image", "image": Image.fromarray(np.asarray(im))},
                                                  {"type": "text", "text": p}]}] for p, im in zip(prompts, images)]
        inputs = self.processor.apply_chat_template(messages, tokenize=True, padding=len(prompts) > 1, target_h=height,
                                                    target_w=width, return_dict=True, return_tensors="pt")
        return dict(inputs.to(self.device))

    @torch.no_grad()
    def edit_tokens(self, prompts: Sequence[str], images: np.ndarray, height: int, width: int, seed: int) -> torch.Tensor:
        """Full-grid ids (P, th*tw) the AR model writes for edit instructions ``prompts`` on source ``images``
        (P, H, W, 3) uint8 (``edit_inputs``); for an edit the model writes the target grid only. Sampled with the
        model's generation config, ``torch.manual_seed(seed)`` as the pipeline does. (The pipeline's own image path
        is not used: in diffusers 0.42.1 it concatenates the vision features that ``get_image_tokens`` expects per
        image.)"""
        inputs = self.edit_inputs(prompts, images, height, width)
        num = self.grids(height, width).num_full
        torch.manual_seed(seed)
        out = self.pipe.vision_language_encoder.generate(**inputs, max_new_tokens=num + 1, do_sample=True)
        return out[:, inputs["input_ids"].shape[1]:][:, :num]

    def check_vq_grid(self, height: int, width: int, grid: Tuple[int, int], what: str) -> None:
        """ConfigError naming ``what`` (the images' use) unless the processor makes the VQ grid ``grid`` = (gh, gw)
        of a ``height`` x ``width`` image (``vq_grid``: an image past its bounds is rescaled)."""
        got = self.vq_grid(height, width)
        if got != tuple(grid):
            ip = self.processor.image_processor
            bounds = f"{round(ip.size['shortest_edge'] ** 0.5)}..{round(ip.size['longest_edge'] ** 0.5)}"
            raise ConfigError(
                f"{what}: the image processor turns {height}x{width} images into a {got[0]}x{got[1]} VQ grid (it "
                f"rescales images into sides of {bounds} px), not the {grid[0]}x{grid[1]} grid needed here; set "
                f"data.height/data.width so that the images fit those bounds"
            )

    def reference_tokens(self, images: np.ndarray, grid: Tuple[int, int], what: str) -> torch.Tensor:
        """VQ tokens of reference images (B, H, W, 3) uint8 -> full-grid ids (B, gh*gw) via ``get_image_tokens``,
        after ``check_vq_grid(H, W, grid, what)``: ``grid`` is the grid the caller needs."""
        from PIL import Image

        self.check_vq_grid(images.shape[1], images.shape[2], grid, what)
        ar = self.pipe.vision_language_encoder
        pil = [Image.fromarray(im) for im in images]
        feats = self.processor.image_processor(images=pil, return_tensors="pt")
        pixel_values = feats["pixel_values"].to(self.device, ar.dtype)
        grid = feats["image_grid_thw"].to(self.device)
        embeds = ar.get_image_features(pixel_values, grid).pooler_output  # one (C, h, w) map per image
        return ar.get_image_tokens(embeds, grid).view(len(images), -1)

    # ------------------------------------------------------------------ decoder side
    @staticmethod
    def upsample_prior(tokens: torch.Tensor, grids: Grids) -> torch.Tensor:
        """(B, th*tw) AR full-grid ids -> (B, 4*th*tw) decoder prior ids (2x nearest)."""
        b = tokens.shape[0]
        up = torch.nn.functional.interpolate(tokens.view(b, 1, grids.th, grids.tw).float(), scale_factor=2, mode="nearest")
        return up.long().view(b, -1)

    @torch.no_grad()
    def glyph_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """T5 states of quoted text (B, T, D); computed under no_grad as the pipeline does (bit-exact)."""
        embeds, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, device=self.device,
                                            dtype=self.pipe.transformer.dtype)
        return embeds

    def schedule(self, num_steps: int, height: int, width: int):
        """Timesteps (S,) and sigmas (S+1,) of the release schedule, the last sigma 0."""
        from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

        sched = self.pipe.scheduler
        seq = (height // self.vae_scale) * (width // self.vae_scale) // self.patch**2
        t = np.linspace(sched.config.num_train_timesteps, 1.0, num_steps + 1)[:-1].astype(np.int64).astype(np.float32)
        mu = calculate_shift(seq, sched.config.get("base_image_seq_len", 256), sched.config.get("base_shift", 0.25),
                             sched.config.get("max_shift", 0.75))
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, t, t / sched.config.num_train_timesteps, mu=mu)
        return timesteps.float(), sched.sigmas.to(self.device).float()

    def latent_shape(self, batch: int, height: int, width: int):
        return (batch, self.pipe.transformer.config.in_channels, height // self.vae_scale, width // self.vae_scale)

    @torch.no_grad()
    def source_latents(self, images: np.ndarray) -> torch.Tensor:
        """Source images (B, H, W, 3) uint8 -> normalised VAE latents (B, C, H/8, W/8) float32, as the pipeline
        encodes condition images (``retrieve_latents(..., sample_mode="argmax")``, (z - mean) / std)."""
        vae = self.pipe.vae
        pixels = torch.as_tensor(images, device=self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float()
        c = vae.config.latent_channels
        mean = torch.tensor(vae.config.latents_mean, device=self.device).view(1, c, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=self.device).view(1, c, 1, 1)
        return (z - mean) / std

    def source_kv_cache(self, transformer, source_latents: torch.Tensor, source_prior: torch.Tensor, text_dim: int):
        """A ``GlmImageKVCache`` written by ``transformer`` from the source latents (B, C, h, w) and their prior ids
        (B, h*w/4), one row per sample (grad flows through it when enabled)."""
        from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

        b, dtype = source_latents.shape[0], transformer.dtype
        cache = GlmImageKVCache(num_layers=self.pipe.transformer.config.num_layers)
        cache.set_mode("write")
        height, width = (d * self.vae_scale for d in source_latents.shape[-2:])
        transformer(
            hidden_states=source_latents.to(dtype), encoder_hidden_states=torch.zeros(b, 0, text_dim, dtype=dtype,
                                                                                        device=self.device),
            prior_token_id=source_prior, prior_token_drop=torch.zeros_like(source_prior, dtype=torch.bool),
            timestep=torch.zeros(b, device=self.device),
            target_size=torch.tensor([[height, width]], dtype=dtype, device=self.device).repeat(b, 1),
            crop_coords=torch.zeros((b, 2), dtype=dtype, device=self.device), kv_caches=cache, return_dict=False,
        )
        return cache

    def velocity(self, transformer, latents, t, prior, glyph, neg_glyph, guidance_scale: float, height: int, width: int,
                 batch_cfg: bool = False, source=None):
        """Model velocity at timestep ``t`` (fp32), with CFG when ``guidance_scale > 1``: v = v_u + g (v_c - v_u).

        By default the conditional and unconditional branches are two calls, as in ``GlmImagePipeline``, which
        reproduces the pipeline exactly. ``batch_cfg`` runs them as one call of 2B: the shorter of the two glyph
        sequences is left zero-padded to the longer, which is what the pipeline does to prompts of different
        glyph lengths within one batch (the transformer takes no glyph mask), so the unconditional branch sees
        zero glyph tokens it does not see in the release's two-call CFG. Rollout and training recompute use
        the same layout either way.

        ``source``: (source latents, source prior ids) of an edit (module docstring); needs two-call CFG.
        """
        keep = torch.zeros_like(prior, dtype=torch.bool)
        cache = None if source is None else self.source_kv_cache(transformer, *source, glyph.shape[-1])
        if cache is not None:
            cache.set_mode("read")
        if guidance_scale <= 1.0:
            return self._transformer(transformer, latents, t, prior, glyph, keep, height, width, cache)
        if batch_cfg and cache is None:
            glyph, neg_glyph = _left_pad_to_same_length(glyph, neg_glyph)
            t2 = t.repeat(2) if t.dim() else t  # training passes one timestep per sample
            both = self._transformer(transformer, torch.cat([latents, latents]), t2, torch.cat([prior, prior]),
                                     torch.cat([glyph, neg_glyph]), torch.cat([keep, ~keep]), height, width)
            v, v_u = both.chunk(2)
        else:
            v = self._transformer(transformer, latents, t, prior, glyph, keep, height, width, cache)
            if cache is not None:
                cache.set_mode("skip")
            v_u = self._transformer(transformer, latents, t, prior, neg_glyph, ~keep, height, width, cache)
        return v_u + guidance_scale * (v - v_u)

    def _transformer(self, transformer, latents, t, prior, glyph, prior_drop, height: int, width: int,
                     kv_caches=None) -> torch.Tensor:
        """One transformer call (fp32 output); ``prior_drop`` (bool, like ``prior``) drops the prior tokens;
        ``kv_caches`` an edit's source cache in its read/skip mode."""
        b = latents.shape[0]
        dtype = transformer.dtype
        return transformer(
            hidden_states=latents.to(dtype), encoder_hidden_states=glyph, prior_token_id=prior,
            prior_token_drop=prior_drop, timestep=(t.expand(b) - 1).to(self.device),
            target_size=torch.tensor([[height, width]], dtype=dtype, device=self.device).repeat(b, 1),
            crop_coords=torch.zeros((b, 2), dtype=dtype, device=self.device), return_dict=False, kv_caches=kv_caches,
        )[0].float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents (B, C, h, w) -> uint8 images (B, H, W, 3)."""
        vae = self.pipe.vae
        c = vae.config.latent_channels
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1).to(latents.device, vae.dtype)
        img = vae.decode(latents.to(vae.dtype) * std + mean, return_dict=False)[0]
        img = (img.float() / 2 + 0.5).clamp(0, 1)
        return (img.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def _left_pad_to_same_length(a: torch.Tensor, b: torch.Tensor):
    """(B, T, D) sequences left zero-padded to the longer T (the pipeline's glyph padding within a batch)."""
    length = max(a.shape[1], b.shape[1])

    def pad(x):
        return torch.nn.functional.pad(x, (0, 0, length - x.shape[1], 0))

    return pad(a), pad(b)

