"""Wall-clock saving of async scoring: each rollout sub-batch is scored on the Ray reward actors while the next
sub-batch rolls out (``reward_host.async_scoring``), against scoring each sub-batch before the next starts.

Runs the same fixed-seed tiny job twice in one process (async on, then off) and prints a table; the trained
metrics of both runs must match (same sub-batches, same seeds), which the script checks.

    .venv/bin/python scripts/bench_async_scoring.py [--stage decoder] [--steps 16] [--backend ray|local]
        [--device cpu|cuda] [--size 256] [--out runs/bench/async_scoring.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tandem.rl.config import load_config
from tandem.rl.session import train

# OCR is the realistic, heavy reward here (PP-OCR on every image); colour is near free.
REWARDS = "rewards=[{name: ocr, num_cpus: 1, args: {det_limit_side_len: 256}}, {name: color, args: {rgb: [255, 0, 0]}}]"


def run_once(args, async_scoring: bool, out: Path) -> dict:
    overrides = [f"output_dir={out}", f"max_steps={args.steps}", "logging.progress=false", "logging.sample_every=0",
                 f"reward_host.backend={args.backend}", f"reward_host.async_scoring={str(async_scoring).lower()}",
                 REWARDS, f"data.height={args.size}", f"data.width={args.size}", "grpo.num_generations=4",
                 "grpo.prompts_per_step=4", "grpo.mini_batch_size=4", f"model.device={args.device}"]
    stage = args.stage
    cfg = load_config(f"configs/demo/{stage}.yaml", overrides, stage=stage)
    cfg.model.path = args.model_path or cfg.model.path
    t0 = time.perf_counter()
    train(cfg, stage)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall_s": wall,
        "loop_s": sum(r["time/rollout_s"] + r["time/reward_s"] + r["time/train_s"] for r in rows),
        "rollout_s": sum(r["time/rollout_s"] for r in rows),
        "reward_wait_s": sum(r["time/reward_s"] for r in rows),
        "train_s": sum(r["time/train_s"] for r in rows),
        "rewards": [r["reward/mean"] for r in rows],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["ar", "decoder"], default="decoder")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--backend", choices=["ray", "local"], default="ray", help="local: rewards on a background thread")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=256, help="image height = width")
    p.add_argument("--model-path", default=None, help="tiny pipeline folder (default: the demo's)")
    p.add_argument("--out", default="runs/bench/async_scoring.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run_once(args, mode == "async", Path(tmp) / mode) for mode in ("async", "sync")}
    same = results["async"].pop("rewards") == results["sync"].pop("rewards")
    saving = 1 - results["async"]["loop_s"] / results["sync"]["loop_s"]
    print(f"{'mode':<6} {'loop s':>8} {'rollout s':>10} {'reward wait s':>14} {'train s':>8} {'job wall s':>11}")
    for mode, r in results.items():
        print(f"{mode:<6} {r['loop_s']:8.1f} {r['rollout_s']:10.1f} {r['reward_wait_s']:14.1f} {r['train_s']:8.1f} "
              f"{r['wall_s']:11.1f}")
    print(f"async/sync training-loop time {1 - saving:.3f} (saving {100 * saving:.1f} %; loop = rollout + reward wait + "
          f"train, without start-up); identical rewards: {same}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"stage": args.stage, "steps": args.steps, "backend": args.backend, "device": args.device,
                               "size": args.size, "results": results,
                               "loop_ratio_async_over_sync": 1 - saving, "identical_rewards": same}, indent=1))


if __name__ == "__main__":
    main()
