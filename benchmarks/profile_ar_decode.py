"""Profile: where one AR decode step of ``StaticCacheSampler`` spends its time at release size.

    PYTHONUNBUFFERED=1 python -m benchmarks.profile_ar_decode --out docs/bench/ar_decode_profile_h200.json
    .venv/bin/python -m benchmarks.profile_ar_decode --device cpu --tiny     # CPU smoke test

The release-size AR model of ``benchmarks/ar_rollout.py`` (random init, bf16), batch 32, a static cache of a
whole 1024² image (prompt padded to 64 + 1279 decode slots = 1344), all slots valid. Measured:

1. ``graph``: replays of the captured decode step alone (eager and ``compile=True`` step), ms each;
2. ``sampling``: the eager work between replays (``LogitsProcessing`` of the release sampler, the per-row
   inverse-CDF draw, log-softmax gather) on (32, 16512) logits, ms each;
3. ``kernels``: ``torch.profiler`` over eager (uncaptured) decode steps, device time summed per kernel name, the
   top ``--top`` — what the graph replays.
"""

from __future__ import annotations

import sys
from typing import Dict, List

import torch

from benchmarks import ar_rollout as R
from benchmarks import common as C
from tandem.policies.ar_engine import StaticCacheSampler, _Parts, _StaticKV, decode_attention
from tandem.policies.ar_sampler import LogitsProcessing, inverse_cdf


def per_call_ms(fn, device, reps: int) -> float:
    fn()
    C.sync(device)
    _, seconds = C.timed(lambda: [fn() for _ in range(reps)], device)
    return seconds / reps * 1e3


def kernel_table(fn, device, steps: int, top: int) -> List[Dict[str, object]]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    C.sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        C.sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = [dict(name=e.key[:120], calls=e.count // steps, ms_per_step=getattr(e, attr) / 1e3 / steps)
            for e in prof.key_averages() if getattr(e, attr) > 0]
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    for r in rows:
        r["share"] = r["ms_per_step"] / total
    return rows[:top] + [dict(name="(all kernels)", calls=sum(r["calls"] for r in rows), ms_per_step=total, share=1.0)]


def arguments(ap) -> None:
    ap.add_argument("--batch", type=int, default=None, help="rows of the decode step (default 32; tiny 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls (default 50; tiny 2)")
    ap.add_argument("--top", type=int, default=25)


def run(bench: C.Bench) -> None:
    args, device, dtype = bench.args, bench.device, bench.dtype
    bench.default("batch", 32, 2)
    bench.default("reps", 50, 2)
    ids = R.TINY if args.tiny else R.RELEASE
    model = R.build_model(R.build_tokenizer(ids), ids, args.tiny, device, dtype)
    wb = R.decode_weight_bytes(model)
    res = bench.results
    res.set("setup", dict(batch=args.batch, cache_slots=1344, dtype=str(dtype), **wb,
                          roofline_ms=wb["decode_weight_bytes"] / C.HBM_BYTES_PER_S * 1e3))
    b, lp, length = args.batch, 64, 1344
    parts = _Parts.of(model)
    tok = torch.randint(0, ids["codebook"], (b,), device=device)
    pos = torch.full((3, b, 1), 100, dtype=torch.long, device=device)
    with torch.no_grad():
        for compiled in (False,) if args.tiny else (False, True):  # tiny: no inductor compile on the CPU
            sampler = StaticCacheSampler(use_cuda_graph=True, compile=compiled)
            label = "compiled" if compiled else "eager"
            if device.type == "cuda":
                graph = sampler._graph_for(model, parts, b, length, dtype, device)
                graph.valid.fill_(True)
                res.set(f"graph_ms_{label}", per_call_ms(lambda: graph(tok, pos, length - 1), device, args.reps))
                cache, valid = graph.cache, graph.valid
            else:
                cache = _StaticKV(len(parts.layers), b, parts.num_kv_heads, length, parts.head_dim, dtype, device)
                valid = torch.ones(b, length, dtype=torch.bool, device=device)
            slot = torch.tensor([length - 1], device=device)
            step = lambda: sampler.step(parts, tok[:, None], pos, valid, slot, cache)  # noqa: E731
            with decode_attention(parts):  # as the sampler runs its decode steps
                res.set(f"kernels_{label}", kernel_table(step, device, steps=5, top=args.top))
            sampler.reset()
            print(f"{label}: graph {C.fmt(res.data.get(f'graph_ms_{label}'))} ms/step", flush=True)
            C.print_table(f"kernels per decode step ({label}, not captured)", res.data[f"kernels_{label}"], [
                ("kernel", "name", ""), ("calls", "calls", ""), ("ms/step", "ms_per_step", ".3f"), ("share", "share", ".3f")])
        suppress = tuple(range(ids["codebook"], ids["vision_vocab"]))
        procs = LogitsProcessing(suppress, temperature=0.9, top_k=0, top_p=0.75).processors(device)
        logits = torch.randn(b, ids["vision_vocab"], device=device)
        u = torch.rand(b, dtype=torch.float64, device=device)  # the step's per-row uniforms (SeededDraws)

        def sample():
            scores = logits
            for proc in procs:
                scores = proc(None, scores)
            t = inverse_cdf(scores, u)
            return torch.log_softmax(scores, -1).gather(-1, t[:, None])

        res.set("sampling_ms", per_call_ms(sample, device, args.reps))
        res.set("kernels_sampling", kernel_table(sample, device, steps=5, top=10))
    print(f"sampling {res.data['sampling_ms']:.3f} ms/step; roofline {res.data['setup']['roofline_ms']:.2f} ms", flush=True)


def main(argv=None) -> int:
    return C.main("profile_ar_decode", __doc__, arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
