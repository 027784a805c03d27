"""Profile: where an AR-stage job's rollout spends its time, call by call, as the job runs it.

    PYTHONUNBUFFERED=1 python -m benchmarks.profile_ar_rollout --model REL --extras REL-x --batches 4,4,4,4,16 \
        --out prof.json                                        # REL: scripts/make_release_pipeline.py's folder
    .venv/bin/python -m benchmarks.profile_ar_rollout --tiny --device cpu        # CPU smoke test

The policy is built exactly as ``tandem train ar --config configs/glm_image/ar.yaml`` builds it (``load_config`` +
``build_policy``: LoRA, ``ar.sampler: engine``, ``ar.compile``), and ``GlmImageARPolicy.rollout`` is called on
successive prompts of the job's prompt file, one call per ``--batches`` entry (samples = prompts x ``--group``), as
the trainer calls it for its sub-batches. Per call, wall seconds (CUDA-synchronised) of each phase:

* ``inputs`` — prompt processing (``GlmImageAdapter.ar_inputs``);
* ``positions`` — prompt + decode MRoPE positions; ``capture`` — static cache + CUDA-graph capture (and the
  compile of the decode step, when the shape is new); ``prefill``; ``decode`` — the token loop (graph replays and
  the seeded draws between them), with its ms per token;
* ``render`` — the frozen decoder's images (``--render-calls`` first calls only; later calls skip it).

Then one more call of the last batch size runs under ``torch.profiler``: the top ops by device and by host time.
Recompilations of the decode step are printed by torch (its ``recompiles`` log is switched on).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks import common as C
from tandem.rl.config import load_config
from tandem.rl.session import build_policy


class PhaseTimer:
    """Wraps methods so each call adds its CUDA-synchronised wall seconds to ``self.seconds[name]``."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._undo = device, {}, []

    def wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            C.sync(self.device)
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            C.sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            return out

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def take(self) -> Dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def top_ops(prof, key: str, n: int) -> List[Dict[str, object]]:
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"name": e.key, "count": e.count, "device_ms": e.device_time_total / 1e3, "host_ms": e.cpu_time_total / 1e3}
            for e in rows]


def arguments(ap) -> None:
    ap.add_argument("--model", default=None)
    ap.add_argument("--extras", default=None)
    ap.add_argument("--config", default=str(C.REPO / "configs/glm_image/ar.yaml"))
    ap.add_argument("--batches", default=None, help="samples per rollout call, whole groups of --group "
                                                    "(default 4,4,4,4; tiny 2)")
    ap.add_argument("--group", type=int, default=None, help="copies per prompt (default 4; tiny 2)")
    ap.add_argument("--render-calls", type=int, default=2)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--unmerged-lora", action="store_true",
                    help="run the LoRA adapters beside the weights in every decode step (the engine merges them by default)")


def run(bench: C.Bench) -> None:
    args, device = bench.args, bench.device
    bench.default("batches", "4,4,4,4", "2")
    bench.default("group", 4, 2)
    torch._logging.set_logs(recompiles=True)
    overrides = [f"output_dir=/tmp/profile-ar", *args.set]
    if args.tiny:
        if args.model is None:  # else the --model and --extras given (make_release_pipeline.py --tiny's)
            args.model, args.extras = C.tiny_release_pipeline(Path("/tmp/profile-ar-tiny"))
        overrides += ["model.dtype=float32", "model.device=cpu", "optim.mixed_precision='no'", "ar.compile=false",
                      "decoder.compile=false", "data.height=64", "data.width=64", "ar.decode_steps=2"]
    overrides += [f"model.path={args.model}", f"data.prompts={args.extras}/prompts.jsonl"]
    cfg = load_config(args.config, overrides, stage="ar")
    t0 = time.perf_counter()
    policy = build_policy("ar", cfg)
    load_s = time.perf_counter() - t0
    if args.unmerged_lora:
        policy.sampler.merged.enabled = False
    records = [json.loads(line) for line in Path(args.extras, "prompts.jsonl").read_text().splitlines() if line]

    timer = PhaseTimer(device)
    timer.wrap(policy.adapter, "ar_inputs", "inputs")
    timer.wrap(policy.sampler, "_positions", "positions")
    timer.wrap(policy.sampler, "_cache", "capture")
    timer.wrap(policy.sampler, "_prefill", "prefill")
    timer.wrap(policy.sampler, "_decode", "decode")
    render = policy._render
    timer.wrap(policy, "_render", "render")

    results = bench.results
    results.set("setup", {"load_s": load_s, "sampler": cfg.ar.sampler, "compile": cfg.ar.compile,
                          "lora_merged": getattr(getattr(policy.sampler, "merged", None), "enabled", False)})
    rows, cursor, seed = [], 0, 0
    batches = [int(b) for b in args.batches.split(",")]
    for i, b in enumerate(batches):
        n = b // args.group
        chosen = [records[(cursor + j) % len(records)] for j in range(n)]
        cursor += n
        if i >= args.render_calls:
            policy._render = lambda full, prompts, *a, **k: None  # noqa: E731 - token phase only
        C.sync(device)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = policy.rollout([r["prompt"] for r in chosen], [{} for _ in chosen], args.group, seed=seed + i)
        C.sync(device)
        row = {"call": i, "batch": b, "wall_s": time.perf_counter() - t1, **timer.take(),
               "prompt_len": int(out.extras["input_ids"].shape[1]), "tokens": policy.num_units}
        row["decode_ms_per_token"] = row.get("decode", 0.0) / max(policy.num_units - 1, 1) * 1e3
        rows.append(row)
        results.add("calls", row)
        print(json.dumps(row), flush=True)
    policy._render = lambda full, prompts, *a, **k: None  # noqa: E731
    n = batches[-1] // args.group
    chosen = [records[(cursor + j) % len(records)] for j in range(n)]
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            policy.rollout([r["prompt"] for r in chosen], [{} for _ in chosen], args.group, seed=99)
        C.sync(device)
    phases = timer.take()
    results.add("profiled_call", phases)
    by_device = top_ops(prof, "device_time_total", args.top)
    by_host = top_ops(prof, "cpu_time_total", args.top)
    results.add("top_device_ops", by_device)
    results.add("top_host_ops", by_host)
    policy._render = render
    C.print_table("AR rollout calls (s; decode ms/token)", rows, [
        ("call", "call", ""), ("batch", "batch", ""), ("L", "prompt_len", ""), ("wall", "wall_s", ".2f"),
        ("inputs", "inputs", ".3f"), ("positions", "positions", ".3f"), ("capture", "capture", ".2f"),
        ("prefill", "prefill", ".3f"), ("decode", "decode", ".2f"), ("ms/token", "decode_ms_per_token", ".2f"),
        ("render", "render", ".2f"),
    ])
    print("profiled call phases:", json.dumps(phases))
    C.print_table("top ops by device time (profiled call)", by_device,
                  [("op", "name", ""), ("n", "count", ""), ("device ms", "device_ms", ".1f"), ("host ms", "host_ms", ".1f")])
    C.print_table("top ops by host time (profiled call)", by_host,
                  [("op", "name", ""), ("n", "count", ""), ("device ms", "device_ms", ".1f"), ("host ms", "host_ms", ".1f")])



def main(argv=None) -> int:
    return C.main("profile_ar_rollout", __doc__, arguments, run, argv, dtype=False)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
