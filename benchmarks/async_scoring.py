"""Wall-clock saving of async scoring: each rollout sub-batch is scored on the Ray reward actors while the next
sub-batch rolls out (``reward_host.async_scoring``), against scoring each sub-batch before the next starts.

Runs the same fixed-seed tiny job twice in one process (async on, then off) and prints a table; the trained
metrics of both runs must match (same sub-batches, same seeds), which the script checks.

    .venv/bin/python -m benchmarks.async_scoring [--stage decoder] [--steps 16] [--backend ray|local]
        [--device cpu|cuda] [--size 256] [--prompts 4] [--out runs/bench/async_scoring.json]
    .venv/bin/python -m benchmarks.async_scoring --tiny     # smoke test: 1 step at 64², 2 prompts, in-process rewards
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common as C
from tandem.rl.config import load_config
from tandem.rl.session import train

# OCR is the realistic, heavy reward here (PP-OCR on every image); colour is near free.
REWARDS = "rewards=[{name: ocr, num_cpus: 1, args: {det_limit_side_len: 256}}, {name: color, args: {rgb: [255, 0, 0]}}]"


def run_once(args, async_scoring: bool, out: Path) -> dict:
    overrides = [f"output_dir={out}", f"max_steps={args.steps}", "logging.progress=false", "logging.sample_every=0",
                 f"reward_host.backend={args.backend}", f"reward_host.async_scoring={str(async_scoring).lower()}",
                 REWARDS, f"data.height={args.size}", f"data.width={args.size}", "grpo.num_generations=4",
                 f"grpo.prompts_per_step={args.prompts}", "grpo.mini_batch_size=4", f"model.device={args.device}"]
    stage = args.stage
    cfg = load_config(str(C.REPO / "configs" / "demo" / f"{stage}.yaml"), overrides, stage=stage)
    cfg.model.path = args.model_path or cfg.model.path
    t0 = time.perf_counter()
    train(cfg, stage)
    wall = time.perf_counter() - t0
    rows = C.read_metrics(out)
    return {
        "wall_s": wall,
        "loop_s": sum(r["time/rollout_s"] + r["time/reward_s"] + r["time/train_s"] for r in rows),
        "rollout_s": sum(r["time/rollout_s"] for r in rows),
        "reward_wait_s": sum(r["time/reward_s"] for r in rows),
        "train_s": sum(r["time/train_s"] for r in rows),
        "rewards": [r["reward/mean"] for r in rows],
    }


def arguments(ap) -> None:
    ap.add_argument("--stage", choices=["ar", "decoder"], default="decoder")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of each job (default 16; tiny 1)")
    ap.add_argument("--backend", choices=["ray", "local"], default=None,
                    help="local: rewards on a background thread (default ray; tiny local)")
    ap.add_argument("--size", type=int, default=None, help="image height = width (default 256; tiny 64)")
    ap.add_argument("--prompts", type=int, default=None,
                    help="prompts per rollout batch, 4 copies each (default 4; tiny 2)")
    ap.add_argument("--model-path", default=None, help="tiny pipeline folder (default: the demo's)")


def run(bench: C.Bench) -> None:
    args = bench.args
    bench.default("steps", 16, 1)
    bench.default("backend", "ray", "local")
    bench.default("size", 256, 64)
    bench.default("prompts", 4, 2)
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run_once(args, mode == "async", Path(tmp) / mode) for mode in ("async", "sync")}
    same = results["async"].pop("rewards") == results["sync"].pop("rewards")
    saving = 1 - results["async"]["loop_s"] / results["sync"]["loop_s"]
    C.print_table("async vs sync scoring (s)", [dict(mode=mode, **r) for mode, r in results.items()], [
        ("mode", "mode", ""), ("loop s", "loop_s", ".1f"), ("rollout s", "rollout_s", ".1f"),
        ("reward wait s", "reward_wait_s", ".1f"), ("train s", "train_s", ".1f"), ("job wall s", "wall_s", ".1f")])
    print(f"async/sync training-loop time {1 - saving:.3f} (saving {100 * saving:.1f} %; loop = rollout + reward wait + "
          f"train, without start-up); identical rewards: {same}")
    for key, value in (("results", results), ("loop_ratio_async_over_sync", 1 - saving), ("identical_rewards", same)):
        bench.results.set(key, value)


def main(argv=None) -> int:
    return C.main("async_scoring", __doc__, arguments, run, argv, device="cpu", dtype=False)


if __name__ == "__main__":
    sys.exit(main())
