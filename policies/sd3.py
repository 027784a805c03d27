"""The SD3 family: a decoder-only flow-matching model, ``SD3Transformer2DModel`` in diffusers'
``StableDiffusion3Pipeline``, trained by flow-GRPO through the generic ``FlowPolicy``.

This file is the template for a new family: a ``FlowAdapter`` (conditions, schedule, noise, velocity, decode),
a loader, the family's own pipeline call, a tiny random-init builder, and ``register_family``. Conventions, as
in ``StableDiffusion3Pipeline.__call__`` (diffusers 0.42):

* Conditions: ``encode_prompt`` of the prompt and of ``""`` (CFG's negative branch): prompt embeddings
  (B, 77 + T5 length, D) — the two CLIP encoders' penultimate states concatenated, zero-padded to the T5 width
  D, then the T5 states — and pooled embeddings (B, P), the two CLIP projections concatenated. The prompt text
  is the only condition: ``decoder.condition_source`` and prompt metadata are not used.
* Schedule: the scheduler's own ``set_timesteps`` through ``retrieve_timesteps``: sigma = linspace(1, sigma_min, S)
  (sigma_min: the smallest training sigma, itself shifted), then shifted by ``shift``,
  sigma' = s sigma / (1 + (s - 1) sigma) (SD3: s = 3), or by mu = calculate_shift(seq) under
  ``use_dynamic_shifting``; timestep t = 1000 sigma', which the transformer sees as is; a last sigma 0.
* Latents: normalised VAE latents, x_sigma = (1 - sigma) x0 + sigma eps; the transformer predicts v = eps - x0.
* CFG: one call of 2B on [negative; positive] as the pipeline does, v = v_u + g (v_c - v_u) when g > 1
  (``decoder.cfg_batch`` is moot: both branches always have the same length).
* Decode: latents / ``scaling_factor`` + ``shift_factor`` -> ``vae.decode`` -> [-1, 1] -> uint8.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from tandem.core.errors import ConfigError
from tandem.policies.base import DTYPES, resolve_device
from tandem.policies.families import ModelFamily, register_family
from tandem.policies.render import seeded_noise

PIPELINE_CLASS = "StableDiffusion3Pipeline"
TINY_VERSION = 1  # bump when the tiny models change, so cached folders are rebuilt


class Sd3FlowAdapter:
    """``FlowAdapter`` over a ``StableDiffusion3Pipeline`` at one image size (module docstring: conventions).

    Args:
        pipe: the loaded pipeline.
        height, width: image size in pixels (multiples of VAE factor x patch size).
        max_sequence_length: T5 tokens per prompt (the pipeline's default 256).
    """

    def __init__(self, pipe, height: int, width: int, max_sequence_length: int = 256):
        self.pipe, self.height, self.width = pipe, height, width
        self.max_sequence_length = max_sequence_length
        self.denoiser = pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @torch.no_grad()
    def conditions(self, prompts: Sequence[str], metadata: Sequence[dict], seed: int) -> Dict[str, torch.Tensor]:
        """prompt_embeds (P, L, D), pooled (P, Dp) and their negatives (of ``""``) from ``pipe.encode_prompt``."""
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=True,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled, "neg_prompt_embeds": neg_embeds, "neg_pooled": neg_pooled}

    def schedule(self, num_steps: int):
        """Timesteps (S,) and sigmas (S+1,) float32 of the pipeline's step 5 (``retrieve_timesteps``)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

        sched, kwargs = self.pipe.scheduler, {}
        if sched.config.get("use_dynamic_shifting", None):
            _, _, h, w = self.latent_shape(1)
            patch = self.pipe.transformer.config.patch_size
            kwargs["mu"] = calculate_shift((h // patch) * (w // patch), sched.config.get("base_image_seq_len", 256),
                                           sched.config.get("max_image_seq_len", 4096),
                                           sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.16))
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, **kwargs)
        return timesteps.float(), sched.sigmas.to(self.device).float()

    def latent_shape(self, batch: int):
        factor = self.pipe.vae_scale_factor
        return (batch, self.pipe.transformer.config.in_channels, self.height // factor, self.width // factor)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        return seeded_noise(self.latent_shape(1)[1:], seeds, self.device)

    def velocity(self, model, latents, t, cond: Dict[str, torch.Tensor], guidance_scale: float) -> torch.Tensor:
        """(B, C, h, w) fp32 velocity at timestep ``t`` (0-dim, or (B,) in training), CFG as the pipeline's step 7."""
        b, dtype = latents.shape[0], model.dtype
        embeds, pooled = cond["prompt_embeds"], cond["pooled"]
        timestep = t.expand(b) if t.dim() == 0 else t
        x = latents
        if guidance_scale > 1.0:
            embeds = torch.cat([cond["neg_prompt_embeds"], embeds])
            pooled = torch.cat([cond["neg_pooled"], pooled])
            x, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])
        v = model(hidden_states=x.to(dtype), timestep=timestep.to(self.device), encoder_hidden_states=embeds.to(dtype),
                  pooled_projections=pooled.to(dtype), return_dict=False)[0].float()
        if guidance_scale > 1.0:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        return v

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        x = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        img = (vae.decode(x, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
        return (img.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------- loading, sampling, registration
def load_pipeline(path: str, dtype: str = "float32", device: str = "auto", create_tiny_if_missing: bool = False):
    """``StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True)`` in ``dtype`` on ``device``, frozen."""
    from diffusers import StableDiffusion3Pipeline

    if create_tiny_if_missing:
        ensure_tiny_sd3(path)
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"model.path: no {PIPELINE_CLASS} at {path} (expected model_index.json and the component "
                          f"folders written by save_pretrained; put the weights in a local folder and point model.path at it)")
    found = json.loads(index.read_text()).get("_class_name")
    if found != PIPELINE_CLASS:
        raise ConfigError(f"model.path: {path} holds a {found}, not a {PIPELINE_CLASS}; set model.family to its "
                          f"family or point model.path at an SD3 folder")
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(resolve_device(device))
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    return pipe


def pipeline_images(pipe, prompts: List[str], cfg, seed: int) -> np.ndarray:
    """The real ``StableDiffusion3Pipeline.__call__`` at the eval settings: (N, H, W, 3) uint8. Image i starts
    from the noise of seed ``seed + i`` (one generator per row), the same noise as ``FlowPolicy.sample``."""
    gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompt=list(prompts), height=cfg.data.height, width=cfg.data.width,
               num_inference_steps=cfg.decoder.eval_num_steps, guidance_scale=cfg.decoder.guidance_scale,
               generator=gens, output_type="np")
    return (np.asarray(out.images) * 255).round().astype(np.uint8)


def _flow_policy(pipe, settings):
    from tandem.policies.flow import FlowPolicy

    if settings.compile_decoder and not getattr(pipe.transformer, "_repeated_blocks", None):
        raise ConfigError(f"decoder.compile: {type(pipe.transformer).__name__} declares no repeated blocks for "
                          f"diffusers' regional compilation; set decoder.compile=false")
    return FlowPolicy(Sd3FlowAdapter(pipe, settings.height, settings.width), settings)


def _load(model_cfg):
    return load_pipeline(model_cfg.path, model_cfg.dtype, model_cfg.device, model_cfg.create_tiny_if_missing)


SD3 = register_family(ModelFamily(
    name="sd3", load=_load, policies={"decoder": _flow_policy}, components={"decoder": "transformer"},
    generate=pipeline_images,
))


# ---------------------------------------------------------------------- tiny random-init pipeline
def _clip_tokenizer():
    """A character-level ``CLIPTokenizer`` built in code (no vocab file): every byte-level symbol, alone and as
    a word end ("x</w>"), no merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    """A ``T5Tokenizer`` over a Unigram vocabulary given in code: the printable ASCII characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_sd3(path: str | os.PathLike, seed: int = 0) -> Path:
    """Every component of a ``StableDiffusion3Pipeline`` at toy size with random weights (seeded), tokenizers
    built in code, written with ``save_pretrained`` (atomically: a half-written folder is never a model)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)).eval()

    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                 decoder_start_token_id=0, pad_token_id=t5_tok.pad_token_id)).eval()
    # A random VAE decoder must still turn latent shifts into colour changes the demo rewards can see: one norm
    # group, a 3x output layer (as policies/tiny.py) and scaling_factor 0.25 (SD3: 1.5305), so that a unit step
    # of the normalised latent is 1 / 0.25 = 4 VAE units (1 / 1.5305 = 0.65 with SD3's factor).
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
        norm_num_groups=1, sample_size=64, scaling_factor=0.25, shift_factor=0.0609).eval()
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(3.0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=clip(), tokenizer=clip_tok, text_encoder_2=clip(), tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok)
    tmp = path.with_name(path.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "TINY_RANDOM_INIT.json").write_text(json.dumps({"seed": seed, "version": TINY_VERSION}))
    tmp.rename(path)
    return path


def ensure_tiny_sd3(path: str | os.PathLike) -> Path:
    """Return ``path``, building the tiny pipeline there first if it holds none (or an outdated tiny build)."""
    path = Path(path)
    marker = path / "TINY_RANDOM_INIT.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") != TINY_VERSION:
        shutil.rmtree(path)
    if not (path / "model_index.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_sd3(path)
    return path
