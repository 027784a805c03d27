"""A training job from start to end: the run session around the one loop (``tandem.rl.trainer``).

``train(cfg, stage)`` and ``train_joint(cfg)`` hold the run folder's lock (``tandem.rl.run_lock``: one job
per ``output_dir``), check their inputs, then run inside one ``RunSession``, which opens, in this order and
closes in reverse: the stop-signal handlers (``tandem.rl.signals``); the reward clients (training, and eval
when configured); the run directory (resume from ``cfg.resume``, or refuse to write over an existing run); the
progress bar; and the experiment trackers (``logging.report_to``). Its ``Hooks`` are phase 6 of every optimizer
step: metrics line (and trackers), sample grid, eval, and the checkpoints taken between rollouts.

Start-up overlaps: entering the session spawns the reward actors, which build their rewards in their own
processes while the job loads the family's pipeline and policies; ``RunSession.start`` then waits for the
rewards, logs one INFO line with the seconds spent loading and waiting, and starts the run clock
(``cost/elapsed_s`` counts training only). A reward that cannot be built stops the job there with its one line;
an error or a signal while loading closes the reward actors and Ray like any other.

Crash safety: a checkpoint is only ever taken where the trained state is whole — at a rollout boundary or
after a finished optimizer step, never while an optimizer step is being applied. SIGINT / SIGTERM stop the
job at the end of the current rollout, with a checkpoint (``tandem.rl.signals``); an exception between steps
(a reward that breaks, a failing sample grid) takes a checkpoint before it propagates. The final checkpoint
is taken before the final sample grid and eval, and an eval that fails is logged and skipped; a checkpoint
keeps its step's metrics line, which resume writes if the job died before it did.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import PIL.Image
import torch

from tandem.core.data import load_prompts
from tandem.core.errors import ConfigError
from tandem.core.types import PromptRecord
from tandem.policies.base import edit_key, edits
from tandem.policies.compile_cache import use_compile_cache
from tandem.policies.families import get_family
from tandem.policies.settings import PolicySettings
from tandem.rl.buffer import load_buffer_records
from tandem.rl.checkpoint import (config_fingerprint, find_resume_point, read_state, restore, save_checkpoint,
                                  saved_config_fingerprint, CheckpointError)
from tandem.rl.config import JobConfig, phase_config
from tandem.rl.distributed import finish, launch_rank
from tandem.rl.run_dir import RunDir, scalars
from tandem.rl.run_lock import run_folder_lock
from tandem.rl.run_state import RunState
from tandem.rl.signals import StopSignals, Stopped
from tandem.rl.trackers import Trackers
from tandem.rl.trainer import StageTrainer

log = logging.getLogger("tandem.session")


def build_policy(stage: str, cfg: JobConfig, pipe=None):
    """The policy of ``stage`` of the family ``model.family``, over its pipeline at ``model.path`` (or ``pipe``),
    built from the stage's ``PolicySettings`` (never the whole job config)."""
    family = get_family(cfg.model.family)
    if stage not in family.policies:
        raise ConfigError(f"model.family {family.name!r} has no {stage} stage (it trains: {', '.join(family.policies)})")
    return family.policies[stage](family.load(cfg.model) if pipe is None else pipe, PolicySettings.from_job(cfg, stage))


@dataclass
class JobPrompts:
    """A job's prompt records, read once (``job_prompts``).

    Attributes:
        train: the records the job trains on (a joint job: its AR stage's, whose rollouts condition the decoder).
        eval: the held-out records of the periodic eval (``data.eval_prompts`` when ``logging.eval_every``), else
            empty.
    """

    train: List[PromptRecord]
    eval: List[PromptRecord] = field(default_factory=list)


def job_prompts(cfg: JobConfig, stage: str) -> JobPrompts:
    """The job's training and eval records, each file read once; an editing stage checks their source images
    (``check_sources``)."""
    records = training_records(cfg, "ar" if stage == "joint" else stage)
    if not (cfg.data.eval_prompts and cfg.logging.eval_every):
        return JobPrompts(records)
    eval_records = load_prompts(cfg.data.eval_prompts, (cfg.data.height, cfg.data.width), cfg.data.allowed_roots)
    check_sources(cfg, stage, eval_records, cfg.data.eval_prompts)
    return JobPrompts(records, eval_records)


def load_checked(cfg: JobConfig, stage: str, prompts: JobPrompts):
    """The family's pipeline, after checking that the training and eval prompts fit the model (one line if not)."""
    family = get_family(cfg.model.family)
    pipe = family.load(cfg.model)
    if family.check_prompts is not None:
        family.check_prompts(pipe, [r.prompt for r in prompts.train + prompts.eval], cfg, stage)
    return pipe


def check_sources(cfg: JobConfig, stage: str, records: List[PromptRecord], source: str) -> None:
    """An editing stage (``tandem.policies.base.edits``) needs a source image (``reference``) in every record: one
    line naming the first prompt without one."""
    key, editing = edit_key(stage), edits(cfg, stage)
    missing = [r.prompt for r in records if "reference" not in r.metadata]
    if editing and missing:
        raise ConfigError(f"{key}: the prompt {missing[0]!r} in {source} has no source image; give every record a "
                          f"'reference' (an image path), or set {key}=false")


def training_records(cfg: JobConfig, stage: str) -> List[PromptRecord]:
    """The stage's prompt records (an editing stage checks their source images: ``check_sources``)."""
    size = (cfg.data.height, cfg.data.width)
    if stage == "decoder" and cfg.decoder.condition_source == "buffer":
        source = f"the buffer in {cfg.decoder.buffer_dir}"
        records = load_buffer_records(cfg.decoder.buffer_dir, *size, allowed_roots=cfg.data.allowed_roots)
    else:
        source, records = cfg.data.prompts, load_prompts(cfg.data.prompts, size, cfg.data.allowed_roots)
    check_sources(cfg, stage, records, source)
    return records


def check_rewards(cfg: JobConfig) -> None:
    """Import ``reward_modules``, then find every reward entry and check its args and weight paths
    (``--dry-run`` too)."""
    from tandem.rewards.base import check_entries, import_reward_modules

    import_reward_modules(cfg.reward_modules)
    check_entries(cfg.rewards)
    check_entries(cfg.eval.rewards, key="eval.rewards")


def check_inputs(cfg: JobConfig, stage: str) -> JobPrompts:
    """Unknown rewards, bad reward args or missing reward weights, an unreachable reward_host.address, an
    output_dir that cannot be written or resumed, bad prompt files and bad buffers fail here, before any model
    is loaded. Returns the job's prompt records (read here, once)."""
    check_rewards(cfg)
    if cfg.reward_host.backend == "ray" and cfg.reward_host.address:
        from tandem.rewards.host import check_reachable

        check_reachable(cfg.reward_host.address, "reward_host.address")
    run = RunDir(cfg.output_dir)
    run.check_writable()
    resume_point(cfg, run)
    return job_prompts(cfg, stage)


def resume_point(cfg: JobConfig, run: RunDir) -> Optional[Path]:
    """The checkpoint to resume from (checked against ``cfg``), or None to start at step 0.

    Without a checkpoint: a fresh output_dir starts; a run there is refused without ``resume``; with
    ``resume=auto`` it restarts from step 0 when its config.yaml has this config's fingerprint (its logged
    metrics would repeat, so they are cleared) and is refused when it has another (nothing is overwritten)."""
    point = find_resume_point(cfg)
    if point is not None:
        read_state(point, cfg)
        return point
    if not run.read_metrics():
        return None
    if cfg.resume is None:
        raise ConfigError(f"output_dir {run.path} already holds a run (metrics.jsonl); pass resume=auto "
                          f"to continue it, or choose another output_dir")
    config_file = run.path / "config.yaml"
    if not config_file.is_file() or saved_config_fingerprint(config_file) != config_fingerprint(cfg):
        raise ConfigError(f"resume=auto: output_dir {run.path} holds a run of a different config (its config.yaml) "
                          f"and no checkpoint; choose another output_dir")
    return None


GRID_PROMPTS = 4  # tiles per sample grid


def distinct_prompts(records: List[PromptRecord], n: int) -> List[PromptRecord]:
    """The first ``n`` records with distinct prompts (a joint run's decoder records repeat each prompt once
    per group copy)."""
    seen, out = set(), []
    for r in records:
        if r.prompt not in seen:
            seen.add(r.prompt)
            out.append(r)
            if len(out) == n:
                break
    return out


class Hooks:
    """Phase 6 for every stage: metrics line, progress bar, sample grids, eval, checkpoints, requested stops."""

    def __init__(self, cfg: JobConfig, run: RunDir, trainers: Dict[str, StageTrainer], evaluator, progress,
                 last_checkpoint: Optional[Path], trackers: Trackers, signals: Optional[StopSignals] = None):
        """``last_checkpoint``: the checkpoint the job resumed from (None for a fresh run)."""
        self.cfg, self.run, self.trainers, self.evaluator, self.progress = cfg, run, trainers, evaluator, progress
        self.trackers, self.signals = trackers, signals
        self.state = next(iter(trainers.values())).state
        self.last_checkpoint, self.last_checkpoint_step = last_checkpoint, self.state.step
        self.last_metrics: Optional[Dict] = None  # the latest step's metrics (a checkpoint of that step keeps them)

    def after_step(self, trainer: StageTrainer, metrics: Dict) -> None:
        """The final step's checkpoint comes first (keeping this step's metrics: ``record`` then writes them)."""
        self.last_metrics = metrics
        if trainer.state.step >= self.cfg.max_steps:  # the loop ends at this step: its rollout counts as done
            self.checkpoint(trainer, rollouts=trainer.state.rollouts + 1)
        self.record(trainer, metrics)

    def record(self, trainer: StageTrainer, metrics: Dict) -> None:
        """Eval (when due), the metrics line, trackers and progress bar, sample grid (when due). One process
        scores and writes the run directory; a sharded (FSDP) policy's forward is collective, so then every
        process samples the eval images and the grid."""
        step, every, layout = metrics["step"], self.cfg.logging, trainer.layout
        if not (layout.is_main or layout.sharded):
            return
        if self.evaluator is not None and every.eval_every and step % every.eval_every == 0:
            self._evaluate(trainer, step, metrics)
        if layout.is_main:
            self.run.log_metrics(metrics)
            self.trackers.log(metrics, step)
            self.progress.update(1)
            self.progress.set_postfix(phase=trainer.stage, reward=f"{metrics['reward/mean']:.3f}",
                                      kl=f"{metrics['kl']:.2e}")
        if step == self.cfg.max_steps or (every.sample_every and step % every.sample_every == 0):
            self.sample_grid(trainer)

    def sample_grid(self, trainer: StageTrainer) -> None:
        """samples/step_N.png: the trainer's first GRID_PROMPTS distinct prompts at the current step (step 0 =
        before training), with the reward curve redrawn."""
        step, layout = trainer.state.step, trainer.layout
        if not (layout.is_main or layout.sharded):
            return
        grid = distinct_prompts(trainer.records, GRID_PROMPTS)
        prompts = [r.prompt for r in grid]
        images = trainer.policy.sample(prompts, [r.metadata for r in grid], seed=self.cfg.seed)
        if layout.is_main:
            saved = self.run.save_grid(f"step_{step:06d}", images, prompts)
            self.trackers.log_image("samples", np.asarray(PIL.Image.open(saved).convert("RGB")), step)
            self.run.plot_rewards()

    def _evaluate(self, trainer: StageTrainer, step: int, metrics: Dict) -> None:
        """The periodic eval; one that fails is logged (one line) and training goes on."""
        try:
            if trainer.layout.is_main:
                metrics.update(self.evaluator.evaluate(trainer.policy, step, metrics["reward/mean"]))
            else:
                self.evaluator.sample(trainer.policy)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            log.error("eval at step %d failed and was skipped (training goes on): %s: %s", step, type(e).__name__, first)

    def after_rollout(self, trainer: StageTrainer) -> None:
        """Checkpoints are taken between rollouts (nothing half-trained is lost): every checkpoint_every steps
        and at the end. The main process writes; under FSDP every process takes part (the shards are gathered).
        A requested stop (SIGINT / SIGTERM) happens here."""
        step, every = trainer.state.step, self.cfg.logging.checkpoint_every
        due = every and step // every > self.last_checkpoint_step // every
        if due or step >= self.cfg.max_steps:
            self.checkpoint(trainer)
        self.stop_if_requested(trainer)

    def checkpoint(self, trainer: StageTrainer, rollouts: Optional[int] = None) -> Optional[Path]:
        """Save ``checkpoints/step_N`` at the current step unless it exists already (every process of a sharded
        policy takes part; the main one writes), with the step's metrics line. A second stop signal waits until
        it is written (``StopSignals.shielded``)."""
        layout, state = trainer.layout, trainer.state
        if state.step == self.last_checkpoint_step or not (layout.is_main or layout.sharded):
            return None
        scaler = getattr(trainer.accelerator, "scaler", None)
        run_state = dict(state.to_dict(), **({} if rollouts is None else {"rollouts": rollouts}))
        metrics = self.last_metrics if self.last_metrics and self.last_metrics["step"] == state.step else None
        extra = {"run_state": run_state, "grad_scaler": scaler.state_dict() if scaler is not None else None,
                 "metrics": None if metrics is None else scalars(metrics)}
        with self.signals.shielded() if self.signals is not None else contextlib.nullcontext():
            out = save_checkpoint(self.run.checkpoints, state.step, self.trainers, self.cfg, extra,
                                  write=layout.is_main)
            self.last_checkpoint, self.last_checkpoint_step = out, state.step
        return out

    def where(self) -> str:
        """The step and what a resume continues from (the stop messages)."""
        at = f"at step {self.state.step}"
        if self.last_checkpoint is None:
            return f"{at}; no checkpoint was saved (resume=auto starts again from step 0)"
        how = "resume=auto" if self.last_checkpoint.parent == self.run.checkpoints else f"resume={self.last_checkpoint}"
        return f"{at}; the last checkpoint is {self.last_checkpoint} (continue with {how})"

    def stop_if_requested(self, trainer: StageTrainer) -> None:
        """At a rollout boundary: after a requested stop (SIGINT / SIGTERM), checkpoint and raise Stopped (not
        once the job is done)."""
        if self.signals is not None and self.signals.requested and trainer.state.step < self.cfg.max_steps:
            self.checkpoint(trainer)
            raise Stopped(f"stopped by {self.signals.requested} {self.where()}")

    def rescue(self, trainer: StageTrainer, error: BaseException) -> None:
        """After an exception: checkpoint if the trained state is whole (not inside an optimizer step) and one
        process holds all of it (a sharded policy's gather would need every process)."""
        if (trainer.half_updated or trainer.layout.sharded or not trainer.layout.is_main
                or self.last_checkpoint_step == trainer.state.step):
            return
        if isinstance(error, CheckpointError):  # writing one just failed (a full disk): another would too
            return
        try:
            out = self.checkpoint(trainer)
            log.warning("%s at step %d: checkpoint saved in %s (continue with resume=auto)", type(error).__name__,
                        trainer.state.step, out)
        except Exception as e:
            log.error("could not save a checkpoint after %s: %s: %s", type(error).__name__, type(e).__name__, e)


class RunSession:
    """Reward clients, run directory and progress bar of one job (module docstring: the order).

    Usage::

        with RunSession(cfg) as session:          # the reward actors start building
            policy = ...                           # load the pipeline and policies meanwhile
            session.trainer(stage, cfg, policy, accelerator, records)
            hooks = session.start()                # waits for the rewards; the run clock starts
            ... trainer.train_rollout(stop, hooks) ...
    """

    def __init__(self, cfg: JobConfig, eval_records: Optional[List[PromptRecord]] = None):
        """``eval_records``: the periodic eval's held-out records (``JobPrompts.eval``; None = read them)."""
        self.cfg, self.run, self.state = cfg, RunDir(cfg.output_dir), RunState()
        self.eval_records = eval_records
        self._stack = contextlib.ExitStack()
        self.rewards = self.evaluator = self.progress = self.hooks = self.trackers = self.signals = None
        self.trainers: Dict[str, StageTrainer] = {}
        self._clients: List = []  # the reward clients this session started (start() waits for them)
        self._entered = 0.0  # perf_counter() when the session was entered (the start-up's start)
        self._unlogged: Optional[Dict] = None  # the resumed checkpoint's metrics line, when metrics.jsonl lacks it

    def __enter__(self) -> "RunSession":
        self._entered = time.perf_counter()
        with self._stack as stack:
            self.signals = stack.enter_context(StopSignals())  # first in, last out: it covers the clean-up
            self.rewards = self._start_rewards(stack, self.cfg.rewards)
            if self.cfg.logging.eval_every:
                from tandem.rl.periodic_eval import Evaluator

                eval_rewards = self.cfg.eval.rewards
                eval_client = self._start_rewards(stack, eval_rewards) if eval_rewards else self.rewards
                self.evaluator = Evaluator(self.cfg, eval_client, self.eval_records)
            self._stack = stack.pop_all()
        return self

    def _start_rewards(self, stack: contextlib.ExitStack, entries):
        """A reward client whose rewards start building now (``start`` waits for them), closed with the session."""
        from tandem.rewards.client import RewardClient

        client = RewardClient(entries, self.cfg.reward_host)
        stack.callback(client.close)
        self._clients.append(client.start(wait=False))
        return client

    def trainer(self, stage: str, cfg: JobConfig, policy, accelerator, records: List[PromptRecord],
                num_steps: Optional[int] = None) -> StageTrainer:
        """The stage's trainer; ``num_steps`` (default ``max_steps``) is the length of its LR schedule."""
        self.trainers[stage] = StageTrainer(stage, cfg, policy, self.rewards, self.run, accelerator, self.state, records,
                                            num_steps or cfg.max_steps)
        return self.trainers[stage]

    def start(self) -> Hooks:
        """Wait for the rewards (``_wait_for_rewards``: the run clock starts after them), resume (or refuse to
        overwrite), write the run directory, start the trackers; returns the phase-6 hooks.
        A resumed checkpoint's metrics line that metrics.jsonl lacks (the job died between the final checkpoint
        and that line) is written now, with its eval and sample grid when due, as the job would have."""
        self._wait_for_rewards()
        point = self._resume()
        if self._layout.is_main:
            self.run.create(self.cfg)
        self.trackers = Trackers(self.cfg, next(iter(self.trainers.values())).accelerator)
        from tqdm.auto import tqdm

        self.progress = tqdm(total=self.cfg.max_steps, initial=self.state.step - (self._unlogged is not None),
                             desc="train", dynamic_ncols=True,
                             disable=not (self.cfg.logging.progress and self._layout.is_main))
        self.hooks = Hooks(self.cfg, self.run, self.trainers, self.evaluator, self.progress, last_checkpoint=point,
                           trackers=self.trackers, signals=self.signals)
        if self._unlogged is not None:
            self.hooks.record(self.trainers[self._unlogged.get("phase", self._first.stage)], self._unlogged)
        self.signals.arm(self.hooks.where)
        return self.hooks

    def _wait_for_rewards(self) -> None:
        """Wait until every reward is built (one that cannot be raises its one-line error), log the start-up's
        seconds (since the session was entered: starting the reward actors and loading; then waiting for the
        rewards), and start the run clock."""
        loaded = time.perf_counter()
        for client in self._clients:
            client.wait_ready()
        ready = time.perf_counter()
        if self._layout.is_main:
            log.info("start-up: %.1f s starting the reward actors and loading the model and policies, then %.1f s "
                     "waiting for the rewards to be built (they build beside the load); training starts now "
                     "(cost/elapsed_s counts from here)", loaded - self._entered, ready - loaded)
        self.state.start_clock()

    def _active(self) -> StageTrainer:
        """The trainer that ran last (the one an exception came from)."""
        return max(self.trainers.values(), key=lambda t: t.last_active)

    @property
    def _first(self) -> StageTrainer:
        return next(iter(self.trainers.values()))

    @property
    def _layout(self):
        return self._first.layout

    def _resume(self) -> Optional[Path]:
        """Restore the checkpoint to resume from (None: start at step 0) and trim metrics.jsonl to it."""
        point = resume_point(self.cfg, self.run)
        if point is None:
            if self.cfg.resume is not None and self._layout.is_main and self.run.read_metrics():
                self.run.truncate_metrics(0)
                log.warning("resume=auto: %s has no checkpoint; restarting the run from step 0 (the steps it logged "
                            "are cleared)", self.run.path)
            return None
        saved = read_state(point, self.cfg)
        restore(point, self.trainers, saved)
        self.state.load(saved["run_state"])
        scaler = self._first.accelerator.scaler
        if scaler is not None and saved.get("grad_scaler"):
            scaler.load_state_dict(saved["grad_scaler"])
        row = saved.get("metrics")  # absent from checkpoints of older tandems
        if point.resolve().parent != self.run.checkpoints.resolve():
            row = None  # another run's checkpoint: this run's metrics start after it
        if self._layout.is_main:
            self.run.truncate_metrics(self.state.step)  # steps logged after the checkpoint by a killed run are redone
            logged = {r["step"] for r in self.run.read_metrics()}
            row = row if row is not None and row["step"] not in logged else None
        self._unlogged = self._layout.broadcast(row)  # under FSDP every process takes part in its eval and grid
        log.info("resumed from %s at step %d", point, self.state.step)
        return point

    def __exit__(self, exc_type, exc, _tb) -> None:
        try:
            if self.signals is not None:
                self.signals.close()
            if self.progress is not None:
                self.progress.close()
            if exc is not None and self.hooks is not None and not isinstance(exc, KeyboardInterrupt):
                self.hooks.rescue(self._active(), exc)
            if self.trackers is not None:
                self.trackers.finish()
            if exc_type is None and self.trainers:
                if self._layout.is_main:
                    self.run.plot_rewards()
                finish(next(iter(self.trainers.values())).accelerator)
        finally:
            self._stack.__exit__(exc_type, exc, _tb)  # StopSignals may give a stop at once its message back


def _accelerator(cfg: JobConfig, policy):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    # accelerate owns precision (rollout and training forwards run under the same autocast) and the trackers. The
    # shared autocast does not make the first on-policy ratio exactly 1 in bf16: the rollout's cached decode and the
    # training's teacher-forced forward round differently (grpo.old_log_probs recomputes the denominator for
    # that); fp32 gives |r - 1| < 1e-5.
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "tensorboard"))
    return Accelerator(mixed_precision=cfg.optim.mixed_precision, cpu=policy.device.type == "cpu",
                       log_with=list(cfg.logging.report_to) or None, project_config=project)


def holds_run_folder(job):
    """Run ``job(cfg, ...)`` holding the lock of ``cfg.output_dir`` on the main process (``tandem.rl.run_lock``):
    a second job on a live run is refused before it reads the run folder."""
    @functools.wraps(job)
    def run(cfg: JobConfig, *args, **kwargs):
        with run_folder_lock(cfg.output_dir, main=launch_rank() == 0):
            return job(cfg, *args, **kwargs)
    return run


@holds_run_folder
def train(cfg: JobConfig, stage: str) -> Path:
    """Run a GRPO job on ``stage`` ("ar" | "decoder"); returns the run directory."""
    prompts = check_inputs(cfg, stage)
    use_compile_cache(cfg.model.compile_cache_dir)
    torch.manual_seed(cfg.seed)
    with RunSession(cfg, prompts.eval) as session:  # the reward actors build while the pipeline loads
        policy = build_policy(stage, cfg, load_checked(cfg, stage, prompts))
        trainer = session.trainer(stage, cfg, policy, _accelerator(cfg, policy), prompts.train)
        hooks = session.start()  # waits for the rewards; the run clock starts
        if session.state.step == 0 and cfg.logging.sample_every:
            hooks.sample_grid(trainer)  # step 0: what training starts from
        while session.state.step < cfg.max_steps:
            hooks.stop_if_requested(trainer)
            trainer.train_rollout(cfg.max_steps, hooks)
    return session.run.path


def joint_stage_steps(cfg: JobConfig) -> Dict[str, int]:
    """Optimizer steps each stage of a joint job takes in ``max_steps`` (AR phases first, then decoder phases)."""
    j, steps, done = cfg.joint, {"ar": 0, "decoder": 0}, 0
    while done < cfg.max_steps:
        for stage, n in (("ar", j.ar_steps_per_phase), ("decoder", j.decoder_steps_per_phase)):
            taken = min(n, cfg.max_steps - done)
            steps[stage], done = steps[stage] + taken, done + taken
    return steps


def phase_at(step: int, ar_steps: int, decoder_steps: int) -> Tuple[str, int, int]:
    """(stage, first step, end step) of the phase that takes optimizer step ``step + 1`` when phases of
    ``ar_steps`` AR and ``decoder_steps`` decoder optimizer steps alternate, AR first, without end."""
    cycle_start = step - step % (ar_steps + decoder_steps)
    if step - cycle_start < ar_steps:
        return "ar", cycle_start, cycle_start + ar_steps
    start = cycle_start + ar_steps
    return "decoder", start, start + decoder_steps


def joint_phase(cfg: JobConfig, step: int) -> Tuple[str, int, int]:
    """(stage, first step, last step) of the joint phase that takes optimizer step ``step + 1`` (``phase_at`` of
    joint.ar_steps_per_phase and joint.decoder_steps_per_phase); the last phase ends at max_steps. A function of
    the global step only, so a resumed job continues the phase it stopped in."""
    stage, start, end = phase_at(step, cfg.joint.ar_steps_per_phase, cfg.joint.decoder_steps_per_phase)
    return stage, start, min(cfg.max_steps, end)


@holds_run_folder
def train_joint(cfg: JobConfig) -> Path:
    """Alternate AR-GRPO and decoder flow-GRPO phases on one pipeline, one reward client and one run.

    Each AR phase's rollouts (prompts with their hand-off, the sampled token grids) are the conditions of the
    next decoder phase — the shared buffer in memory (and on disk with ``buffer.save``), drawn from a prompt
    stream seeded at the phase's start. Checkpoints keep the latest hand-off and that stream's seed and
    position, so a job resumed at or inside a decoder phase trains on the same conditions (with several
    processes, each hands off its own copies and a checkpoint keeps the main process's, which every process then
    trains on). Without any AR rollout yet the decoder phase gets its conditions from the family's own source
    (``decoder.condition_source``).
    """
    job = check_inputs(cfg, "joint")
    prompts = job.train
    use_compile_cache(cfg.model.compile_cache_dir)
    torch.manual_seed(cfg.seed)
    phases = {"ar": phase_config(cfg, "ar"), "decoder": phase_config(cfg, "decoder")}
    with RunSession(cfg, job.eval) as session:  # the reward actors build while the pipeline loads
        pipe = load_checked(cfg, "joint", job)
        policies = {stage: build_policy(stage, phases[stage], pipe) for stage in ("ar", "decoder")}
        accelerator = _accelerator(cfg, policies["ar"])
        steps = joint_stage_steps(cfg)
        ar, decoder = (session.trainer(s, phases[s], policies[s], accelerator, prompts, steps[s]) for s in ("ar", "decoder"))
        hooks = session.start()
        if session.state.step == 0 and cfg.logging.sample_every:
            hooks.sample_grid(ar)  # step 0: what training starts from
        state = session.state
        while state.step < cfg.max_steps:
            stage, start, stop = joint_phase(cfg, state.step)
            trainer = session.trainers[stage]
            if trainer is decoder and ar.handoff and decoder.records is not ar.handoff:
                resumed = decoder.sampler.state_dict() if state.step > start else None  # inside the phase
                decoder.use_records(ar.handoff, cfg.seed + state.rollouts, resumed)
            while state.step < stop:
                hooks.stop_if_requested(trainer)
                trainer.train_rollout(stop, hooks)
    return session.run.path
