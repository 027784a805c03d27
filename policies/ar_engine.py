"""A fast AR decode loop for GLM-Image: static KV cache, explicit 3-D MRoPE positions, optional CUDA graph.

``StaticCacheSampler`` is a ``TokenSampler`` (``tandem.policies.ar_sampler``): same call, same ``SampledTokens``,
same distribution and stored log-probs as ``GenerateSampler`` (transformers ``generate``), so the AR policy's
training recompute is unchanged when it is swapped in (``ar.sampler: engine``). Per call:

1. positions — the prompt's from the model's ``get_rope_index``; the U − 1 decode positions by the grid rule of
   docs/glm_image_facts.md ("Exact AR log-probs"), all before the first forward (``decode_positions``);
2. a static KV cache (B, kv_heads, S, head_dim) per layer, S = L + U − 1 rounded up, and a (B, S) mask of the
   slots that hold a real token;
3. prefill over the prompt with the model's own modules; a LoRA model runs with its adapters merged into the base
   weights for the call and restored exactly after (``merge_lora``, ``policies.lora.MergedLoRA``): the decode
   step then reads each weight once, with no adapter matmuls beside it;
4. decode: per step, suppress → temperature → top-k → top-p on the float32 raw logits and one draw per row
   from the row's own seed (``SeededDraws``, the same step as ``GenerateSampler``'s: equal scores give equal
   tokens; the global RNG is not used), the stored log-prob is ``log_softmax(scores)`` at the token; the next
   step attends to the cache through ``static_decode_attention`` (K/V read once per kv head), eagerly or as one
   captured CUDA graph (``use_cuda_graph``; call ``reset()`` after re-allocating parameters or toggling
   adapters). The draw runs eagerly between steps, outside the graph.

The design, the numerics against ``generate`` and the CUDA-graph rules are in docs/ar_engine.md.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence, Tuple

import torch

from tandem.policies.ar_sampler import LogitsProcessing, SampledTokens, SeededDraws
from tandem.policies.lora import MergedLoRA

logger = logging.getLogger(__name__)

__all__ = ["StaticCacheSampler", "decode_attention", "decode_positions", "decode_step", "prompt_positions",
           "static_decode_attention"]


# --------------------------------------------------------------------------------------------------- positions
def _unwrap(model):
    """The ``GlmImageForConditionalGeneration`` under a peft wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prompt_positions(model, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(3, B, L) MRoPE positions of the prompt, from the model's own ``get_rope_index`` (what ``generate``'s
    prefill uses). Note: ``get_rope_index`` also overwrites the model's cached decode positions; nothing here
    reads them."""
    inner = _unwrap(model).model
    pos, _ = inner.get_rope_index(inputs["input_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                                  images_per_sample=inputs.get("images_per_sample"),
                                  attention_mask=inputs.get("attention_mask"))
    return pos


def decode_positions(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], prompt_pos: torch.Tensor,
                     image_grid_thw: torch.Tensor, images_per_sample: Optional[torch.Tensor],
                     image_end_token_id: int, num: int) -> torch.Tensor:
    """(B, 3, num) positions of the first ``num`` generated tokens fed back (docs/glm_image_facts.md rule).

    Per sample: the grids to generate are its last ``len(grids) − (end markers in the prompt)`` grids, taken in
    reverse order; base b = last prompt position + 1; a grid (h, w) at b gives (b, b + row, b + col) for its
    tokens in row-major order, then b += max(h, w); the end marker gets (b, b, b). Grids are split per sample
    by ``images_per_sample`` (all grids belong to every sample when it is None, as in ``get_rope_index``).
    """
    b = input_ids.shape[0]
    device = input_ids.device
    if images_per_sample is not None:
        per_sample = torch.split(image_grid_thw, [int(n) for n in images_per_sample.tolist()])
    else:
        per_sample = [image_grid_thw] * b
    out = torch.empty(b, 3, num, dtype=torch.long, device=device)
    for i in range(b):
        ids = input_ids[i] if attention_mask is None else input_ids[i][attention_mask[i].bool()]
        complete = int((ids == image_end_token_id).sum())
        grids = per_sample[i].tolist()
        todo = grids[complete:][::-1]
        base = int(prompt_pos[0, i, -1]) + 1
        t_list, h_list, w_list = [], [], []
        for _, h, w in todo:
            rows = torch.arange(h, device=device).repeat_interleave(w)
            cols = torch.arange(w, device=device).repeat(h)
            t_list.append(torch.full((h * w,), base, device=device, dtype=torch.long))
            h_list.append(base + rows)
            w_list.append(base + cols)
            base += max(h, w)
        end = torch.tensor([base], device=device, dtype=torch.long)
        pos = torch.stack([torch.cat(t_list + [end]), torch.cat(h_list + [end]), torch.cat(w_list + [end])])
        if pos.shape[1] < num:
            raise ValueError(f"sample {i}: its grids {todo} give {pos.shape[1]} decode positions, {num} requested")
        out[i] = pos[:, :num]
    return out


# --------------------------------------------------------------------------------------------------- attention
DECODE_ATTENTION = "tandem_static_decode"


def static_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """One query token over the static cache: o = softmax(q·Kᵀ·scaling, masked to the valid slots) V.

    query (B, H, 1, d), key/value (B, Hkv, S, d), ``attention_mask`` the (B, 1, 1, S) bool of valid slots. The
    H / Hkv query heads sharing a key/value head are packed into one (B, Hkv, H/Hkv, d) query, so K and V are
    read once (grouped-query attention without ``repeat_kv``). Returns (B, 1, H, d) as transformers' attention
    functions do.
    """
    b, h, q_len, d = query.shape
    kv = key.shape[1]
    q = query.reshape(b, kv, h // kv * q_len, d)
    scores = torch.matmul(q, key.transpose(2, 3)).float() * (scaling if scaling is not None else d**-0.5)
    probs = torch.softmax(scores.masked_fill(~attention_mask, float("-inf")), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)
    return out.reshape(b, h, q_len, d).transpose(1, 2).contiguous(), None


def _register_decode_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, static_decode_attention)


_register_decode_attention()


@contextmanager
def decode_attention(parts: "_Parts") -> Iterator[None]:
    """Run the text model's attention layers with ``static_decode_attention`` inside the block."""
    config = parts.config
    previous = config._attn_implementation
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


# --------------------------------------------------------------------------------------------------- cache
class _StaticKV:
    """Preallocated per-layer K/V buffers with the one method the GLM-Image attention calls: ``update``.

    ``slot`` (long tensor) says which cache slots the current forward's keys go to; ``kv_len`` how many slots
    the attention reads (the prompt length at prefill, the whole cache at decode).
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, length: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slot: torch.Tensor = torch.zeros(1, dtype=torch.long, device=device)
        self.kv_len = length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        k.index_copy_(2, self.slot, key_states.to(k.dtype))
        v.index_copy_(2, self.slot, value_states.to(v.dtype))
        return k[:, :, : self.kv_len], v[:, :, : self.kv_len]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class _Parts:
    """The modules of the text decoder that one forward uses."""

    embed: torch.nn.Module
    rotary: torch.nn.Module
    layers: Sequence[torch.nn.Module]
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    cache_kw: str
    attn_impl: str
    num_kv_heads: int
    head_dim: int
    config: object

    @classmethod
    def of(cls, model) -> "_Parts":
        base = _unwrap(model)
        text = base.model.language_model
        cfg = text.config
        impl = getattr(cfg, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            raise NotImplementedError(f"StaticCacheSampler supports attn_implementation 'sdpa' or 'eager', not {impl!r}; "
                                      f"load the model with one of them or use GenerateSampler")
        params = inspect.signature(text.layers[0].forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x renamed it
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(text.embed_tokens, text.rotary_emb, list(text.layers), text.norm, base.lm_head, cache_kw, impl,
                   cfg.num_key_value_heads, head_dim, cfg)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: _StaticKV
                ) -> torch.Tensor:
        """(B, V) raw logits at the last position of ``input_ids`` (B, S); ``position_ids`` (3, B, S)."""
        h = self.embed(input_ids)
        pe = self.rotary(h, position_ids)
        kw = {self.cache_kw: cache}
        for layer in self.layers:
            h = layer(h, position_embeddings=pe, attention_mask=mask, **kw)
        return self.lm_head(self.norm(h[:, -1:]))[:, -1]

    def attn_mask(self, allowed: torch.Tensor, dtype) -> torch.Tensor:
        """The attention's mask for an (B, 1, Q, K) bool ``allowed``: bool for sdpa, additive for eager."""
        if self.attn_impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # inductor's own CUDA graphs would nest in ours


def decode_step(parts: _Parts, tok: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor,
                cache: _StaticKV) -> torch.Tensor:
    """One decode step: mark cache ``slot`` valid, run token ids ``tok`` (B, 1) at positions ``pos`` (3, B, 1) over
    the whole static cache, return the (B, V) raw logits. The unit that is compiled and captured; runs inside
    ``decode_attention`` (the mask is the bool of valid slots)."""
    cache.slot, cache.kv_len = slot, valid.shape[1]
    valid.index_fill_(1, slot, True)
    return parts.forward(tok, pos, valid[:, None, None, :], cache)


class _Graph:
    """A captured decode step over a static cache, with its static input buffers."""

    def __init__(self, step, parts: _Parts, cache: _StaticKV, valid: torch.Tensor):
        b, device = valid.shape[0], valid.device
        self.step, self.parts, self.cache, self.valid = step, parts, cache, valid
        self.tok = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(3, b, 1, dtype=torch.long, device=device)
        self.slot = torch.full((1,), valid.shape[1] - 1, dtype=torch.long, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None

    def _step(self) -> torch.Tensor:
        return self.step(self.parts, self.tok, self.pos, self.valid, self.slot, self.cache)

    def capture(self, warmup: int = 2) -> None:
        """Warm up on a side stream (this is where a compiled step compiles), then capture. Both write garbage into
        the last cache slot and mark it valid; the caller resets ``valid`` afterwards (every slot is rewritten
        before it is unmasked)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, slot: int) -> torch.Tensor:
        self.tok.copy_(tok.view(-1, 1))
        self.pos.copy_(pos)
        self.slot.fill_(slot)
        self.graph.replay()
        return self.logits


# --------------------------------------------------------------------------------------------------- sampler
class StaticCacheSampler:
    """``TokenSampler`` with a hand-written decode loop over a static KV cache (module docstring).

    Args:
        use_cuda_graph: capture one decode step as a CUDA graph and replay it (CUDA models only; on other
            devices the eager loop runs).
        pad_prompt_to: left-pad prompts to a multiple of this length internally (the outputs keep the caller's
            L); default 64 with the CUDA graph (one graph serves prompts of nearby lengths), else 1.
        keep_raw_logits: also return the (B, U, V) float32 raw logits.
        graph_warmup: eager warm-up steps before the capture.
        compile: run the decode step through ``torch.compile`` (inductor, static shapes, no inductor CUDA graphs:
            the graph above captures the compiled kernels). Fuses the norms, rotary and activation kernels of
            the 40 layers; compiles once per (batch, cache length) on the first call.
        compile_mode: ``torch.compile`` mode of that step: ``"default"`` or ``"max-autotune-no-cudagraphs"``
            (inductor benchmarks Triton GEMM templates against cuBLAS for each matmul shape; a slower first call).
        merge_lora: run a peft LoRA model with its active adapters merged into the base weights during the call
            (exactly restored after; the saved weights stay allocated between calls). Same distribution up to
            the rounding of W + ΔW; the training forward recomputes the old log-probs either way.
        cache_bucket: with the CUDA graph, the KV cache length is rounded up to a multiple of this, so prompts of
            different lengths share one captured (and compiled) step per batch size: a new shape costs a capture
            and, with ``compile``, a compilation, while masked slots cost only their K/V reads.
    """

    def __init__(self, use_cuda_graph: bool = False, pad_prompt_to: Optional[int] = None, keep_raw_logits: bool = False,
                 graph_warmup: int = 2, compile: bool = False, compile_mode: str = "default", cache_bucket: int = 256,
                 merge_lora: bool = True):
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        self.use_cuda_graph = use_cuda_graph
        self.step = torch.compile(decode_step, dynamic=False, mode=compile_mode) if compile else decode_step
        self.pad_prompt_to = pad_prompt_to
        self.keep_raw_logits = keep_raw_logits
        self.graph_warmup = graph_warmup
        self.cache_bucket = cache_bucket
        self.merged = MergedLoRA(enabled=merge_lora)
        self._state: Optional[Tuple[tuple, _Graph]] = None

    def reset(self) -> None:
        """Drop the captured graph, its buffers and the KV cache."""
        self._state = None

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _check_processing(model, processing: LogitsProcessing) -> None:
        eos = _unwrap(model).generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        missing = sorted(set(eos) - set(processing.suppress_ids))
        if missing:  # generate (min_new_tokens) would mask them; this loop never stops early
            raise ValueError(f"the end marker(s) {missing} must be in processing.suppress_ids: the sampler writes exactly "
                             f"num_tokens grid tokens")

    def _padded(self, inputs: Mapping[str, torch.Tensor], pos: torch.Tensor, graph: bool, pad_id: int):
        """input_ids, attention_mask (B, Lp) and prompt positions (3, B, Lp), left-padded to a multiple of
        ``pad_prompt_to``, and that multiple (the cache length is rounded up to it too)."""
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        multiple = self.pad_prompt_to or (64 if graph else 1)
        extra = (-ids.shape[1]) % multiple
        if extra:
            b = ids.shape[0]
            ids = torch.cat([torch.full((b, extra), pad_id, dtype=ids.dtype, device=ids.device), ids], 1)
            mask = torch.cat([torch.zeros(b, extra, dtype=mask.dtype, device=mask.device), mask], 1)
            pos = torch.cat([torch.ones(3, b, extra, dtype=pos.dtype, device=pos.device), pos], 2)  # pads: 1, as HF
        return ids, mask, pos, multiple

    def _graph_for(self, model, parts: _Parts, b: int, length: int, dtype, device) -> _Graph:
        """The captured decode step of batch ``b`` over a cache of ``length`` slots: one per (model, batch, cache
        length), whatever the prompt length (prefill writes the prompt's slots outside the graph)."""
        fingerprint = hash(tuple(p.data_ptr() for p in model.parameters()))
        key = (id(model), fingerprint, b, length, dtype, device)
        if self._state is not None and self._state[0] == key:
            return self._state[1]
        self._state = None  # free the old cache and graph before allocating new ones
        cache = _StaticKV(len(parts.layers), b, parts.num_kv_heads, length, parts.head_dim, dtype, device)
        valid = torch.zeros(b, length, dtype=torch.bool, device=device)
        g = _Graph(self.step, parts, cache, valid)
        with decode_attention(parts):
            g.capture(self.graph_warmup)
        self._state = (key, g)
        return g

    # ------------------------------------------------------------------------------------------ the loop
    @torch.no_grad()
    def __call__(self, model, inputs: Mapping[str, torch.Tensor], num_tokens: int, processing: LogitsProcessing,
                 seeds: Sequence[int]) -> SampledTokens:
        self._check_inputs(model, inputs, num_tokens, processing)
        with self.merged(model):
            return self._sample(model, inputs, num_tokens, processing, seeds)

    def _sample(self, model, inputs: Mapping[str, torch.Tensor], num_tokens: int, processing: LogitsProcessing,
                seeds: Sequence[int]) -> SampledTokens:
        parts = _Parts.of(model)
        device = inputs["input_ids"].device
        draws = SeededDraws(processing, seeds, num_tokens, inputs["input_ids"].shape[0], device)
        graph_on = self.use_cuda_graph and device.type == "cuda"
        ppos, dpos, position_ids = self._positions(model, inputs, num_tokens)  # 1. positions
        ids, cache, valid, graph = self._cache(model, parts, inputs, ppos, num_tokens, graph_on)  # 2. cache, mask
        logits = self._prefill(parts, ids[0], ids[1], cache, valid)  # 3. prefill
        with decode_attention(parts):  # 4. decode (a graph replay needs none; the eager step does)
            tokens, log_probs, raw = self._decode(parts, logits, dpos, num_tokens, draws, cache, valid, graph,
                                                  ids[0].shape[1])
        return SampledTokens(tokens=tokens, log_probs=log_probs, position_ids=position_ids, raw_logits=raw)

    def _check_inputs(self, model, inputs: Mapping[str, torch.Tensor], num_tokens: int, processing) -> None:
        if "pixel_values" in inputs:
            raise NotImplementedError("StaticCacheSampler takes token prompts (input_ids); use GenerateSampler for "
                                      "prompts with pixel_values")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self._check_processing(model, processing)
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("prompts must be left-padded (attention_mask[:, -1] must be all ones)")

    @staticmethod
    def _positions(model, inputs: Mapping[str, torch.Tensor], num_tokens: int):
        """Prompt positions (3, B, L) from the model's get_rope_index; decode positions (3, B, U-1) by the grid
        rule; and both together as the (B, 3, L + U - 1) ``position_ids`` that training replays."""
        ppos = prompt_positions(model, inputs)
        dpos = decode_positions(inputs["input_ids"], inputs.get("attention_mask"), ppos, inputs["image_grid_thw"],
                                inputs.get("images_per_sample"), _unwrap(model).config.image_end_token_id,
                                max(num_tokens - 1, 0))  # (B, 3, U-1)
        position_ids = torch.cat([ppos.permute(1, 0, 2), dpos], dim=-1).contiguous()
        return ppos, dpos.permute(1, 0, 2).contiguous(), position_ids

    def _cache(self, model, parts: _Parts, inputs, ppos: torch.Tensor, num_tokens: int, graph_on: bool):
        """(ids, mask, positions) of the padded prompt, the static KV cache, its valid-slot mask (B, S) with the
        prompt's real tokens set, and the captured graph (or None)."""
        base = _unwrap(model)
        pad_id = base.generation_config.pad_token_id
        ids, mask, pos, multiple = self._padded(inputs, ppos, graph_on, int(pad_id if pad_id is not None else 0))
        b, lp = ids.shape
        dtype, device = parts.lm_head.weight.dtype, ids.device
        bucket = self.cache_bucket if graph_on else multiple
        length = -(-(lp + num_tokens - 1) // bucket) * bucket  # slots past the last token stay masked
        graph = None
        if graph_on and num_tokens > 1:
            graph = self._graph_for(model, parts, b, length, dtype, device)
            cache, valid = graph.cache, graph.valid
        else:
            cache = _StaticKV(len(parts.layers), b, parts.num_kv_heads, length, parts.head_dim, dtype, device)
            valid = torch.zeros(b, length, dtype=torch.bool, device=device)
        valid.zero_()
        valid[:, :lp] = mask.bool()
        return (ids, pos), cache, valid, graph

    @staticmethod
    def _prefill(parts: _Parts, ids: torch.Tensor, pos: torch.Tensor, cache: _StaticKV, valid: torch.Tensor):
        """One forward over the padded prompt (causal, pad keys masked, every query sees itself) that fills cache
        slots [0, L); returns the (B, V) logits of the last position."""
        lp, device = ids.shape[1], ids.device
        cache.slot = torch.arange(lp, device=device)
        cache.kv_len = lp
        ar = torch.arange(lp, device=device)
        causal = ar[None, :] <= ar[:, None]  # (Q, K)
        allowed = causal[None] & (valid[:, None, :lp] | torch.eye(lp, dtype=torch.bool, device=device)[None])
        return parts.forward(ids, pos, parts.attn_mask(allowed[:, None], parts.lm_head.weight.dtype), cache)

    def _decode(self, parts: _Parts, logits: torch.Tensor, dpos: torch.Tensor, num_tokens: int,
                draws: SeededDraws, cache: _StaticKV, valid: torch.Tensor, graph, lp: int):
        """Sample ``num_tokens`` tokens: process the raw logits and draw (``draws``), store log_softmax(scores) at
        the token, and run the next step (graph replay or eager) on slot L + t. Returns tokens, log-probs (B, U)
        and the raw logits (B, U, V) when ``keep_raw_logits``."""
        b, device = logits.shape[0], logits.device
        tokens = torch.empty(b, num_tokens, dtype=torch.long, device=device)
        log_probs = torch.empty(b, num_tokens, dtype=torch.float32, device=device)
        raw_out = None
        for t in range(num_tokens):
            raw = logits.float()
            if self.keep_raw_logits:
                if raw_out is None:
                    raw_out = torch.empty(b, num_tokens, raw.shape[-1], dtype=torch.float32, device=device)
                raw_out[:, t] = raw
            scores, tok = draws(raw)
            tokens[:, t] = tok
            log_probs[:, t] = torch.log_softmax(scores, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
            if t == num_tokens - 1:
                break
            slot = lp + t
            if graph is not None:
                logits = graph(tok, dpos[:, :, t: t + 1], slot)
            else:
                logits = self.step(parts, tok[:, None], dpos[:, :, t: t + 1], valid,
                                   torch.tensor([slot], device=device), cache)
        return tokens, log_probs, raw_out
