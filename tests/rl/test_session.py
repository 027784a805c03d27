"""The session's job logic on fakes (tests/fakes.py: a Gaussian policy of 4 numbers, a plain-function reward),
fast enough for the edit loop: train, checkpoint, resume=auto continuing exactly, the joint phase schedule, an
on-policy first ratio of 1, the run folder's lock held for the whole job, Ctrl-C stopping at a rollout boundary.
The same jobs on the tiny GLM-Image models: tests/jobs/."""

import json
import os

import pytest
import torch

from tandem.core.errors import ConfigError
from tandem.rl.config import load_config
from tandem.rl.run_lock import LOCK_NAME, RunLock
from tandem.rl.session import train, train_joint
from tandem.rl.signals import Interrupted, Stopped
from tests.fakes import FAMILY, fake_reward, register_fake_family

VOLATILE = ("time/", "cost/")  # wall-clock figures differ between any two runs


@pytest.fixture(scope="module", autouse=True)
def fake_family():
    from tandem.policies.families import FAMILIES

    register_fake_family()
    yield
    FAMILIES.unregister(FAMILY)


def cfg(stage, out, *extra):
    return load_config(f"configs/demo/{stage}.yaml", [
        f"output_dir={out}", f"model.family={FAMILY}", f"model.path={out.parent / 'no-model'}",
        "model.create_tiny_if_missing=false", "logging.progress=false", "logging.sample_every=0",
        "reward_host.backend=local", "rewards=[{fn: 'tests.fakes:fake_reward'}]", "decoder.ema_decay=0",
        *extra], stage=stage)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def stable(row):
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def weights(run, step, component="fake_decoder"):
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step_{step}" / component / "model.safetensors"))["mean"]


def test_a_job_trains_checkpoints_and_its_first_ratio_is_one(tmp_path):
    run = train(cfg("decoder", tmp_path / "run", "max_steps=4", "logging.checkpoint_every=2"), "decoder")
    metrics = rows(run)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert metrics[0]["ratio/min"] == metrics[0]["ratio/max"] == 1.0  # sampled by the weights it trains
    assert metrics[1]["ratio/min"] < 1 < metrics[1]["ratio/max"]  # the second minibatch sees the first's update
    assert not torch.equal(weights(run, 2), weights(run, 4))  # the updates moved the means


def test_resume_auto_after_a_stop_continues_the_same_metric_stream(tmp_path):
    straight = train(cfg("decoder", tmp_path / "straight", "max_steps=6", "logging.checkpoint_every=2"), "decoder")
    partial = train(cfg("decoder", tmp_path / "resumed", "max_steps=2", "logging.checkpoint_every=2"), "decoder")
    resumed = train(cfg("decoder", partial, "max_steps=6", "logging.checkpoint_every=2", "resume=auto"), "decoder")
    assert [stable(r) for r in rows(resumed)] == [stable(r) for r in rows(straight)]
    assert torch.equal(weights(resumed, 6), weights(straight, 6))


def test_joint_phases_follow_the_schedule_and_resume_at_each_phase_boundary(tmp_path):
    def joint(out, *extra):
        return train_joint(cfg("joint", out, "max_steps=6", "joint.ar_steps_per_phase=2", "joint.decoder_steps_per_phase=2",
                               "logging.checkpoint_every=2", "buffer.save=false", *extra))

    straight = joint(tmp_path / "straight")
    assert [r["phase"] for r in rows(straight)] == ["ar", "ar", "decoder", "decoder", "ar", "ar"]
    for step in (2, 4):  # an AR phase just ended; a decoder phase just ended
        resumed = joint(tmp_path / f"from_{step}", f"resume={straight / 'checkpoints' / f'step_{step}'}")
        assert [stable(r) for r in rows(resumed)] == [stable(r) for r in rows(straight)[step:]], step


# ------------------------------------------------------------------------------------------ the run folder's lock
class LockProbe:
    """fake_reward, and on every call a second job's try at the run folder's lock (args.run): what it met is
    appended to ``LockProbe.seen`` (the refusal's line, or "free")."""

    seen = []

    def __init__(self, run):
        self.run = run

    def __call__(self, images, prompts, metadata):
        try:
            RunLock(self.run).acquire().release()
            LockProbe.seen.append("free")
        except ConfigError as e:
            LockProbe.seen.append(str(e))
        return fake_reward(images, prompts, metadata)


@pytest.mark.parametrize("stage", ["ar", "decoder", "joint"])
def test_a_job_holds_its_run_folder_until_it_ends(tmp_path, stage):
    """Every scoring call of the job finds the folder locked by this process; after the job the lock is gone."""
    run = tmp_path / "run"
    probe = f"rewards=[{{fn: 'tests.rl.test_session:LockProbe', args: {{run: '{run}'}}}}]"
    LockProbe.seen = []
    if stage == "joint":
        train_joint(cfg("joint", run, "max_steps=2", "joint.ar_steps_per_phase=1", "joint.decoder_steps_per_phase=1",
                        "buffer.save=false", probe))
    else:
        train(cfg(stage, run, "max_steps=2", probe), stage)
    assert LockProbe.seen and all("in use by another tandem job" in line and f"pid {os.getpid()} " in line
                                  for line in LockProbe.seen), LockProbe.seen
    assert not (run / LOCK_NAME).exists() and (run / "metrics.jsonl").is_file()


# ------------------------------------------------------------------------------------------------ Ctrl-C
CTRL_C = "rewards=[{fn: 'tests.reward_plugins:CtrlCAt'}]"  # a SIGINT on the scoring calls $TANDEM_TEST_CTRL_C lists


def test_ctrl_c_mid_rollout_stops_at_its_end_and_resume_continues_the_same_metric_stream(tmp_path, monkeypatch):
    """Rollouts of two scoring calls and two optimizer steps: a Ctrl-C while the first rollout is scored lets its
    two steps run, then checkpoints at step 2 and stops; resume=auto writes what an uninterrupted run writes."""
    straight = train(cfg("decoder", tmp_path / "straight", "max_steps=4", CTRL_C), "decoder")
    stopped = tmp_path / "stopped"
    monkeypatch.setenv("TANDEM_TEST_CTRL_C", "2")
    with pytest.raises(Stopped, match=r"^stopped by SIGINT at step 2; the last checkpoint is .*step_2 \(continue with "
                                      r"resume=auto\)$"):
        train(cfg("decoder", stopped, "max_steps=4", CTRL_C), "decoder")
    monkeypatch.delenv("TANDEM_TEST_CTRL_C")
    assert [r["step"] for r in rows(stopped)] == [1, 2] and not (stopped / LOCK_NAME).exists()
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step_2"]
    train(cfg("decoder", stopped, "max_steps=4", CTRL_C, "resume=auto"), "decoder")
    assert [stable(r) for r in rows(stopped)] == [stable(r) for r in rows(straight)]
    assert torch.equal(weights(stopped, 4), weights(straight, 4))


def test_a_second_ctrl_c_stops_at_once_naming_the_last_checkpoint(tmp_path, monkeypatch):
    """Both Ctrl-Cs while the second rollout is scored (calls 3 and 4): the job stops at once, before that rollout's
    steps; the line names the step-2 checkpoint, from which resume=auto continues exactly."""
    straight = train(cfg("decoder", tmp_path / "straight", "max_steps=4", CTRL_C), "decoder")
    stopped = tmp_path / "stopped"
    monkeypatch.setenv("TANDEM_TEST_CTRL_C", "3,4")
    with pytest.raises(Interrupted) as stop:
        train(cfg("decoder", stopped, "max_steps=4", "logging.checkpoint_every=2", CTRL_C), "decoder")
    monkeypatch.delenv("TANDEM_TEST_CTRL_C")
    assert str(stop.value) == (f"stopped at once by a second SIGINT at step 2; the last checkpoint is "
                               f"{stopped / 'checkpoints' / 'step_2'} (continue with resume=auto)")
    assert [r["step"] for r in rows(stopped)] == [1, 2] and not (stopped / LOCK_NAME).exists()
    train(cfg("decoder", stopped, "max_steps=4", "logging.checkpoint_every=2", CTRL_C, "resume=auto"), "decoder")
    assert [stable(r) for r in rows(stopped)] == [stable(r) for r in rows(straight)]
