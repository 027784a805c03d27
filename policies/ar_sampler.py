"""Token sampling for the AR policy: the logits processing and a swappable decode loop.

Two pieces, so that a faster decode loop (static KV cache, CUDA graphs) can replace ``generate`` without
touching the policy or the trainer:

* ``LogitsProcessing`` — the sampler's distribution. For raw logits ``ℓ`` (…, V) it applies, in this order
  (the order of transformers' ``GenerationMixin._get_logits_processor``):

      suppress:     ℓ_j ← −inf for j in ``suppress_ids``
      temperature:  z = ℓ / T                                   (skipped when T == 1)
      top-k:        z_j ← −inf unless z_j ≥ k-th largest z      (skipped when k == 0)
      top-p:        z_j ← −inf unless the mass of tokens at most as likely as j exceeds 1 − p
                                                                (skipped when p == 1)

  and the sampler's log-prob of token a is ``log_softmax(z)[a]``. It uses transformers' own warper classes
  (suppress: the same ``torch.where`` with the id mask built once), so the recompute is bit-identical to what
  ``generate`` sampled from (docs/glm_image_facts.md, "Exact AR log-probs").

* ``SeededDraws`` — the sampling step, one seed per row (a copy of a prompt): row i's token at step t is drawn
  from softmax(z_t) by inversion with the uniform u_{i,t} of its own stream (``row_uniforms``). A row's tokens
  therefore depend on its prompt and its seed only — not on which other rows share the batch, their order, the
  process that holds it or the device — so N processes holding a group's copies sample what one process holding
  them all samples (the seeds come from ``tandem.core.seeds``: rollout seed, group, copy).

* ``TokenSampler`` — the decode loop: prompt batch and one seed per row in, ``SampledTokens`` out (tokens, the
  processed log-probs of the sampled tokens, and the 3-D MRoPE positions every fed token used).
  ``GenerateSampler`` is the reference implementation over ``model.generate``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Protocol, Sequence

import torch

__all__ = ["LogitsProcessing", "SeededDraws", "SampledTokens", "TokenSampler", "GenerateSampler", "capture_rope_positions",
           "inverse_cdf", "row_uniforms"]


# --------------------------------------------------------------------------------------------------- processing
@dataclass(frozen=True)
class LogitsProcessing:
    """The sampler's logits processing: suppress → temperature → top-k → top-p (module docstring)."""

    suppress_ids: Sequence[int] = ()
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (greedy decoding is top_k=1)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p} (1.0 disables nucleus sampling)")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k} (0 disables top-k)")

    def processors(self, device: torch.device) -> list:
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        procs = []
        if self.suppress_ids:
            procs.append(_SuppressIds(self.suppress_ids, device))
        if self.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k != 0:
            procs.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if self.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        return procs

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed scores (…, V) float32 of raw logits (…, V); −inf outside the sampler's support."""
        shape = logits.shape
        scores = logits.float().reshape(-1, shape[-1])  # the warpers index dim 1
        for proc in self.processors(logits.device):
            scores = proc(None, scores)
        return scores.view(shape)

    def token_log_probs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log π(a) (…) of ``tokens`` (…) under the processed distribution of ``logits`` (…, V); differentiable.

        The support (which tokens survive suppress/top-k/top-p) is taken from ``logits`` themselves, with the
        scored token always added back: log π(a) = z_a − logsumexp_{j ∈ S(ℓ) ∪ {a}} z_j, z = suppress(ℓ)/T.
        When a ∈ S(ℓ) — always at the first on-policy iteration in fp32 — this is exactly
        ``log_softmax(self(logits))[a]``; otherwise it is finite (no −inf from a nucleus that moved by a
        rounding error in bf16 or after an update). The support is a non-differentiable choice (no_grad); the
        gradient flows through the kept logits.
        """
        tokens = tokens.unsqueeze(-1)
        with torch.no_grad():
            keep = torch.isfinite(self(logits.detach()))
            keep.scatter_(-1, tokens, True)
        z = logits.float()
        if self.suppress_ids:  # suppressed ids stay out even when "added back": a suppressed id is never sampled
            suppressed = torch.zeros(z.shape[-1], dtype=torch.bool, device=z.device)
            suppressed[list(self.suppress_ids)] = True
            keep &= ~suppressed
        if self.temperature != 1.0:
            z = z / self.temperature
        z = z.masked_fill(~keep, float("-inf"))
        return torch.log_softmax(z, dim=-1).gather(-1, tokens).squeeze(-1)


class _SuppressIds:
    """ℓ_j ← −inf for j in ``ids``: the values of transformers' ``SuppressTokensLogitsProcessor`` (``torch.where``
    over an id mask), with the mask built once per vocabulary size instead of by ``torch.isin`` on every call
    (which sorts on CUDA and waits for the GPU: once per decode step)."""

    def __init__(self, ids: Sequence[int], device: torch.device):
        self.ids = torch.tensor(list(ids), device=device)
        self.mask: Optional[torch.Tensor] = None

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        if self.mask is None or self.mask.shape[0] != scores.shape[-1]:
            self.mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            self.mask[self.ids.to(scores.device)] = True
        return torch.where(self.mask, -float("inf"), scores)


# --------------------------------------------------------------------------------------------------- draws
def row_uniforms(seeds: Sequence[int], num_tokens: int, device: torch.device) -> torch.Tensor:
    """(B, U) float64 uniforms in [0, 1): row i is ``torch.rand(U)`` of ``torch.Generator().manual_seed(seeds[i])``
    on the CPU, so it depends on that seed only (not on the batch, the process or the device)."""
    rows = [torch.rand(num_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


def inverse_cdf(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) ids drawn from softmax(``scores``) (B, V) by inversion with uniforms ``u`` (B,):

        a = min{ j : F_j > u · F_V },   F = cumsum(softmax(scores)) in float64.

    Exact sampling for u ~ U[0, 1); a token of probability 0 (−inf score) is never drawn (F_j = F_{j−1}). If
    u · F_V rounds up to F_V, the last token of positive probability is taken (``argmax`` of F: its first maximum).
    """
    cdf = torch.softmax(scores, dim=-1, dtype=torch.float64).cumsum(-1)
    first_above = (cdf <= u.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]).sum(-1)
    return torch.minimum(first_above, cdf.argmax(-1))


class SeededDraws:
    """The sampling step of a decode loop with one seed per row: ``draws(raw)`` → (scores, tokens).

    At step t, for raw logits ℓ_t (B, V): z_t = LogitsProcessing(ℓ_t) (float32, processors built once), and row i
    draws a_{i,t} = inverse_cdf(z_{i,t}, u_{i,t}) with u = ``row_uniforms(seeds, U)``. The stored log-prob is
    ``log_softmax(z_t)[a_t]``, as before: only the source of randomness is per row.
    """

    def __init__(self, processing: LogitsProcessing, seeds: Sequence[int], num_tokens: int, batch: int,
                 device: torch.device):
        if len(seeds) != batch:
            raise ValueError(f"one seed per prompt row: got {len(seeds)} seeds for a batch of {batch}")
        self.procs = processing.processors(device)
        self.uniforms = row_uniforms(seeds, num_tokens, device)
        self.t = 0

    def __call__(self, raw: torch.Tensor):
        """Processed scores (B, V) float32 and sampled ids (B,) of the next step for raw logits ``raw`` (B, V)."""
        scores = raw.float()
        for proc in self.procs:
            scores = proc(None, scores)
        tokens = inverse_cdf(scores, self.uniforms[:, self.t])
        self.t += 1
        return scores, tokens


class _DrawInGenerate:
    """A ``generate`` logits processor that makes the choice itself: it draws with ``SeededDraws``, keeps the
    processed scores, and returns scores that are 0 at the drawn token and −inf elsewhere, so greedy decoding
    (``do_sample=False``: argmax, no RNG) takes exactly that token."""

    def __init__(self, draws: SeededDraws):
        self.draws = draws
        self.scores: List[torch.Tensor] = []

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        processed, tokens = self.draws(scores)
        self.scores.append(processed)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens[:, None], 0.0)


# --------------------------------------------------------------------------------------------------- sampler
@dataclass
class SampledTokens:
    """Output of a ``TokenSampler`` for a batch of B prompts of padded length L, U new tokens each.

    Attributes:
        tokens: (B, U) int64 sampled ids.
        log_probs: (B, U) float32 sampler log-probs: ``log_softmax(processed logits)`` at ``tokens``.
        position_ids: (B, 3, L + U − 1) int64 MRoPE (t, h, w) positions of every token fed to the model:
            the prompt, then the first U − 1 sampled tokens (the last sampled token is never fed).
        raw_logits: (B, U, V) float32 unprocessed logits, only when the sampler was asked to keep them.
    """

    tokens: torch.Tensor
    log_probs: torch.Tensor
    position_ids: torch.Tensor
    raw_logits: Optional[torch.Tensor] = None


class TokenSampler(Protocol):
    """A decode loop: ``inputs`` are the processor outputs (input_ids, attention_mask, image_grid_thw, …) of B
    prompt rows; ``seeds`` one seed per row (``SeededDraws``): a row's tokens depend on its prompt and seed only."""

    def __call__(self, model, inputs: Mapping[str, torch.Tensor], num_tokens: int, processing: LogitsProcessing,
                 seeds: Sequence[int]) -> SampledTokens: ...


@contextmanager
def capture_rope_positions(model) -> Iterator[List[torch.Tensor]]:
    """Record the (3, B, S) position ids every forward of ``model``'s text model passes to its rotary embedding.

    Works for any transformers decoder whose text model calls ``rotary_emb(x, position_ids)`` once per forward
    (GLM-Image does); the records are exactly the positions the attention used.
    """
    records: List[torch.Tensor] = []
    rotary = model.get_decoder().rotary_emb if hasattr(model, "get_decoder") else model.model.language_model.rotary_emb

    def hook(module, args, kwargs):
        pos = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        records.append(pos.expand(3, -1, -1).detach().clone())

    handle = rotary.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield records
    finally:
        handle.remove()


class GenerateSampler:
    """``TokenSampler`` over transformers' ``generate`` (dynamic KV cache): the reference implementation.

    ``generate`` runs greedy (``do_sample=False``) with one extra logits processor that draws each row's token
    with ``SeededDraws`` (its own seed, not the global RNG, which is left untouched) and hands back a one-hot
    choice, so ``generate`` keeps only the KV cache, the positions and the stopping. Log-probs come from the
    processed scores that processor drew from; positions from a hook on the rotary embedding. On its first call
    (``check_processing``) it also verifies that ``LogitsProcessing`` applied to the raw logits reproduces those
    scores — a model ``generation_config`` that adds a processor of its own (repetition penalty, …) would
    silently break the on-policy ratio otherwise.
    """

    def __init__(self, keep_raw_logits: bool = False, check_processing: bool = True):
        self.keep_raw_logits = keep_raw_logits
        self.check_processing = check_processing

    @torch.no_grad()
    def __call__(self, model, inputs: Mapping[str, torch.Tensor], num_tokens: int, processing: LogitsProcessing,
                 seeds: Sequence[int]) -> SampledTokens:
        from transformers import GenerationConfig, LogitsProcessorList

        gen = model.generation_config
        check = self.check_processing
        config = GenerationConfig(  # greedy; temperature/top-k/top-p at transformers' greedy defaults, so the
            # model's own sampling settings are neither inherited nor warned about (``draw`` applies ``processing``)
            do_sample=False, temperature=1.0, top_k=50, top_p=1.0,
            max_new_tokens=num_tokens, min_new_tokens=num_tokens, num_beams=1,
            eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id, bos_token_id=gen.bos_token_id,
            use_cache=True, return_dict_in_generate=True, output_logits=self.keep_raw_logits or check,
        )
        input_ids = inputs["input_ids"]
        draw = _DrawInGenerate(SeededDraws(processing, seeds, num_tokens, input_ids.shape[0], input_ids.device))
        with capture_rope_positions(model) as positions:
            out = model.generate(**inputs, generation_config=config, logits_processor=LogitsProcessorList([draw]))
        tokens = out.sequences[:, input_ids.shape[1]:]
        if tokens.shape[1] != num_tokens:
            raise RuntimeError(f"generate returned {tokens.shape[1]} tokens, expected {num_tokens}; an end marker "
                               f"was sampled early — add it to the suppressed ids")
        scores = torch.stack(draw.scores, dim=1)  # (B, U, V) processed, fp32
        log_probs = torch.log_softmax(scores, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        raw = torch.stack(out.logits, dim=1) if out.logits is not None else None
        if check:
            _check_same_processing(processing(raw), scores)
            self.check_processing = False
        position_ids = torch.cat(positions[:num_tokens], dim=-1).permute(1, 0, 2).contiguous()
        return SampledTokens(tokens=tokens, log_probs=log_probs.float(), position_ids=position_ids,
                             raw_logits=raw if self.keep_raw_logits else None)


def _check_same_processing(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-3,
                           max_support_mismatch: float = 1e-3) -> None:
    """Raise unless ``LogitsProcessing`` reproduces ``generate``'s processed scores (B, U, V).

    On CPU in fp32 the two agree exactly. On CUDA in bf16 they may not: logits tied at the top-p boundary sort
    differently for the stacked (B*U, V) recompute than for generate's per-step (B, V), moving a few tokens in or
    out of the nucleus, and fp32 values differ by rounding. Those are tolerated: at most ``max_support_mismatch``
    of the entries may differ in being kept, and the values kept by both must agree within ``tol``. A real
    extra processor (repetition penalty, no-repeat n-grams, bad words) moves many values or many tokens and is
    caught. (Sampling-only warpers of the model's config — min-p, typical-p — never run: ``generate`` is greedy.)
    """
    kept_ours, kept_theirs = torch.isfinite(ours), torch.isfinite(theirs)
    mismatch = (kept_ours != kept_theirs).float().mean().item()
    both = kept_ours & kept_theirs
    if mismatch > max_support_mismatch or not torch.allclose(ours[both], theirs[both], rtol=tol, atol=tol):
        raise RuntimeError(
            "generate applied logits processing that LogitsProcessing (suppress → temperature → top-k → top-p) "
            "does not reproduce; the stored log-probs would not be those of the training recompute. Remove the "
            "extra options (repetition_penalty, no_repeat_ngram_size, bad_words_ids, …) from the model's "
            "generation_config.json"
        )


def prompt_inputs(inputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The processor outputs ``generate`` takes (drops keys it does not); an edit's source images travel as
    ``pixel_values`` (the model turns them into the image tokens that replace the prompt's placeholders)."""
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "images_per_sample")
    return {k: inputs[k] for k in keys if k in inputs}
