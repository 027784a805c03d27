"""Benchmark: flow-GRPO vs MixGRPO vs DiffusionNFT on one decoder job — reward gain per second and per trained sample.

    python -m benchmarks.algorithms --steps 40 --out docs/bench/algorithms_cpu.json          # tiny demo, CPU
    python -m benchmarks.algorithms --device cuda --release-shape --reward jpeg_compressibility \
        --size 512 --steps 40 --out docs/bench/algorithms_h200.json                             # GPU row
    python -m benchmarks.algorithms --tiny       # smoke test: 1 step per algorithm, no warm-up job

Each algorithm is a real ``tandem train decoder`` job (``rl.session.train``, Ray reward actors), run one after
the other in this process with the same prompts (``data/demo_prompts.jsonl``), seed, batch (2 prompts x 4
copies, minibatches of 4), reward and number of optimizer steps:

* ``flow_grpo``: ``configs/demo/decoder.yaml`` (2 SDE steps at a random place in steps [0, 6), Euler elsewhere,
  CFG 1.5);
* ``mixgrpo``: the same with MixGRPO's sliding window (``sde_window_schedule: sliding``, stride 1 every
  ``steps / 12`` rollout batches, i.e. ``steps / 6`` optimizer steps at 2 per rollout) and DPM-Solver++(2M) ODE
  steps outside it (MixGRPO-Flash);
* ``diffusion_nft``: ``configs/demo/decoder_nft.yaml`` (ODE rollouts without CFG, 2 forward-process timesteps
  trained per sample).

Figures per algorithm, from its ``metrics.jsonl``: ``gain`` = mean ``reward/mean`` over the last tenth of the
steps minus that over the first tenth (as the demo test measures it); ``seconds`` = the loop's own time (sum of
``time/rollout_s`` + ``time/reward_s`` + ``time/train_s``: rollouts, scoring not hidden behind rollouts,
updates; no start-up); ``cpu_seconds`` = CPU time of this process over the job (all its threads; start-up
included, the Ray reward actors' own processes not; an unreported ``--warmup-steps`` job of the first algorithm
runs first, so the one-time costs of the process — imports, first calls — fall on none of them) — on a CPU shared with other work, the wall-clock seconds
grow with the load while the CPU seconds do not, so the CPU row's per-second figure uses them; ``trained_samples`` = steps x ``grpo.mini_batch_size``; ``passes`` = forward+backward
passes of the transformer (trained units per sample x trained samples). The gain of a tiny random model on one
seed is noisy: read the table as a rough comparison, not a ranking.

``--release-shape``: the pipeline is random-init at the release's shapes (``scripts/make_release_pipeline.py``:
the ~7B DiT and the ~10B AR model, saved once to ``--model-dir``), in bf16, LoRA rank 32, at ``--size`` px; the
rest (seeds, batch, steps) as above. The prior tokens then come from source images
(``data/demo_edit_prompts.jsonl``, ``decoder.condition_source: reference``: the AR model's VQ tokenizer) instead
of a 10B AR rollout per batch, which would cost the same in every job and hide the decoder's differences. Use a
cheap reward (``color`` or ``jpeg_compressibility``). The JSON file is rewritten after each job.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from benchmarks import common as C
from benchmarks.common import REPO

ALGORITHMS = {
    "flow_grpo": ("configs/demo/decoder.yaml", []),
    "mixgrpo": ("configs/demo/decoder.yaml", ["decoder.sde_window_schedule=sliding", "decoder.sde_window_stride=1",
                                              "decoder.ode_solver=dpm2m"]),
    "diffusion_nft": ("configs/demo/decoder_nft.yaml", []),
}
REWARDS = {
    "color": "rewards=[{name: color, args: {rgb: [255, 0, 0]}, weight: 1.0, num_cpus: 0.25}]",
    "jpeg_compressibility": "rewards=[{name: jpeg_compressibility, weight: 1.0, num_cpus: 0.25}]",
}


def overrides(args, name: str, out: Path, model_path: str) -> List[str]:
    items = [f"output_dir={out / name}", f"max_steps={args.steps}", f"seed={args.seed}", f"model.path={model_path}",
             f"model.device={args.device}", "logging.progress=false", "logging.sample_every=0",
             f"data.height={args.size}", f"data.width={args.size}", REWARDS[args.reward]]
    items += ALGORITHMS[name][1]
    if name == "mixgrpo":
        items.append(f"decoder.sde_window_shift_interval={max(1, args.steps // 12)}")  # rollouts of 2 steps
    if args.release_shape:
        items += ["model.dtype=bfloat16", "model.create_tiny_if_missing=false", "optim.lora.enabled=true",
                  "optim.lora.r=32", "optim.lora.alpha=32", "optim.learning_rate=1e-4", "optim.gradient_checkpointing=true",
                  "decoder.ema_decay=0",
                  f"data.prompts={REPO / 'data' / 'demo_edit_prompts.jsonl'}", "decoder.condition_source=reference"]
    else:
        items.append(f"data.prompts={REPO / 'data' / 'demo_prompts.jsonl'}")
    return items


def summarise(run: Path, cfg, cpu_seconds: float, device: str) -> Dict[str, float]:
    rows = C.read_metrics(run)
    tenth = max(1, len(rows) // 10)
    first = float(np.mean([r["reward/mean"] for r in rows[:tenth]]))
    last = float(np.mean([r["reward/mean"] for r in rows[-tenth:]]))
    seconds = float(sum(r["time/rollout_s"] + r["time/reward_s"] + r["time/train_s"] for r in rows))
    samples = len(rows) * cfg.grpo.mini_batch_size
    units = cfg.grpo.nft_num_timesteps if cfg.grpo.objective == "diffusion_nft" else cfg.decoder.sde_window_size
    gain = last - first
    per_s = cpu_seconds if device == "cpu" else seconds  # CPU-seconds on the CPU, loop (GPU) seconds on a GPU
    return {"steps": len(rows), "reward_first": first, "reward_last": last, "gain": gain, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "trained_samples": samples, "passes": samples * units,
            "gain_per_1k_s": 1000 * gain / per_s, "gain_per_1k_samples": 1000 * gain / samples}


def release_model(model_dir: Path, device: str) -> str:
    """A random-init pipeline at the release's shapes saved to ``model_dir`` (built once, by
    ``scripts/make_release_pipeline.py``)."""
    if not (model_dir / "model_index.json").is_file():
        C.release_tool().build_pipeline(model_dir, device, tiny=False, seed=0)
    return str(model_dir)


def table(results: Dict[str, Dict[str, float]], device: str) -> str:
    unit = "CPU-s" if device == "cpu" else "GPU-s"
    head = (f"| algorithm | steps | reward first → last | gain | loop wall s | process CPU s | gain / 1k {unit} | "
            "trained samples | gain / 1k samples | fwd+bwd passes |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {n} | {r['steps']} | {r['reward_first']:.4f} → {r['reward_last']:.4f} | {r['gain']:+.4f} | "
        f"{r['seconds']:.0f} | {r['cpu_seconds']:.0f} | {r['gain_per_1k_s']:+.4f} | {r['trained_samples']} | "
        f"{r['gain_per_1k_samples']:+.4f} | {r['passes']} |\n" for n, r in results.items())


def arguments(ap) -> None:
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of each job (default 40; tiny 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reward", default="color", choices=sorted(REWARDS))
    ap.add_argument("--size", type=int, default=64, help="image size in px")
    ap.add_argument("--release-shape", action="store_true", help="release-size decoder, random init, bf16, LoRA")
    ap.add_argument("--model-dir", default=None,
                    help="pipeline folder (tiny: built if missing; --release-shape: where the release-shape one is "
                         "saved; default under .cache/)")
    ap.add_argument("--warmup-steps", type=int, default=None,
                    help="steps of an unreported first job (0 = none; default 2; tiny 0)")
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))


def run(bench: C.Bench) -> None:
    from tandem.policies.tiny import ensure_tiny_glm_image
    from tandem.rl.config import load_config
    from tandem.rl.session import train

    args = bench.args
    bench.default("steps", 40, 1)
    bench.default("warmup_steps", 2, 0)
    if args.model_dir is None:
        args.model_dir = str(REPO / ".cache" / ("release-shape-glm-image" if args.release_shape else "tiny-glm-image"))
    model_path = release_model(Path(args.model_dir), args.device) if args.release_shape \
        else str(ensure_tiny_glm_image(args.model_dir))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.warmup_steps:
            warm = overrides(args, args.algorithms[0], Path(tmp) / "warmup", model_path) + [f"max_steps={args.warmup_steps}"]
            train(load_config(str(REPO / ALGORITHMS[args.algorithms[0]][0]), warm, "decoder"), "decoder")
        for name in args.algorithms:
            cfg = load_config(str(REPO / ALGORITHMS[name][0]), overrides(args, name, Path(tmp), model_path), "decoder")
            c0 = time.process_time()
            run_dir = train(cfg, "decoder")
            results[name] = summarise(run_dir, cfg, time.process_time() - c0, args.device)
            print(f"{name}: {results[name]}", flush=True)
            bench.results.set("results", results)
    print(table(results, args.device))


def main(argv=None) -> int:
    return C.main("algorithms", __doc__, arguments, run, argv, device="cpu", dtype=False,
                  tiny_help="one optimizer step per algorithm, no warm-up job (a smoke test, not a benchmark)")


if __name__ == "__main__":
    sys.exit(main())
