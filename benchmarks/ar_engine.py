"""Benchmark: StaticCacheSampler (policies/ar_engine.py) vs GenerateSampler at release GLM-Image AR size.

    PYTHONUNBUFFERED=1 python -m benchmarks.ar_engine --out docs/bench/ar_engine_h200.json
    .venv/bin/python -m benchmarks.ar_engine --device cpu --tiny        # CPU smoke test, not a benchmark

Same model, tokenizer, prompts, sampler and timing as ``benchmarks/ar_rollout.py`` (its helpers are
imported, not copied): release text decoder, random init, bf16; 8 prompts x 4 copies at batch 32, 1024² target;
temperature 0.9, top-p 0.75, top_k 0, ids [16384, 16512) suppressed; the first ``--tokens`` N of 1280 tokens.
decode ms/step = (T_N − T_1) / (N − 1), T_1 = prefill + one sample (median of 3), through ``bench_row``.

Rows (batch 32 unless ``--batches``):
* ``generate_sampler``: ``GenerateSampler`` as ``GlmImageARPolicy`` calls it (HF generate, dynamic cache), its
  first-call processing check off (run once separately and recorded: it can trip in bf16 on CUDA);
* ``engine_eager``: ``StaticCacheSampler()`` — static cache, explicit positions, no graph;
* ``engine_graph``: ``StaticCacheSampler(use_cuda_graph=True)``; timed after a warm-up call of N tokens, which
  captures the graph that the timed call replays (a new prompt/cache shape captures once);
* ``engine_graph_compiled`` (``--compile``): ``StaticCacheSampler(use_cuda_graph=True, compile=True)``, the graph
  of the torch.compile'd decode step (``ar.sampler: engine`` + ``ar.compile: true``); its warm-up call compiles;
* ``engine_graph_lora`` (``--lora-row``): the graph path on a ``GlmImageARPolicy`` with LoRA on q/k/v/o_proj at
  configs/glm_image/ar.yaml's r64, alpha 128, B random (as after training), adapters merged per call (the sampler's
  default), and ``engine_graph_lora_unmerged`` (``merge_lora=False``: the adapter matmuls in every step); with
  ``--compile`` also ``engine_graph_compiled_lora`` and ``engine_graph_compiled_lora_unmerged``;
* ``engine_graph_autotune`` (``--autotune``): the compiled row with ``compile_mode="max-autotune-no-cudagraphs"``
  (inductor picks Triton GEMM templates or cuBLAS per matmul shape by timing them).

Checks written beside the timings (``checks``): the graph path's tokens equal the eager engine's under one
seed (same kernels: bit-identical in any dtype); token agreement with ``GenerateSampler`` under the same seed
(the same per-row draws, but bf16 rounding of a differently-shaped attention lets paths diverge after a while);
and |Δ log-prob| between each sampler's stored log-probs and ``GlmImageARPolicy``'s teacher-forced recompute
(no grad), i.e. how far the first-iteration ratio is from 1 in bf16.
"""

from __future__ import annotations

import sys
from typing import Dict, List

import torch

from benchmarks import ar_rollout as R  # model, tokenizer, policy and timing helpers
from benchmarks import common as C
from tandem.policies.ar_engine import StaticCacheSampler
from tandem.policies.ar_sampler import GenerateSampler
from tandem.policies.lora import MergedLoRA


@torch.no_grad()
def recompute_gap(policy, inputs, out) -> Dict[str, float]:
    """Stored log-probs vs GlmImageARPolicy's teacher-forced recompute (the first-iteration ratio's log)."""
    extras = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], tokens=out.tokens,
                  position_ids=out.position_ids)
    logp = policy.processing.token_log_probs(policy._logits(policy.model, extras), out.tokens.to(policy.model.device))
    d = (logp - out.log_probs.to(logp.device)).abs()
    return dict(mean_abs=float(d.mean()), max_abs=float(d.max()), frac_over_1e_2=float((d > 1e-2).float().mean()))


def agreement(a, b) -> Dict[str, float]:
    same = (a.tokens == b.tokens)
    first = [int((~row).nonzero()[0]) if (~row).any() else row.numel() for row in same]
    return dict(frac_equal=float(same.float().mean()), first_divergence_mean=sum(first) / len(first),
                first_divergence_min=min(first), identical_rows=sum(f == same.shape[1] for f in first),
                positions_equal=bool(torch.equal(a.position_ids, b.position_ids)))


def arguments(ap) -> None:
    ap.add_argument("--tokens", type=int, default=None, help="tokens per timed call (default 512; tiny 16)")
    ap.add_argument("--batches", type=int, nargs="*", default=None, help="batch sizes (default 32; tiny 2)")
    ap.add_argument("--graph-batches", type=int, nargs="*", default=None, help="extra batches for the graph row")
    ap.add_argument("--lora-row", action="store_true")
    ap.add_argument("--compile", action="store_true", help="add the compiled-step graph rows")
    ap.add_argument("--autotune", action="store_true", help="add the max-autotune compiled-step graph row")
    ap.add_argument("--skip-eager", action="store_true", help="no engine_eager row")
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="untimed GenerateSampler call before the rows (default 64; tiny 4)")


def run(bench: C.Bench) -> None:
    args, device, dtype = bench.args, bench.device, bench.dtype
    bench.default("tokens", 512, 16)
    bench.default("batches", [32], [2])
    bench.default("warmup_tokens", 64, 4)
    n = args.tokens
    ids = R.TINY if args.tiny else R.RELEASE

    torch.manual_seed(0)
    tokenizer = R.build_tokenizer(ids)
    processor = R.build_processor(tokenizer)
    model, build_s = C.timed(lambda: R.build_model(tokenizer, ids, args.tiny, device, dtype), device)
    wb = R.decode_weight_bytes(model)
    roofline_s = wb["decode_weight_bytes"] / C.HBM_BYTES_PER_S
    print(f"built model in {build_s:.1f}s; attn {model.config.text_config._attn_implementation}; "
          f"roofline {roofline_s * 1e3:.2f} ms/step", flush=True)
    policy = R.build_policy(model, processor, device, lora=False)
    res = bench.results
    res.set("setup", dict(dtype=str(dtype), tiny=args.tiny, tokens_timed=n, tokens_per_image=policy.num_units,
                          attn_implementation=model.config.text_config._attn_implementation, roofline_ms=roofline_s * 1e3,
                          sampler=dict(temperature=0.9, top_p=0.75, top_k=0), **wb))

    adapter = policy.adapter

    def inputs_for(batch: int):
        return R.prompt_batch(adapter, batch)

    rows: List[Dict[str, object]] = []
    outs: Dict[tuple, object] = {}
    record = R.recorder(rows, res)

    def timed_row(name, pol, sampler, batch, graph: bool):
        inputs = inputs_for(batch)
        keep: Dict[int, object] = {}
        try:
            row = R.bench_row(name, R.sampler_fn(pol, inputs, sampler, keep), inputs, device, n, n if graph else 8,
                              roofline_s, model, t1_first=graph)
        except Exception as e:  # noqa: BLE001 - a failing row is a result too
            res.add("failures", dict(row=name, batch=batch, error=f"{type(e).__name__}: {str(e)[:600]}"))
            print(f"{name} b{batch} FAILED: {type(e).__name__}: {str(e)[:600]}", flush=True)
            return None
        if graph and getattr(sampler, "_state", None) is not None:
            row["kv_cache_gib"] = sampler._state[1].cache.nbytes() / 2**30
        record(row)
        outs[(name, batch)] = (inputs, keep.get(n))
        return keep.get(n)

    big = max(args.batches)
    # device warm-up (clocks, allocator, kernels' first launches): a first timed row is otherwise inflated
    # (docs/bench/ar_rollout_order_h200.json)
    inputs = inputs_for(big)
    _, warm_s = C.timed(lambda: GenerateSampler(check_processing=False)(policy.model, inputs, args.warmup_tokens,
                                                                         policy.processing, R.row_seeds(0, big)), device)
    res.set("device_warmup", dict(tokens=args.warmup_tokens, batch=big, seconds=warm_s))
    # GenerateSampler's first-call check (LogitsProcessing on the stacked (B·U, V) raw logits == generate's
    # per-step scores, bit for bit) is recorded, not enforced: on the H200 in bf16 it raised at batch 32
    # (docs/bench/ar_engine_h200.json, first run), most likely a nucleus-boundary difference of the batched
    # recompute (CUDA sort/cumsum over a different shape, ties among bf16 logits).
    try:
        GenerateSampler(check_processing=True)(policy.model, inputs, 16, policy.processing, R.row_seeds(1, big))
        res.set("generate_sampler_processing_check", "passed (batch %d, 16 tokens)" % big)
    except RuntimeError as e:
        res.set("generate_sampler_processing_check", f"raised: {str(e)[:200]}")
    print("GenerateSampler processing check:", res.data["generate_sampler_processing_check"], flush=True)
    graph_sampler = StaticCacheSampler(use_cuda_graph=True)
    compiled_sampler = StaticCacheSampler(use_cuda_graph=True, compile=True)
    autotuned_sampler = StaticCacheSampler(use_cuda_graph=True, compile=True, compile_mode="max-autotune-no-cudagraphs")
    for batch in args.batches:
        timed_row("generate_sampler", policy, GenerateSampler(check_processing=False), batch, graph=False)
        if not args.skip_eager:
            timed_row("engine_eager", policy, StaticCacheSampler(), batch, graph=False)
        timed_row("engine_graph", policy, graph_sampler, batch, graph=True)
        if args.compile:
            timed_row("engine_graph_compiled", policy, compiled_sampler, batch, graph=True)
        if args.autotune:
            compiled_sampler.reset()  # one cache at a time
            timed_row("engine_graph_autotune", policy, autotuned_sampler, batch, graph=True)
            autotuned_sampler.reset()
    for batch in args.graph_batches or []:
        timed_row("engine_graph", policy, graph_sampler, batch, graph=True)
        if args.compile:
            timed_row("engine_graph_compiled", policy, compiled_sampler, batch, graph=True)

    if not args.no_checks:
        checks: Dict[str, object] = {}
        try:
            g, e, h = (outs.get((k, big)) for k in ("engine_graph", "engine_eager", "generate_sampler"))
            if g and g[1] is not None:
                inputs = g[0]
                eager64 = StaticCacheSampler(pad_prompt_to=64)(policy.model, inputs, n, policy.processing,
                                                                R.row_seeds(100, big))
                checks["graph_vs_eager_engine_padded"] = agreement(g[1], eager64)
                checks["graph_vs_eager_engine_padded"]["max_abs_logp"] = float((g[1].log_probs - eager64.log_probs).abs().max())
                checks["recompute_gap_engine_graph"] = recompute_gap(policy, inputs, g[1])
                c = outs.get(("engine_graph_compiled", big))
                if c and c[1] is not None:
                    checks["compiled_graph_vs_eager_engine_padded"] = agreement(c[1], eager64)
                    checks["compiled_graph_vs_eager_engine_padded"]["max_abs_logp_first_16"] = float(
                        (c[1].log_probs[:, :16] - eager64.log_probs[:, :16]).abs().max())
            if e and h and e[1] is not None and h[1] is not None:
                checks["engine_eager_vs_generate_sampler"] = agreement(e[1], h[1])
                checks["recompute_gap_generate_sampler"] = recompute_gap(policy, h[0], h[1])
                checks["recompute_gap_engine_eager"] = recompute_gap(policy, e[0], e[1])
        except Exception as ex:  # noqa: BLE001
            checks["error"] = f"{type(ex).__name__}: {str(ex)[:600]}"
        res.set("checks", checks)
        print("checks:", checks, flush=True)

    if args.lora_row:
        graph_sampler.reset()
        compiled_sampler.reset()
        policy = None
        C.free_memory(device)
        lora_policy = R.build_policy(model, processor, device, lora=True, rank=64)
        for layer in MergedLoRA.layers(lora_policy.model):  # as after training: peft starts B at zero
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=1e-3)
        for suffix, merge in (("", True), ("_unmerged", False)):
            timed_row(f"engine_graph_lora{suffix}", lora_policy,
                      StaticCacheSampler(use_cuda_graph=True, merge_lora=merge), big, graph=True)
            if args.compile:
                timed_row(f"engine_graph_compiled_lora{suffix}", lora_policy,
                          StaticCacheSampler(use_cuda_graph=True, compile=True, merge_lora=merge), big, graph=True)

    R.vs_baseline(rows, "generate_sampler")
    res.set("rows", rows)
    C.print_table(f"AR decode, {n} of 1280 tokens (roofline {roofline_s * 1e3:.2f} ms/step)", rows, R.decode_columns(
        ("vs GenerateSampler", "vs_generate_sampler", ".3f"), ("warm-up s", "warmup_s", ".3g")))


def main(argv=None) -> int:
    return C.main("ar_engine", __doc__, arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
