"""The AR token policy: GRPO over the image tokens of ``GlmImageForConditionalGeneration``.

One action unit is one generated token. A sample writes U = ph·pw + th·tw tokens: the preview grid first,
then the full grid (the tokens the frozen decoder paints). Both segments are actions; their loss weights
(``ar.preview_loss_weight``, ``ar.full_loss_weight``) are folded into ``Rollout.mask``.

**Which distribution the loss uses.** The sampler's: π(a | s) = softmax(topp(topk(suppress(ℓ)/T)))[a], with
ℓ the raw logits of the model (``policies.ar_sampler.LogitsProcessing``) and suppress(ℓ) = −inf at the end marker
(the grid has a fixed length) and, with ``ar.suppress_non_codebook``, at every non-codebook id (``suppressed_ids``;
off by default, as in the release's sampler). The rollout stores exactly this
log-prob of every sampled token (``old_log_probs``), so the on-policy ratio is that of the distribution that
was sampled from (docs/design.md, section 4). The recompute (``log_probs``) applies the same processing to the current
weights' logits, taking the top-k / nucleus support from those logits and always keeping the scored token:
    log π_θ(a) = z_a − logsumexp_{j ∈ S_θ ∪ {a}} z_j,   z = suppress(ℓ_θ)/T,   S_θ = support of the processed
scores. Why: (1) it is the distribution the current policy would sample from; (2) no (B, U, V) nucleus mask
has to be stored; (3) at the first on-policy iteration in fp32 it is bit-for-bit the stored distribution
(|r − 1| ≲ 1e-6: only the cached-vs-teacher-forced forward differs); (4) keeping a in the support means a
nucleus that moved (bf16 rounding, or the update itself) never gives log π = −inf — the token then counts
with the normaliser of the current nucleus plus itself. The KL reference (adapter disabled, or a frozen copy)
is scored the same way, and the per-token KL is k3 (``tandem.policies.kl.k3_kl``).

**Positions.** The training forward passes the 3-D MRoPE ``position_ids`` that generation used (recorded by
the sampler), never letting the model derive them (wrong from the 3rd generated token on) and never touching
the model's cached rope state (docs/glm_image_facts.md, "Exact AR log-probs").

**Editing** (``ar.edit``). Each record's ``reference`` image is the source, and the AR stage is conditioned on it
the way ``GlmImagePipeline(image=...)`` conditions its AR model (``GlmImageAdapter.edit_inputs``): the chat
template's image item puts the source's ``<|image|>`` placeholders before the instruction, the processor adds
``pixel_values`` and the grids (source, target), and the model replaces the placeholders by the source's VQ tokens
(vision tower + VQ codebook, frozen: the ids are discrete, so no gradient reaches them) and writes the target's
full grid only (U = th·tw, no preview grid). The rollout stores ``pixel_values`` (B, n, C·p²), the grids and
``images_per_sample`` with the tokens, and the training forward feeds them again, with the MRoPE positions the
image-conditioned prefill used (the source's tokens at 2-D positions), so the recompute is the sampler's forward
and the first on-policy ratio is 1. The frozen decoder renders the tokens with the decoder stage's edit
conditioning (the source's latents and prior tokens through its KV cache), so edit rewards (``source_structure``,
``lpips``) judge real edits. A token sampler may refuse image inputs (its rules: ``policies.token_samplers``).

**LoRA targets are per stage.** ``optim.lora.target_modules`` names modules of the trained model; the schema
default names the decoder's (``to_q``…). The AR policy reads that exact default as "stage default" and uses
``AR_LORA_TARGETS`` (the attention projections of the GLM text layers); set it explicitly in an AR YAML
(e.g. ``[q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj]``). Adapters go into the text model only
(never the vision tower or VQ model, which text-to-image does not run).
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch

from tandem.policies.base import TrainedComponent
from tandem.policies.settings import PolicySettings
from tandem.policies.ar_sampler import LogitsProcessing, SampledTokens, TokenSampler, prompt_inputs
from tandem.policies.token_samplers import token_sampler
from tandem.policies.glm_image import GlmImageAdapter, load_pipeline
from tandem.policies.glm_image_family import GlmFlowAdapter, render_tokens
from tandem.core.errors import ConfigError
from tandem.policies.lora import LoraSettings, MergedLoRA
from tandem.core.seeds import DECODE, TOKENS, RolloutSeeds
from tandem.core.types import LogProbs, Rollout, group_ids_for, repeat_for_groups

logger = logging.getLogger(__name__)

AR_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
"""Default LoRA targets of the AR stage: attention projections of the GLM text decoder layers."""

TEXT_LAYERS = r"model\.language_model\.layers\.\d+\."
"""Module-name prefix of the text decoder layers inside ``GlmImageForConditionalGeneration``."""


def lora_target_regex(model: torch.nn.Module, names: Sequence[str]) -> str:
    """peft ``target_modules`` regex that matches modules named ``names`` (suffixes) in the text layers only.

    Raises ConfigError naming the modules that exist when a name matches none.
    """
    if list(names) == LoraSettings().target_modules:  # the schema default is the decoder's list
        logger.info("optim.lora.target_modules is the decoder default; the AR stage uses %s", AR_LORA_TARGETS)
        names = AR_LORA_TARGETS
    layer_modules = [n for n, _ in model.named_modules() if re.match(TEXT_LAYERS, n)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in layer_modules})
    missing = [t for t in names if not any(n.endswith("." + t) for n in layer_modules)]
    if missing or not names:
        raise ConfigError(
            f"optim.lora.target_modules: {missing or list(names)} match no module of the AR text layers; "
            f"set it per stage, e.g. [q_proj, k_proj, v_proj, o_proj] (available: {', '.join(suffixes)})"
        )
    return TEXT_LAYERS + r"(.*\.)?(" + "|".join(re.escape(t) for t in names) + r")"


def suppressed_ids(model, non_codebook: bool) -> tuple:
    """Ids the AR sampler never draws (sorted), for a ``GlmImageForConditionalGeneration`` ``model``:

    * ``generation_config.suppress_tokens`` — what the model's own ``generate`` suppresses (none in the release);
    * the end marker(s) — ``generation_config.eos_token_id`` and ``config.image_end_token_id``: the sampler writes
      exactly U grid tokens, so an end marker is never a valid action. This is what transformers' ``generate``
      does with ``min_new_tokens = U`` (``MinNewTokensLengthLogitsProcessor`` sets the eos logits to −inf), and it
      is the release's distribution conditioned on a complete grid: the release pipeline
      (``generate(max_new_tokens=U + 1)``) stops at an early end marker and then fails to reshape the grid;
    * with ``non_codebook`` (``ar.suppress_non_codebook``), every id of the image lm_head past the VQ codebook,
      [codebook size, vision_vocab_size): the start/end markers and the unused rest.

    Without ``non_codebook`` this is the release's sampler (its ``generation_config.json``: temperature 0.9,
    top-p 0.75, top-k = the whole lm_head, no suppress list): the other non-codebook ids stay in the softmax, the
    nucleus and the stored log-probs (docs/glm_image_facts.md, "The release's sampler").
    """
    config, gen = model.config, model.generation_config
    eos = gen.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    ids = set(gen.suppress_tokens or []) | set(eos) | {config.image_end_token_id}
    if non_codebook:
        ids |= set(range(config.vq_config.num_embeddings, config.text_config.vision_vocab_size))
    return tuple(sorted(ids))


class GlmImageARPolicy(TrainedComponent):
    """GRPO policy over the AR stage of a GLM-Image pipeline (the ``Policy`` contract of ``policies.base``).

    Args:
        pipe: a loaded ``diffusers.GlmImagePipeline`` (``policies.glm_image.load_pipeline``); its
            ``vision_language_encoder`` is trained, the decoder parts stay frozen and render the images.
        adapter: ``GlmImageAdapter`` over ``pipe``.
        settings: the AR stage's ``PolicySettings`` (``policies.settings``; ``section`` is the ``ar`` config).
        sampler: the decode loop (``TokenSampler``); default: the one ``ar.sampler`` names
            (``policies.token_samplers``).
    """

    stage = "ar"

    def __init__(self, pipe, adapter: GlmImageAdapter, settings: PolicySettings,
                 sampler: Optional[TokenSampler] = None):
        self.pipe, self.adapter, self.settings, self.ar = pipe, adapter, settings, settings.section
        self.model = self.trained_module = pipe.vision_language_encoder
        self.sampler_kind = token_sampler(self.ar.sampler)
        self.sampler: TokenSampler = sampler or self.sampler_kind.build(settings)
        self.height, self.width = settings.height, settings.width
        self.grids = adapter.grids(self.height, self.width)
        self.edit = settings.edit
        # the frozen decoder that renders the tokens (for an edit, conditioned on the source as the decoder stage is)
        self.decoder = GlmFlowAdapter(pipe, self.height, self.width, edit=self.edit, edit_key="ar.edit")
        self.num_preview = 0 if self.edit else self.grids.num_preview  # an edit writes the target's full grid only
        self.num_full = self.grids.num_full
        if settings.compile_decoder:  # the frozen decoder that renders the tokens (diffusers' regional compilation)
            pipe.transformer.compile_repeated_blocks()
        # a joint job's decoder LoRA, merged while rendering (the images only feed the rewards); else nothing to merge
        self.render_merged = MergedLoRA()
        self.processing = self._processing(self.ar)
        self._peft = None
        self._ref_model = None
        self._prefetched = None  # (seed, first_copy, group_size, prompts, drawn) of ``prefetch``
        self.model.requires_grad_(False).eval()
        if settings.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lora = settings.lora
            target = lora_target_regex(self.model, lora.target_modules)
            # LoRA layers are injected in place: ``self.model`` (and the pipeline) now run the adapter.
            with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                self._peft = get_peft_model(self.model, LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                                                   target_modules=target, lora_dropout=0.0, bias="none"))
        else:
            # Full fine-tuning of the text decoder and lm_head; the reference is a frozen copy made now.
            self._ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()
            self.model.model.language_model.requires_grad_(True)
            self.model.lm_head.requires_grad_(True)
        if settings.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @classmethod
    def from_config(cls, cfg, sampler: Optional[TokenSampler] = None) -> "GlmImageARPolicy":
        m = cfg.model
        pipe = load_pipeline(m.path, dtype=m.dtype, device=m.device, create_tiny_if_missing=m.create_tiny_if_missing)
        return cls(pipe, GlmImageAdapter(pipe), PolicySettings.from_job(cfg, "ar"), sampler=sampler)

    @property
    def rollout_matches_training(self) -> bool:
        """Whether the sampler's stored log-probs are the training forward's (``ar.sampler``'s capability:
        ``TokenSamplerKind.matches_training``); if not, ``grpo.old_log_probs: auto`` recomputes them."""
        return self.sampler_kind.rollout_matches_training(self.settings)

    def _processing(self, ar) -> LogitsProcessing:
        """The sampler's processing: ``ar.temperature``, ``ar.top_k``, ``ar.top_p`` after suppressing (−inf)
        ``suppressed_ids(model, ar.suppress_non_codebook)`` (``ar``: the AR config section)."""
        suppress = suppressed_ids(self.model, ar.suppress_non_codebook)
        try:
            return LogitsProcessing(suppress_ids=suppress, temperature=ar.temperature, top_k=ar.top_k, top_p=ar.top_p)
        except ValueError as e:
            raise ConfigError(f"config section 'ar': {e}") from None

    def _check_codebook(self, full_tokens: torch.Tensor) -> None:
        """ConfigError unless every full-grid id (B, th*tw) is a VQ code: the decoder paints codebook ids only (the
        release pipeline fails on any other id: an IndexError in the DiT's prior embedding)."""
        codes = self.model.config.vq_config.num_embeddings
        bad = (full_tokens >= codes).nonzero()
        if len(bad):
            row, col = bad[0].tolist()
            raise ConfigError(
                f"ar.suppress_non_codebook=false: the AR model sampled id {int(full_tokens[row, col])} into the full "
                f"grid of sample {row}, which is not a VQ code (the decoder paints codes 0..{codes - 1} only); set "
                f"ar.suppress_non_codebook=true to keep the sampler on the codebook"
            )

    # ------------------------------------------------------------------------------------------ acting
    @property
    def device(self) -> torch.device:
        return self.model.device

    def handoff(self, batch: Rollout) -> dict:
        """The full-grid tokens (B, th*tw): what the decoder stage paints (shared buffer, joint jobs)."""
        return {"full_tokens": batch.extras["full_tokens"]}

    @property
    def num_units(self) -> int:
        return self.num_preview + self.num_full

    def _sample_tokens(self, prompts: Sequence[str], metadata: Sequence[dict], seeds: Sequence[int]):
        if self.edit:
            sources = self.decoder.sources(prompts, metadata)
            inputs = self.adapter.edit_inputs(prompts, sources, self.height, self.width)
        else:
            inputs = self.adapter.ar_inputs(prompts, self.height, self.width)
        out: SampledTokens = self.sampler(self.model, prompt_inputs(inputs), self.num_units, self.processing, seeds)
        return inputs, out

    @staticmethod
    def _groups(prompts: Sequence[str], metadata: Sequence[dict], group_size: int):
        """Prompts and metadata repeated ``group_size`` times (copies adjacent), and each row's group index."""
        return (repeat_for_groups(list(prompts), group_size), repeat_for_groups(list(metadata), group_size),
                group_ids_for(len(prompts), group_size))

    def _draw(self, prompts_rep: List[str], meta_rep: List[dict], group_ids, group_size: int,
              seeds: RolloutSeeds) -> dict:
        """Token sequences for the rows of ``_groups``, each from its own seed (seeds.copy(TOKENS, group, copy)), as
        batch-first tensors: what the training forward replays (the left-padded prompt, its grids and, for an edit,
        the source's patches), the tokens with their MRoPE positions, and the sampler's log-probs."""
        token_seeds = [seeds.copy(TOKENS, g, i % group_size) for i, g in enumerate(group_ids)]
        inputs, out = self._sample_tokens(prompts_rep, meta_rep, token_seeds)
        b = out.tokens.shape[0]
        drawn = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     image_grid_thw=inputs["image_grid_thw"].view(b, -1, 3), tokens=out.tokens,
                     position_ids=out.position_ids, log_probs=out.log_probs.float())
        if self.edit:  # batch first, like every extra (one source per sample, all of the job's size)
            drawn.update(pixel_values=inputs["pixel_values"].view(b, -1, inputs["pixel_values"].shape[-1]),
                         images_per_sample=inputs["images_per_sample"])
        return drawn

    def prefetch(self, prompts: Sequence[str], metadata: Sequence[dict], group_size: int, seed: int,
                 first_copy: int = 0) -> None:
        """Draw the tokens of a whole rollout batch (this process's prompts, in the order of the ``rollout`` calls
        that follow) in one sampler call; each call then takes its rows and only renders. A decode step costs
        about the same for 4 rows as for 64 (it reads the weights once: docs/ar_engine.md), so one call replaces
        one per rollout call. The rows are those the calls would draw (one seed per copy); the prompts are padded to
        the batch's longest instead of the call's (the common padding of a call's rows is removed again), so the
        sampler's log-probs may differ from a call's in the last bits: the trainer prefetches only where it
        recomputes them (``grpo.old_log_probs``)."""
        prompts_rep, meta_rep, group_ids = self._groups(prompts, metadata, group_size)
        drawn = self._draw(prompts_rep, meta_rep, group_ids, group_size, RolloutSeeds(seed, 0, first_copy))
        self._prefetched = (seed, first_copy, group_size, prompts_rep, drawn)

    def _take_prefetched(self, prompts_rep: List[str], group_size: int, seed: int, first_group: int,
                         first_copy: int) -> Optional[dict]:
        """This call's rows of the prefetched batch (``prefetch``), or None when none was drawn for it."""
        if self._prefetched is None or self._prefetched[:3] != (seed, first_copy, group_size):
            return None
        all_prompts, drawn = self._prefetched[3:]
        rows = slice(first_group * group_size, first_group * group_size + len(prompts_rep))
        if all_prompts[rows] != prompts_rep:
            raise RuntimeError(f"rollout call (groups from {first_group}) does not match the prefetched batch")
        if rows.stop >= len(all_prompts):
            self._prefetched = None  # the batch is used up
        part = {k: v[rows] for k, v in drawn.items()}
        pad = int((part["attention_mask"].sum(0) == 0).cumprod(0).sum())  # leading columns padded in every row
        for k in ("input_ids", "attention_mask"):
            part[k] = part[k][:, pad:]
        part["position_ids"] = part["position_ids"][:, :, pad:]
        return part

    def _render(self, full_tokens: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict],
                seeds: Sequence[int]) -> np.ndarray:
        self._check_codebook(full_tokens)
        ar = self.ar
        with self.render_merged(self.decoder.denoiser):
            return render_tokens(self.decoder, full_tokens, prompts, ar.decode_steps, ar.decode_guidance_scale, seeds,
                                 metadata=metadata)

    @torch.no_grad()
    def rollout(self, prompts: Sequence[str], metadata: Sequence[dict], group_size: int, seed: int,
                first_group: int = 0, first_copy: int = 0) -> Rollout:
        """Sample ``group_size`` token sequences per prompt (copies adjacent) and render them. No grad. The tokens
        come from ``prefetch`` when it drew this call's batch, else from a sampler call of their own.

        Returns a ``Rollout`` with U = num_preview + num_full units; ``extras`` (batch first):
            input_ids, attention_mask (B, L): the left-padded prompts; image_grid_thw (B, 2, 3) (full, preview;
            for an edit: source, full); for an edit also pixel_values (B, n, C·p²) the source's patches and
            images_per_sample (B,);
            tokens (B, U); position_ids (B, 3, L + U − 1) MRoPE positions of prompt + tokens[:, :-1];
            full_tokens (B, th·tw) the decoder's condition; decode_seeds (B,) the decoder noise seeds;
            and, unbatched, num_preview and full_grid (th, tw).

        Seeds (``tandem.core.seeds``; ``seed`` is the rollout batch's, ``first_group`` the global index of the
        first prompt's group, ``first_copy`` this call's first copy within each group): each copy's tokens from its
        own seed (seed, group, copy) — the sampler draws every row from its own stream
        (``policies.ar_sampler.SeededDraws``), so a copy's tokens do not depend on the process that holds it or on
        the other rows of the batch — and the decoder noise from one seed per group, the same on every process.
        """
        seeds = RolloutSeeds(seed, first_group, first_copy)
        # 1. groups: copies of a prompt are adjacent
        prompts_rep, meta_rep, group_ids = self._groups(prompts, metadata, group_size)
        # 2. tokens with the sampler's log-probs and positions, one seed per copy
        drawn = self._take_prefetched(prompts_rep, group_size, seed, first_group, first_copy)
        if drawn is None:
            drawn = self._draw(prompts_rep, meta_rep, group_ids, group_size, seeds)
        tokens = drawn.pop("tokens")
        full_tokens = tokens[:, self.num_preview:]
        # 3. images: one decoder seed per group, so reward differences within a group come from the tokens only
        decode_seeds = [seeds.group(DECODE, g) for g in group_ids]
        images = self._render(full_tokens, prompts_rep, meta_rep, decode_seeds)
        # 4. per-segment loss weights
        b, u = tokens.shape
        mask = torch.full((b, u), float(self.ar.full_loss_weight), device=tokens.device)
        mask[:, : self.num_preview] = float(self.ar.preview_loss_weight)
        old_log_probs = drawn.pop("log_probs")
        extras = dict(drawn, tokens=tokens, full_tokens=full_tokens,
                      decode_seeds=torch.tensor(decode_seeds, dtype=torch.int64),
                      num_preview=self.num_preview, full_grid=(self.grids.th, self.grids.tw))
        return Rollout(images=images, prompts=prompts_rep, metadata=meta_rep, group_ids=group_ids,
                       old_log_probs=old_log_probs, mask=mask, extras=extras)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], metadata: Sequence[dict], seed: int) -> np.ndarray:
        """(N, H, W, 3) uint8 images at eval settings: the same sampler, one sample per prompt (prompt i is group i,
        copy 0 of ``seed``)."""
        seeds = RolloutSeeds(seed)
        _, out = self._sample_tokens(list(prompts), list(metadata), [seeds.copy(TOKENS, i, 0) for i in range(len(prompts))])
        return self._render(out.tokens[:, self.num_preview:], list(prompts), list(metadata),
                            [seed * 1000 + i for i in range(len(prompts))])

    # ------------------------------------------------------------------------------------------ learning
    def unit_chunks(self, batch: Rollout) -> List[slice]:
        """One teacher-forced forward over prompt + all generated tokens."""
        return [slice(0, batch.old_log_probs.shape[1])]

    def _logits(self, model: torch.nn.Module, extras: dict) -> torch.Tensor:
        """(B, U, V) float32 raw logits predicting each generated token, teacher-forced with generation's positions
        (and, for an edit, the rollout's source images: the model turns them into the same image tokens)."""
        device = self.model.device
        tokens = extras["tokens"].to(device)
        b, u = tokens.shape
        # left pads that every row of this minibatch has (its prompts were padded with longer ones in the rollout
        # call) are dropped: the forward's layout depends on the minibatch's own prompts, not the call's
        lead = int(extras["attention_mask"].to(torch.bool).any(0).to(torch.int8).argmax())
        prompt_mask = extras["attention_mask"][:, lead:].to(device)
        input_ids = torch.cat([extras["input_ids"][:, lead:].to(device), tokens[:, :-1]], dim=1)
        attention_mask = torch.cat([prompt_mask, torch.ones(b, u - 1, dtype=prompt_mask.dtype, device=device)], dim=1)
        position_ids = extras["position_ids"][:, :, lead:].to(device).permute(1, 0, 2)  # (3, B, L' + U - 1)
        images = {}
        if "pixel_values" in extras:
            images = dict(pixel_values=extras["pixel_values"].to(device).flatten(0, 1),
                          image_grid_thw=extras["image_grid_thw"].to(device).flatten(0, 1),
                          images_per_sample=extras["images_per_sample"].to(device))
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=u, **images)
        return out.logits.float()

    def log_probs(self, batch: Rollout, chunk: slice, with_kl: bool) -> LogProbs:
        """(B, u) log-probs of the sampled tokens in ``chunk`` under the current weights (with grad), and the
        per-token k3 KL to the reference when ``with_kl`` (module docstring: which distribution, and why)."""
        extras = batch.extras
        tokens = extras["tokens"].to(self.model.device)
        train_mode = self.settings.gradient_checkpointing  # HF checkpoints only in train mode (no dropout here)
        self.model.train(train_mode)
        try:
            logp = self.processing.token_log_probs(self._logits(self.model, extras), tokens)[:, chunk]
        finally:
            self.model.eval()
        kl = None
        if with_kl:
            from tandem.policies.kl import k3_kl

            with torch.no_grad():
                if self._peft is not None:
                    with self._peft.disable_adapter():
                        ref_logits = self._logits(self.model, extras)
                else:
                    ref_logits = self._logits(self._ref_model, extras)
                ref_logp = self.processing.token_log_probs(ref_logits, tokens)[:, chunk]
            kl = k3_kl(logp, ref_logp)
        return LogProbs(log_probs=logp, kl=kl)

    # ------------------------------------------------------------------------------------------ weights
    def on_optimizer_step(self) -> None:
        """No EMA for the AR stage."""
