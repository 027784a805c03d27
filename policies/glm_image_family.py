"""The GLM-Image family: its decoder as a ``FlowAdapter``, its AR policy, and its registration.

Decoder conditions (``GlmFlowAdapter.conditions``) are the full-grid AR tokens of each prompt, taken from
``metadata["full_tokens"]`` when an AR run's buffer or a joint job's AR phase supplied them, else by
``decoder.condition_source``: the reference image's own VQ tokens ("reference") or a rollout of the frozen AR
model ("ar"); plus the glyph embeddings of the quoted text (and of ``""`` for CFG's negative branch).

Editing (``decoder.edit``): ``metadata["reference"]`` is the source image; with ``condition_source: ar`` the frozen
AR model writes the target tokens from the source's image tokens and the instruction (``GlmImageAdapter.edit_tokens``),
and the source's VAE latents and VQ prior ids join the conditions (``source_latents``, ``source_prior``) and reach every velocity call through the transformer's
KV cache, as ``GlmImagePipeline(image=...)`` conditions the decoder (``GlmImageAdapter.source_kv_cache``).
Both stages edit (``ar.edit``, ``decoder.edit``); ``validate_config`` holds the family's config rules.

``model.path`` is the folder ``GlmImagePipeline.save_pretrained`` writes: model_index.json,
vision_language_encoder/, processor/, transformer/, vae/, text_encoder/, tokenizer/, scheduler/.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from tandem.core.errors import ConfigError, require
from tandem.policies.base import edits, trained_stages
from tandem.policies.families import ModelFamily, register_family
from tandem.policies.glm_image import GlmImageAdapter, Grids, load_pipeline
from tandem.policies.render import ode_sample, seeded_noise


class GlmFlowAdapter:
    """``FlowAdapter`` over a ``GlmImagePipeline`` at one image size.

    Args:
        pipe: the loaded pipeline.
        height, width: image size in pixels.
        condition_source: where prompts without ``full_tokens`` get theirs: "ar" | "reference" | "buffer".
        batch_cfg: both CFG branches in one call of 2B (``decoder.cfg_batch``).
        edit: the records' ``reference`` images are sources to edit (``decoder.edit``).
        edit_key: the config key that asked for editing, named in the error for a record without a source.
    """

    def __init__(self, pipe, height: int, width: int, condition_source: str = "ar", batch_cfg: bool = False,
                 edit: bool = False, edit_key: str = "decoder.edit"):
        self.pipe, self.layout = pipe, GlmImageAdapter(pipe)
        self.height, self.width = height, width
        self.condition_source, self.batch_cfg, self.edit, self.edit_key = condition_source, batch_cfg, edit, edit_key
        self.grids = self.layout.grids(height, width)
        self.denoiser = pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.layout.device

    @torch.no_grad()
    def full_tokens(self, prompts: Sequence[str], metadata: Sequence[dict], seed: int) -> torch.Tensor:
        """(P, th*tw) full-grid AR tokens per prompt (module docstring: where they come from)."""
        if all("full_tokens" in m for m in metadata):
            tokens = torch.as_tensor(np.stack([m["full_tokens"] for m in metadata]), device=self.device)
            codebook = self.pipe.transformer.config.prior_vq_quantizer_codebook_size
            if tokens.shape[1] != self.grids.num_full or int(tokens.min()) < 0 or int(tokens.max()) >= codebook:
                raise ConfigError(f"full_tokens of prompt {prompts[0]!r} do not fit a {self.height}x{self.width} "
                                  f"decoder ({self.grids.num_full} ids in [0, {codebook}) expected)")
            return tokens.long()
        g = self.grids
        if self.condition_source == "reference":
            missing = [p for p, m in zip(prompts, metadata) if "reference" not in m]
            if missing:
                raise ConfigError(f"decoder.condition_source=reference needs a 'reference' image for prompt {missing[0]!r}")
            return self.layout.reference_tokens(np.stack([m["reference"] for m in metadata]), (g.th, g.tw),
                                                "decoder.condition_source=reference")
        if self.edit:
            return self.layout.edit_tokens(prompts, self.sources(prompts, metadata), self.height, self.width, seed)
        gen = torch.Generator().manual_seed(seed)
        up, _, _ = self.pipe.generate_prior_tokens(prompt=list(prompts), height=self.height, width=self.width,
                                                   device=self.device, generator=gen)
        return up.view(len(prompts), 2 * g.th, 2 * g.tw)[:, ::2, ::2].reshape(len(prompts), -1)

    def conditions(self, prompts: Sequence[str], metadata: Sequence[dict], seed: int) -> Dict[str, torch.Tensor]:
        cond = self.token_conditions(self.full_tokens(prompts, metadata, seed), prompts, with_negative=True)
        if self.edit:
            cond.update(self.source_conditions(prompts, metadata))
        return cond

    @torch.no_grad()
    def source_conditions(self, prompts: Sequence[str], metadata: Sequence[dict]) -> Dict[str, torch.Tensor]:
        """source_latents (P, C, h, w) and source_prior (P, h*w/4 patches) of each record's source image, at the
        size the processor's bounds give it (``sources``): (h, w) = 2x the source's VQ grid."""
        images = self.sources(prompts, metadata)
        gh, gw = (d // (2 * self.layout.vae_scale * self.layout.patch) for d in images.shape[1:3])
        tokens = self.layout.reference_tokens(images, (gh, gw), f"{self.edit_key} source images")
        prior = self.layout.upsample_prior(tokens, Grids(gh, gw, 0, 0))
        return {"source_latents": self.layout.source_latents(images), "source_prior": prior}

    def sources(self, prompts: Sequence[str], metadata: Sequence[dict]) -> np.ndarray:
        """(P, H', W', 3) uint8 source images of an edit job, brought to the image processor's bounds
        (``GlmImageAdapter.fit_sources``: as they are unless a side is past them), so the AR model's source tokens
        and the DiT's source latents and prior ids come from one image; ConfigError naming the prompt without one."""
        missing = [p for p, m in zip(prompts, metadata) if "reference" not in m]
        if missing:
            raise ConfigError(f"{self.edit_key} needs a source image ('reference' in the prompt file) for prompt "
                              f"{missing[0]!r}")
        images = np.stack([m["reference"] for m in metadata])
        if images.shape[1:3] != (self.height, self.width):
            raise ConfigError(f"{self.edit_key}: source images are {images.shape[1]}x{images.shape[2]}, the job makes "
                              f"{self.height}x{self.width} images; load them at data.height x data.width")
        return self.layout.fit_sources(images)

    def token_conditions(self, full_tokens: torch.Tensor, prompts: Sequence[str], with_negative: bool) -> Dict[str, torch.Tensor]:
        """prior (B, 4*th*tw) upsampled ids, glyph (B, T, D), neg_glyph (B, T', D) (CFG), full_tokens (B, th*tw)."""
        cond = {"full_tokens": full_tokens.to(self.device),
                "prior": self.layout.upsample_prior(full_tokens.to(self.device), self.grids),
                "glyph": self.layout.glyph_embeds(prompts)}
        if with_negative:
            cond["neg_glyph"] = self.layout.glyph_embeds([""] * len(prompts))
        return cond

    def schedule(self, num_steps: int):
        return self.layout.schedule(num_steps, self.height, self.width)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        return seeded_noise(self.layout.latent_shape(1, self.height, self.width)[1:], seeds, self.device)

    def velocity(self, model, latents, t, cond: Dict[str, torch.Tensor], guidance_scale: float) -> torch.Tensor:
        source = (cond["source_latents"], cond["source_prior"]) if "source_latents" in cond else None
        return self.layout.velocity(model, latents, t, cond["prior"], cond["glyph"], cond.get("neg_glyph"),
                                    guidance_scale, self.height, self.width, self.batch_cfg, source)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return self.layout.decode(latents)


def render_tokens(adapter: GlmFlowAdapter, full_tokens: torch.Tensor, prompts: Sequence[str], num_steps: int,
                  guidance_scale: float, seeds: Sequence[int], transformer=None,
                  metadata: Optional[Sequence[dict]] = None) -> np.ndarray:
    """Full-grid AR tokens (B, th*tw) -> uint8 images (B, H, W, 3) by Euler steps of the frozen (or given) DiT.
    With an editing ``adapter`` the DiT also attends to each record's source (``metadata[i]["reference"]``) as the
    decoder stage's edit path does (``GlmFlowAdapter.source_conditions``)."""
    cond = adapter.token_conditions(full_tokens, prompts, with_negative=guidance_scale > 1.0)
    if adapter.edit:
        cond.update(adapter.source_conditions(prompts, metadata if metadata is not None else [{}] * len(prompts)))
    return ode_sample(adapter, transformer or adapter.denoiser, cond, seeds, num_steps, guidance_scale)


def pipeline_images(pipe, prompts: List[str], cfg, seed: int) -> np.ndarray:
    """The real ``GlmImagePipeline.__call__`` (AR sampling with the model's generation config, then the decoder at
    the eval settings); (N, H, W, 3) uint8, deterministic under ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(prompt=prompts, height=cfg.data.height, width=cfg.data.width,
               num_inference_steps=cfg.decoder.eval_num_steps, guidance_scale=cfg.decoder.guidance_scale,
               generator=gen, output_type="np")
    return (np.asarray(out.images) * 255).round().astype(np.uint8)


def _flow_policy(pipe, settings):
    from tandem.policies.flow import FlowPolicy

    d = settings.section
    return FlowPolicy(GlmFlowAdapter(pipe, settings.height, settings.width, d.condition_source, d.cfg_batch,
                                     settings.edit), settings)


def _ar_policy(pipe, settings):
    from tandem.policies.ar import GlmImageARPolicy

    return GlmImageARPolicy(pipe, GlmImageAdapter(pipe), settings)


def check_reference_grid(adapter: GlmImageAdapter, height: int, width: int) -> None:
    """``decoder.condition_source: reference`` paints the reference images' own VQ tokens: ConfigError unless the
    image processor makes the job's full grid of a ``height`` x ``width`` image (it rescales images past its
    bounds: the release's up to 2048 px, the tiny model's class default about 1002)."""
    g = adapter.grids(height, width)
    adapter.check_vq_grid(height, width, (g.th, g.tw), "decoder.condition_source=reference")


def check_prompts(pipe, prompts: List[str], cfg, stage: str) -> None:
    """Every prompt must fit the AR model's context (``text_config.max_position_embeddings``) together with its
    image-grid layout and the preview + full grids it generates; ConfigError naming the first that does not.
    A prompt longer than context x the longest token (in characters) cannot fit and is not tokenised at all (a
    megabyte prompt would take minutes and then hang the forward)."""
    adapter = GlmImageAdapter(pipe)
    if stage == "decoder" and cfg.decoder.condition_source == "reference":  # the reference images' VQ grid
        check_reference_grid(adapter, cfg.data.height, cfg.data.width)
    if stage == "decoder" and cfg.decoder.condition_source != "ar":
        return  # the AR model never reads these prompts (the decoder's glyph encoder truncates at 2048)
    context = pipe.vision_language_encoder.config.text_config.max_position_embeddings
    h, w = cfg.data.height, cfg.data.width
    grids = adapter.grids(h, w)
    tokenizer = pipe.processor.tokenizer
    if edits(cfg, stage):  # the source's image tokens, the target grid only
        layout = len(adapter.edit_inputs([""], np.zeros((1, h, w, 3), np.uint8), h, w)["input_ids"][0])
        budget = context - layout - grids.num_full - 1
    else:
        layout = len(adapter.ar_inputs([""], h, w)["input_ids"][0])
        budget = context - layout - grids.num_preview - grids.num_full - 1
    longest = max(len(t) for t in tokenizer.get_vocab())
    for i, prompt in enumerate(dict.fromkeys(prompts)):
        n = budget + 1 if len(prompt) > max(budget, 0) * longest else len(tokenizer(prompt)["input_ids"])
        if n > budget:
            raise ConfigError(f"prompt {prompt[:40]!r}... ({len(prompt)} characters) is longer than the AR model's "
                              f"context allows: {context} positions leave {max(budget, 0)} prompt tokens at "
                              f"{cfg.data.height}x{cfg.data.width} px; shorten it")


def validate_config(cfg, stage: str) -> None:
    """GLM-Image's own config rules (after ``ModelFamily.validate``'s): ``ar.sampler`` is a registered token
    sampler, whose own rules hold where the AR stage trains; an editing decoder runs CFG as two calls (only the
    conditional branch reads the source's KV cache)."""
    from tandem.policies.token_samplers import token_sampler

    sampler = token_sampler(cfg.ar.sampler)
    if "ar" in trained_stages(stage):
        sampler.validate(cfg, stage)
    if "decoder" in trained_stages(stage):
        require(not (edits(cfg, "decoder") and cfg.decoder.cfg_batch), "decoder.cfg_batch", "decoder.edit runs CFG "
                "as two calls (only the conditional branch reads the source's KV cache): set decoder.cfg_batch=false")


def _load(model_cfg):
    return load_pipeline(model_cfg.path, model_cfg.dtype, model_cfg.device, model_cfg.create_tiny_if_missing)


GLM_IMAGE = register_family(ModelFamily(
    name="glm_image", load=_load, policies={"decoder": _flow_policy, "ar": _ar_policy},
    components={"decoder": "transformer", "ar": "vision_language_encoder"}, generate=pipeline_images,
    check_prompts=check_prompts, edits=("ar", "decoder"), rules=validate_config,
))
