"""End-to-end RL steps of the glm_image configs: s per RL step, GPU-s per sample, time split, peak memory.

Why: the other benchmarks measure parts of tandem alone; this one runs whole jobs (``tandem train ar|decoder|joint``) the way a
user does — the config files, the CLI, reward actors on Ray beside the policy — and reads the split back from
the run's own ``metrics.jsonl``. One row per stage and launch setting.

Per rollout batch k (one "RL step": rollout of prompts_per_step x num_generations samples, scoring, and the
optimizer steps trained on it), from ``metrics.jsonl`` (``rollout_batches``):
* wall = ``cost/elapsed_s`` at the batch's last optimizer step minus that of the previous batch (the first
  batch: since the job's clock started, i.e. after loading and the reward actors' start-up, which overlap);
  "start-up s" is the time before it, from the job's process start to the run clock's start;
* rollout = ``time/rollout_s``; reward wait = ``time/reward_s`` (scoring not hidden behind rollouts);
  recompute = ``time/recompute_s`` (the old log-probs' no-grad forward, ``grpo.old_log_probs``); train = sum of
  ``time/train_s``; other = wall - the four (logging, sample grids, checkpoints, ...).
* complete: the batch took all the optimizer steps its config gives it (``BatchPlan``): grpo.num_iterations x
  prompts_per_step x num_generations / (mini_batch_size x optim.gradient_accumulation_steps); in a joint job no
  more than its phase had left. A job stopped at ``--timeout`` or at ``--steps`` inside a batch leaves it
  incomplete: kept in the JSON's ``batches`` (``complete: false``), never in a mean.
* warm-up: the first batch of each stage, and every batch whose ``rollout/call_samples`` (the largest rollout
  call of the batch) differs from the previous batch of its stage: under ``grpo.rollout_batch_size: 0`` on a GPU
  the first batch measures memory with one-unit calls and the second runs the chosen size, compiling (and
  capturing CUDA graphs for) that shape once. "first s" is the first batch's wall, "warm-up s" that of all
  warm-up batches.
* steady: the complete batches that are not warm-up. The table shows their mean ("s/RL step", the shares, MFU)
  and their number ("steady n"); a row without any says so and shows no figures (run more ``--steps``: three
  complete batches per stage are enough). GPU-s per trained sample = steady wall x GPUs / samples.
* A launch whose child exits other than 0 (and was not stopped at ``--timeout``) shows its exit code and no
  figures. The benchmark owns ``--work``: each launch's run folder is removed before it starts (the compile
  caches are under ``model.compile_cache_dir``, not in the run folder, so a second launch still starts warm).
* AR stage: the frozen decoder's image rendering inside the rollout is timed apart (``decode_s``) by wrapping
  ``tandem.policies.ar.render_tokens``, and the token sampling (``token_s``) by wrapping the policy's sampler
  call, in the job's process (``child`` mode below; one-process launches).
* MFU (``mfu_rollout``, ``mfu_train``, ``mfu_render``): DiT forward FLOPs F(T) = 2·P·T + 4·L·T²·d for T patch
  tokens (P parameters from the saved transformer's safetensors index, L layers, d hidden; glyph tokens not
  counted), times the forwards a step makes — rollout: samples × decoder.num_steps × (2 with CFG); train:
  grpo.num_iterations × samples × trained steps × (2 with CFG) × 3 (forward + backward; checkpointing's
  recompute not counted), plus one reference forward per branch when grpo.beta > 0; AR render: samples ×
  ar.decode_steps × (2 with CFG) — over the measured seconds and ``PEAK_BF16_FLOPS``.
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
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks import common as C
from benchmarks.common import REPO


# ------------------------------------------------------------------------------------------------ child mode
def child(argv: List[str]) -> int:
    """Run the tandem CLI in this process, timing the AR stage's image rendering, the start-up and the CUDA peak."""
    launched = time.perf_counter()
    import atexit

    import torch

    import tandem.policies.ar as ar_module
    import tandem.rl.session as session_module
    from tandem.rl.cli import main as cli_main

    log = os.environ.get("BENCH_CHILD_LOG")
    import tandem.rl.trainer as trainer_module

    decode_s: List[float] = []
    token_s: List[float] = []
    per_rollout: List[Dict[str, float]] = []  # render and token seconds of each rollout batch, in order
    startup: Dict[str, float] = {}  # seconds from this process's start to the run clock's (loading, reward actors)
    original = ar_module.render_tokens
    sample_tokens = ar_module.GlmImageARPolicy._sample_tokens
    rollout_and_score = trainer_module.StageTrainer.rollout_and_score

    def report():
        """Rewritten after every render and at exit, so a job stopped at its timeout keeps its figures."""
        if not log or int(os.environ.get("RANK", 0)) != 0:
            return
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        Path(log).write_text(json.dumps({"per_rollout": per_rollout, "torch_peak_gib": peak, **startup}))

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

    session_start = session_module.RunSession.start

    def started(session):
        hooks = session_start(session)
        startup["startup_s"] = time.perf_counter() - launched
        return hooks

    session_module.RunSession.start = started
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


def job_config(args, stage: str, overrides: List[str]):
    """The job's config as its child loads it: the glm_image YAML of ``stage`` with the launch's overrides."""
    from tandem.rl.config import load_config

    return load_config(str(REPO / "configs" / "glm_image" / f"{stage}.yaml"),
                       [f"model.path={args.model}", f"data.prompts={args.extras}/prompts.jsonl", *overrides], stage=stage)


def job_flops(args, stage: str, cfg) -> Dict[str, float]:
    """Model FLOPs of one RL step's rollout, train and AR render (module docstring); {} for joint jobs."""
    if stage == "joint" or not args.model:
        return {}
    fwd = dit_forward_flops(Path(args.model), cfg.data.height, cfg.data.width)
    if fwd is None:
        return {}
    samples = args.prompts * args.generations
    if stage == "ar":
        return {"render": samples * cfg.ar.decode_steps * (2 if cfg.ar.decode_guidance_scale > 1 else 1) * fwd}
    d, branches = cfg.decoder, (2 if cfg.decoder.guidance_scale > 1 else 1)
    trained = d.sde_window_size if d.sde_window_size > 0 else max(1, round(d.timestep_fraction * (d.num_steps - 1)))
    passes = 3 + (1 if cfg.grpo.beta > 0 else 0)
    epochs = cfg.grpo.num_iterations  # each epoch trains every sample once more
    return {"rollout": samples * d.num_steps * branches * fwd,
            "train": epochs * samples * trained * branches * passes * fwd}


# ------------------------------------------------------------------------------------------------ reading a run
@dataclass(frozen=True)
class BatchPlan:
    """How many optimizer steps a complete rollout batch takes, from the job's config.

    ``per_batch`` = grpo.num_iterations x prompts_per_step·num_generations / (mini_batch_size ·
    optim.gradient_accumulation_steps): one optimizer step per ``gradient_accumulation_steps`` consecutive
    minibatches, in each of the ``num_iterations`` epochs (``tandem.rl.trainer``, phase 5; the config's rules make
    every division exact). A joint job (``phases`` = (joint.ar_steps_per_phase, joint.decoder_steps_per_phase))
    alternates phases of that many steps, AR first (``tandem.rl.session.phase_at``), and a phase's end cuts its
    batch: such a batch is complete at the steps its phase had left."""

    stage: str
    per_batch: int
    phases: Optional[Tuple[int, int]] = None

    @classmethod
    def of(cls, cfg, stage: str) -> "BatchPlan":
        g = cfg.grpo
        samples = g.prompts_per_step * g.num_generations
        per_batch = g.num_iterations * samples // (g.mini_batch_size * cfg.optim.gradient_accumulation_steps)
        phases = (cfg.joint.ar_steps_per_phase, cfg.joint.decoder_steps_per_phase) if stage == "joint" else None
        return cls(stage, per_batch, phases)

    def batch_at(self, done: int) -> Tuple[str, int]:
        """(stage, optimizer steps of a complete batch) of the batch that starts after ``done`` optimizer steps."""
        if self.phases is None:
            return self.stage, self.per_batch
        from tandem.rl.session import phase_at

        stage, _, end = phase_at(done, *self.phases)
        return stage, min(self.per_batch, end - done)

    def steps_for(self, batches: int) -> int:
        """The fewest optimizer steps (``--steps``) in which every stage takes ``batches`` complete batches."""
        done, seen = 0, {}
        stages = ("ar", "decoder") if self.phases else (self.stage,)
        while any(seen.get(s, 0) < batches for s in stages):
            stage, steps = self.batch_at(done)
            seen[stage], done = seen.get(stage, 0) + 1, done + steps
        return done


def rollout_batches(metrics_file: Path, plan: BatchPlan,
                    per_rollout: Sequence[Dict[str, float]] = ()) -> List[Dict[str, object]]:
    """The rollout batches of a fresh run's ``metrics.jsonl`` (none without the file), in order: each one's time
    split, ``steps`` of ``full_steps`` (``complete``), ``call_samples``, ``warmup`` and ``steady`` (module
    docstring). ``per_rollout``: the child's render and token seconds of each rollout (AR batches take them)."""
    path = Path(metrics_file)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    batches: List[Dict] = []
    for m in rows:
        if not batches or m.get("rollout") != batches[-1]["rollout"]:
            batches.append({"rollout": m.get("rollout"), "phase": m.get("phase"), "rollout_s": 0.0, "reward_s": 0.0,
                            "recompute_s": 0.0, "train_s": 0.0, "steps": 0,
                            "call_samples": m.get("rollout/call_samples")})
        b = batches[-1]
        for key in ("rollout_s", "reward_s", "recompute_s", "train_s"):
            b[key] += m.get(f"time/{key}", 0.0)
        b["steps"] += 1
        b["end"] = m.get("cost/elapsed_s", 0.0)
    previous_end, done, last_call = 0.0, 0, {}
    for b in batches:
        b["wall_s"] = b["end"] - previous_end
        previous_end = b["end"]
        b["other_s"] = b["wall_s"] - b["rollout_s"] - b["reward_s"] - b["recompute_s"] - b["train_s"]
        _, b["full_steps"] = plan.batch_at(done)
        done += b["steps"]
        b["complete"] = b["steps"] == b["full_steps"]
        b["warmup"] = b["phase"] not in last_call or b["call_samples"] != last_call[b["phase"]]
        last_call[b["phase"]] = b["call_samples"]
        b["steady"] = b["complete"] and not b["warmup"]
    for b, timed in zip(batches, per_rollout):
        if b["phase"] in (None, "ar") and timed["decode_s"]:
            b.update(timed)
    return batches


def summarise(batches: List[Dict], samples: int, gpus: int, flops: Optional[Dict[str, float]] = None) -> Dict[str, object]:
    """A launch's figures from its ``rollout_batches``: means over the steady batches (none: no figures, and a
    note), their number, and the wall of the first and of the warm-up batches."""
    steady = [b for b in batches if b["steady"]]

    def mean(key):
        vals = [b[key] for b in steady if key in b]
        return sum(vals) / len(vals) if vals else None

    wall = mean("wall_s")
    row = {"batches": batches, "rollouts": len(batches), "optimizer_steps": sum(b["steps"] for b in batches),
           "steady_n": len(steady), "s_per_rl_step": wall, "first_rl_step_s": batches[0]["wall_s"] if batches else None,
           "warmup_s": sum(b["wall_s"] for b in batches if b["warmup"]) if batches else None,
           "gpu_s_per_sample": wall * gpus / samples if wall else None,
           "samples_per_s": samples / wall if wall else None,
           "note": None if steady else "no steady batch"}
    for key in ("rollout_s", "reward_s", "recompute_s", "train_s", "other_s", "decode_s", "token_s"):
        row[key] = mean(key)
        row[key.replace("_s", "_frac")] = row[key] / wall if wall and row[key] is not None else None
    for name, seconds in (("rollout", "rollout_s"), ("train", "train_s"), ("render", "decode_s")):
        f = (flops or {}).get(name)
        row[f"mfu_{name}"] = f / row[seconds] / C.PEAK_BF16_FLOPS if f and row.get(seconds) else None
    return row


def first_step(metrics_file: Path) -> Optional[Dict[str, object]]:
    """The first optimizer step's ratio, clipping, KL, loss and reward (None without a step)."""
    path = Path(metrics_file)
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not lines:
        return None
    first = json.loads(lines[0])
    return {k: first.get(k) for k in ("ratio/mean", "ratio/min", "ratio/max", "clipfrac", "approx_kl", "kl", "loss",
                                      "reward/mean", "phase")}


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


def launch_figures(args, stage: str, rc, run_dir: Path, child_log: Path, overrides: List[str]) -> Dict[str, object]:
    """What a launch measured, read from the files its child wrote: none unless the child exited 0 or was stopped
    at ``--timeout`` (then its run folder holds only its own, possibly partial, metrics)."""
    if rc not in (0, "timeout"):
        return {"note": f"child exited {rc}: no figures", "batches": [], "steady_n": 0}
    cfg = job_config(args, stage, overrides)
    plan = BatchPlan.of(cfg, stage)
    child = json.loads(child_log.read_text()) if child_log.is_file() else {}
    metrics = run_dir / "metrics.jsonl"
    batches = rollout_batches(metrics, plan, child.get("per_rollout", []))
    return {"torch_peak_gib": child.get("torch_peak_gib"), "startup_s": child.get("startup_s"),
            "steps_for_steady": plan.steps_for(3),
            **summarise(batches, args.prompts * args.generations, args.gpus, job_flops(args, stage, cfg)),
            "step1": first_step(metrics)}


def run_stage(args, stage: str, results: C.Results, launch: int = 1) -> Dict:
    """Launch one job in a fresh run folder under ``--work`` (an old one of the same name is removed first) and
    record its row."""
    work = Path(args.work)
    run_dir = work / f"{stage}-{args.gpus}gpu-{args.launcher}-{args.strategy}-{args.prompts * args.generations}-{launch}"
    child_log = run_dir.with_name(run_dir.name + ".child.json")
    shutil.rmtree(run_dir, ignore_errors=True)
    child_log.unlink(missing_ok=True)
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
    samples = args.prompts * args.generations
    row = {"stage": stage, "launch": launch, "gpus": args.gpus, "launcher": args.launcher, "strategy": args.strategy,
           "rc": rc, "job_wall_s": total, "samples_per_rl_step": samples, "overrides": overrides,
           "peak_gpu_mib": mem.peak, **launch_figures(args, stage, rc, run_dir, child_log, overrides)}
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
    ap.add_argument("--work", default="/tmp/tandem-e2e",
                    help="the benchmark's folder: each launch's run folder in it is removed before the launch")
    ap.add_argument("--launches", type=int, default=1, help="launches of each job (2: the second starts warm)")


def run(bench: C.Bench) -> None:
    args = bench.args
    if args.tiny and not args.model:
        args.model, args.extras = C.tiny_release_pipeline(Path(args.work))
    rows = [run_stage(args, stage, bench.results, launch) for stage in args.stages.split(",")
            for launch in range(1, args.launches + 1)]
    C.print_table("End-to-end RL steps (steady = complete rollout batches after the first whose rollout call size "
                  "is the previous batch's)", rows, [
        ("stage", "stage", ""), ("samples", "samples_per_rl_step", ""), ("launch", "launch", ""),
        ("GPUs", "gpus", ""), ("rc", "rc", ""), ("steps", "optimizer_steps", ""), ("steady n", "steady_n", ""),
        ("s/RL step", "s_per_rl_step", ".1f"), ("start-up s", "startup_s", ".1f"), ("first s", "first_rl_step_s", ".1f"), ("warm-up s", "warmup_s", ".1f"),
        ("GPU-s/sample", "gpu_s_per_sample", ".2f"),
        ("rollout", "rollout_frac", ".0%"), ("render", "decode_frac", ".0%"), ("token", "token_frac", ".0%"),
        ("reward wait", "reward_frac", ".0%"), ("recompute", "recompute_frac", ".0%"), ("train", "train_frac", ".0%"),
        ("other", "other_frac", ".1%"),
        ("MFU rollout", "mfu_rollout", ".0%"), ("MFU train", "mfu_train", ".0%"), ("MFU render", "mfu_render", ".0%"),
        ("torch peak GiB", "torch_peak_gib", ".1f"), ("note", "note", ""),
    ])
    for r in rows:
        print(f"{r['stage']}: peak nvidia-smi MiB per GPU {r['peak_gpu_mib']}; step 1 {r.get('step1')}")
    for r in rows:
        if r["rc"] in (0, "timeout") and not r["steady_n"]:
            print(f"hint: {r['stage']} launch {r['launch']} has no steady rollout batch in {r['optimizer_steps']} "
                  f"optimizer step(s): run more --steps (--steps {r['steps_for_steady']} gives each stage 3 complete "
                  f"batches)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["child"]:
        return child(argv[1:])
    return C.main("end_to_end", __doc__, arguments, run, argv, dtype=False,
                  tiny_help="tiny models built here, CPU (smoke test)")


if __name__ == "__main__":
    sys.exit(main())
