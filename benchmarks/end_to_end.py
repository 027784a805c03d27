"""End-to-end RL steps of the glm_image configs: s per RL step, GPU-s per sample, time split, peak memory.

Why: the other benchmarks measure parts of tandem alone; this one runs whole jobs (``tandem train ar|decoder|joint``) the way a
user does — the config files, the CLI, reward actors on Ray beside the policy — and reads the split back from
the run's own ``metrics.jsonl``. One row per stage and launch setting.

Per rollout batch k (one "RL step": rollout of prompts_per_step x num_generations samples, scoring, and the
optimizer steps trained on it), from ``metrics.jsonl``:
* wall = ``cost/elapsed_s`` at the batch's last optimizer step minus that of the previous batch (the first
  batch: since the job's clock started, i.e. after loading);
* rollout = ``time/rollout_s``; reward wait = ``time/reward_s`` (scoring not hidden behind rollouts);
  recompute = ``time/recompute_s`` (the old log-probs' no-grad forward, ``grpo.old_log_probs``); train = sum of
  ``time/train_s``; other = wall - the four (logging, sample grids, checkpoints, ...).
* GPU-s per trained sample = wall x GPUs / samples. The first batch pays compilation and warm-up, so the
  table shows the mean over the later batches ("steady") and the first apart.
* AR stage: the frozen decoder's image rendering inside the rollout is timed apart (``decode_s``) by wrapping
  ``tandem.policies.ar.render_tokens``, and the token sampling (``token_s``) by wrapping the policy's sampler
  call, in the job's process (``child`` mode below; one-process launches).
* MFU (``mfu_rollout``, ``mfu_train``, ``mfu_render``): DiT forward FLOPs F(T) = 2·P·T + 4·L·T²·d for T patch
  tokens (P parameters from the saved transformer's safetensors index, L layers, d hidden; glyph tokens not
  counted), times the forwards a step makes — rollout: samples × decoder.num_steps × (2 with CFG); train:
  samples × trained steps × (2 with CFG) × 3 (forward + backward; checkpointing's recompute not counted), plus
  one reference forward per branch when grpo.beta > 0; AR render: samples × ar.decode_steps × (2 with CFG) —
  over the measured seconds and ``PEAK_BF16_FLOPS``.
* ``--launches 2`` runs each job twice on the same machine: the second launch's first step is the warm first
  step (compile caches under ``model.compile_cache_dir``).
* Peak memory per GPU: the maximum of ``nvidia-smi`` memory.used polled every 0.5 s (all processes on the
  GPU: policy and reward actors), plus the trainer process's ``torch.cuda.max_memory_allocated``.

Run on a GPU box (model and extras written by ``scripts/make_release_pipeline.py``):

    python -m benchmarks.end_to_end --model /tmp/rel --extras /tmp/rel-x --stages decoder,ar,joint \
        --gpus 1 --out bench.json
    python -m benchmarks.end_to_end --device cpu --tiny --out /tmp/e2e.json      # CPU smoke test

Extra ``--set key=value`` overrides go to every job (e.g. ``--set decoder.compile=false``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks import common as C
from benchmarks.common import REPO


# ------------------------------------------------------------------------------------------------ child mode
def child(argv: List[str]) -> int:
    """Run the tandem CLI in this process, timing the AR stage's image rendering and the CUDA peak."""
    import atexit

    import torch

    import tandem.policies.ar as ar_module
    from tandem.rl.cli import main as cli_main

    log = os.environ.get("BENCH_CHILD_LOG")
    import tandem.rl.trainer as trainer_module

    decode_s: List[float] = []
    token_s: List[float] = []
    per_rollout: List[Dict[str, float]] = []  # render and token seconds of each rollout batch, in order
    original = ar_module.render_tokens
    sample_tokens = ar_module.GlmImageARPolicy._sample_tokens
    rollout_and_score = trainer_module.StageTrainer.rollout_and_score

    def report():
        """Rewritten after every render and at exit, so a job stopped at its timeout keeps its figures."""
        if not log or int(os.environ.get("RANK", 0)) != 0:
            return
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        Path(log).write_text(json.dumps({"per_rollout": per_rollout, "torch_peak_gib": peak}))

    def timed(fn, into: List[float]):
        def run(*args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            into.append(time.perf_counter() - t0)
            report()
            return out

        return run

    def rollout_marked(trainer):
        out = rollout_and_score(trainer)
        per_rollout.append({"decode_s": sum(decode_s), "token_s": sum(token_s)})
        decode_s.clear()
        token_s.clear()
        report()
        return out

    ar_module.render_tokens = timed(original, decode_s)
    ar_module.GlmImageARPolicy._sample_tokens = timed(sample_tokens, token_s)
    trainer_module.StageTrainer.rollout_and_score = rollout_marked
    atexit.register(report)
    return cli_main(argv)


# ------------------------------------------------------------------------------------------------ GPU memory
class MemoryPoller:
    """Max of ``nvidia-smi`` memory.used per GPU (MiB), polled every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self._stop = interval, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                for line in out.strip().splitlines():
                    i, used = (int(x) for x in line.split(","))
                    self.peak[i] = max(self.peak.get(i, 0), used)
            except Exception:  # noqa: BLE001 - no nvidia-smi (CPU): nothing to record
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=15)


# ------------------------------------------------------------------------------------------------ jobs
def reward_entries(extras: Path, tiny: bool, with_ocr: bool, with_hands: bool, stage: str) -> str:
    """The ``rewards=[...]`` override: the config's rewards with weight paths into ``extras``."""
    clip = f"model_name: ViT-B-32, " if tiny else ""
    aesthetic = (f"{{name: aesthetic, weight: 1.0, num_gpus: {0 if tiny else 0.1}, args: {{{clip}"
                 f"clip_weights: {extras}/clip-vit-l-14.safetensors, head_weights: {extras}/aesthetic-head.safetensors}}}}")
    vlm = f"{{name: vlm, weight: 1.0, num_gpus: {0 if tiny else 0.2}, args: {{model_path: {extras}/vlm}}}}"
    lpips = (f"{{name: lpips, weight: 1.0, num_gpus: {0 if tiny else 0.1}, num_cpus: 1, "
             f"args: {{backbone_weights: {extras}/alexnet.safetensors}}}}")
    entries = [lpips, aesthetic] if stage == "decoder" else [aesthetic, vlm]
    if with_ocr:
        entries.append("{name: ocr, weight: 1.0, num_cpus: 2, replicas: 2}")
    if with_hands and stage == "decoder":
        entries.append("{name: hands, weight: 0.5, num_cpus: 1}")
    return "rewards=[" + ", ".join(entries) + "]"


def job_command(args, stage: str, run_dir: Path, child_log: Path, overrides: List[str]) -> List[str]:
    config = REPO / "configs" / "glm_image" / f"{stage}.yaml"
    cli = ["train", stage, "--config", str(config), f"output_dir={run_dir}", f"model.path={args.model}",
           f"data.prompts={args.extras}/prompts.jsonl", f"max_steps={args.steps}",
           "logging.sample_every=0", "logging.checkpoint_every=0", "logging.progress=false",
           reward_entries(Path(args.extras), args.tiny, args.with_ocr, args.with_hands, stage), *overrides]
    if args.launcher == "torchrun" and args.gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
                "--module", "benchmarks.end_to_end", "child", *cli]
    return [sys.executable, "-m", "benchmarks.end_to_end", "child", *cli]


def stage_overrides(args, stage: str) -> List[str]:
    """Settings of the row: batch sizes, and the distributed keys for this launch."""
    sets = [f"grpo.prompts_per_step={args.prompts}", f"grpo.num_generations={args.generations}",
            f"grpo.mini_batch_size={args.minibatch}"]
    if stage == "joint":
        sets += ["joint.ar_steps_per_phase=1", "joint.decoder_steps_per_phase=1"]
    if args.tiny:
        sets += ["model.dtype=float32", "model.device=cpu", "optim.mixed_precision='no'", "ar.sampler=generate",
                 "ar.compile=false", "decoder.compile=false", "data.height=64", "data.width=64",
                 "ar.decode_steps=4", "decoder.num_steps=4", "decoder.sde_window_range=[0,3]"]
    if args.gpus > 1:
        sets.append(f"distributed.strategy={args.strategy}")
        if args.launcher == "ray_train":
            sets += ["distributed.launcher=ray_train", f"distributed.num_workers={args.gpus}",
                     "distributed.gpus_per_worker=0.8"]
    return sets + list(args.set)


def dit_forward_flops(model: Path, height: int, width: int) -> Optional[float]:
    """F(T) = 2·P·T + 4·L·T²·d of one DiT forward over T = (H/16)(W/16) patch tokens (module docstring), from the
    saved transformer's config and safetensors index (bf16: 2 bytes a parameter); None when they are missing."""
    folder = model / "transformer"
    try:
        config = json.loads((folder / "config.json").read_text())
        index = folder / "diffusion_pytorch_model.safetensors.index.json"
        size = json.loads(index.read_text())["metadata"]["total_size"] if index.is_file() else \
            sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    except (OSError, KeyError, ValueError):
        return None
    params = size / 2
    tokens = (height // 16) * (width // 16)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return 2 * params * tokens + 4 * config["num_layers"] * tokens**2 * hidden


def job_flops(args, stage: str, overrides: List[str]) -> Dict[str, float]:
    """Model FLOPs of one RL step's rollout, train and AR render (module docstring); {} for joint jobs."""
    if stage == "joint" or not args.model:
        return {}
    from tandem.rl.config import load_config

    cfg = load_config(str(REPO / "configs" / "glm_image" / f"{stage}.yaml"),
                      [f"model.path={args.model}", f"data.prompts={args.extras}/prompts.jsonl", *overrides], stage=stage)
    fwd = dit_forward_flops(Path(args.model), cfg.data.height, cfg.data.width)
    if fwd is None:
        return {}
    samples = args.prompts * args.generations
    if stage == "ar":
        return {"render": samples * cfg.ar.decode_steps * (2 if cfg.ar.decode_guidance_scale > 1 else 1) * fwd}
    d, branches = cfg.decoder, (2 if cfg.decoder.guidance_scale > 1 else 1)
    trained = d.sde_window_size if d.sde_window_size > 0 else max(1, round(d.timestep_fraction * (d.num_steps - 1)))
    passes = 3 + (1 if cfg.grpo.beta > 0 else 0)
    return {"rollout": samples * d.num_steps * branches * fwd, "train": samples * trained * branches * passes * fwd}


def summarise(metrics: List[Dict], samples: int, gpus: int, per_rollout: List[Dict[str, float]],
              flops: Optional[Dict[str, float]] = None) -> Dict[str, object]:
    """Per-rollout split (see the module docstring); steady = mean over the rollouts after the first."""
    batches: List[Dict] = []
    previous_end = 0.0
    for m in metrics:
        if not batches or m.get("rollout") != batches[-1]["rollout"]:
            batches.append({"rollout": m.get("rollout"), "phase": m.get("phase"), "rollout_s": 0.0, "reward_s": 0.0,
                            "recompute_s": 0.0, "train_s": 0.0, "steps": 0})
        b = batches[-1]
        for key in ("rollout_s", "reward_s", "recompute_s", "train_s"):
            b[key] += m.get(f"time/{key}", 0.0)
        b["steps"] += 1
        b["end"] = m.get("cost/elapsed_s", 0.0)
    for b in batches:
        b["wall_s"] = b["end"] - previous_end
        previous_end = b["end"]
        b["other_s"] = b["wall_s"] - b["rollout_s"] - b["reward_s"] - b["recompute_s"] - b["train_s"]
    for b, timed in zip(batches, per_rollout):
        if b["phase"] in (None, "ar") and timed["decode_s"]:
            b.update(timed)
    steady = batches[1:] or batches

    def mean(key):
        vals = [b[key] for b in steady if key in b]
        return sum(vals) / len(vals) if vals else None

    wall = mean("wall_s")
    row = {"batches": batches, "rollouts": len(batches), "optimizer_steps": len(metrics),
           "s_per_rl_step": wall, "first_rl_step_s": batches[0]["wall_s"] if batches else None,
           "gpu_s_per_sample": wall * gpus / samples if wall else None,
           "samples_per_s": samples / wall if wall else None}
    for key in ("rollout_s", "reward_s", "recompute_s", "train_s", "other_s", "decode_s", "token_s"):
        row[key] = mean(key)
        row[key.replace("_s", "_frac")] = row[key] / wall if wall and row[key] is not None else None
    for name, seconds in (("rollout", "rollout_s"), ("train", "train_s"), ("render", "decode_s")):
        f = (flops or {}).get(name)
        row[f"mfu_{name}"] = f / row[seconds] / C.PEAK_BF16_FLOPS if f and row.get(seconds) else None
    if metrics:
        first = metrics[0]
        row["step1"] = {k: first.get(k) for k in ("ratio/mean", "ratio/min", "ratio/max", "clipfrac", "approx_kl",
                                                    "kl", "loss", "reward/mean", "phase")}
    return row


def stop_group(proc) -> None:
    """SIGTERM, then SIGKILL, the job's process group (the trainer and the Ray processes it started)."""
    import signal

    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def run_stage(args, stage: str, results: C.Results, launch: int = 1) -> Dict:
    work = Path(args.work)
    run_dir = work / f"{stage}-{args.gpus}gpu-{args.launcher}-{args.strategy}-{args.prompts * args.generations}-{launch}"
    child_log = run_dir.with_suffix(".child.json")
    overrides = stage_overrides(args, stage)
    cmd = job_command(args, stage, run_dir, child_log, overrides)
    env = dict(os.environ, BENCH_CHILD_LOG=str(child_log), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    print(f"\n=== {stage}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with MemoryPoller() as mem:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # own group: a timeout ends Ray's too
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            stop_group(proc)
    total = time.perf_counter() - t0
    child = json.loads(child_log.read_text()) if child_log.is_file() else {}
    samples = args.prompts * args.generations
    row = {"stage": stage, "launch": launch, "gpus": args.gpus, "launcher": args.launcher, "strategy": args.strategy,
           "rc": rc, "job_wall_s": total, "samples_per_rl_step": samples, "overrides": overrides,
           "peak_gpu_mib": mem.peak, "torch_peak_gib": child.get("torch_peak_gib"),
           **summarise(C.read_metrics(run_dir), samples, args.gpus, child.get("per_rollout", []),
                       job_flops(args, stage, overrides))}
    results.add("rows", row)
    return row


def arguments(ap) -> None:
    ap.add_argument("--model", default=None, help="GlmImagePipeline folder (make_release_pipeline.py OUT)")
    ap.add_argument("--extras", default=None, help="reward models + prompts folder (make_release_pipeline.py --extras)")
    ap.add_argument("--stages", default="decoder,ar,joint")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--launcher", default="torchrun", choices=["torchrun", "ray_train"])
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per job")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--minibatch", type=int, default=8)
    ap.add_argument("--with-ocr", action="store_true")
    ap.add_argument("--with-hands", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="extra key=value override for every job")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--work", default="/tmp/tandem-e2e")
    ap.add_argument("--launches", type=int, default=1, help="launches of each job (2: the second starts warm)")


def run(bench: C.Bench) -> None:
    args = bench.args
    if args.tiny and not args.model:
        args.model, args.extras = C.tiny_release_pipeline(Path(args.work))
    rows = [run_stage(args, stage, bench.results, launch) for stage in args.stages.split(",")
            for launch in range(1, args.launches + 1)]
    C.print_table("End-to-end RL steps (steady = mean of rollout batches after the first)", rows, [
        ("stage", "stage", ""), ("samples", "samples_per_rl_step", ""), ("launch", "launch", ""),
        ("GPUs", "gpus", ""), ("rc", "rc", ""), ("steps", "optimizer_steps", ""), ("s/RL step", "s_per_rl_step", ".1f"),
        ("first s", "first_rl_step_s", ".1f"), ("GPU-s/sample", "gpu_s_per_sample", ".2f"),
        ("rollout", "rollout_frac", ".0%"), ("render", "decode_frac", ".0%"), ("token", "token_frac", ".0%"),
        ("reward wait", "reward_frac", ".0%"), ("recompute", "recompute_frac", ".0%"), ("train", "train_frac", ".0%"),
        ("other", "other_frac", ".1%"),
        ("MFU rollout", "mfu_rollout", ".0%"), ("MFU train", "mfu_train", ".0%"), ("MFU render", "mfu_render", ".0%"),
        ("torch peak GiB", "torch_peak_gib", ".1f"),
    ])
    for r in rows:
        print(f"{r['stage']}: peak nvidia-smi MiB per GPU {r['peak_gpu_mib']}; step 1 {r.get('step1')}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["child"]:
        return child(argv[1:])
    return C.main("end_to_end", __doc__, arguments, run, argv, dtype=False,
                  tiny_help="tiny models built here, CPU (smoke test)")


if __name__ == "__main__":
    sys.exit(main())
