"""The session's job logic on fakes (tests/fakes.py: a Gaussian policy of 4 numbers, a plain-function reward),
fast enough for the edit loop: train, checkpoint, resume=auto continuing exactly, the joint phase schedule, an
on-policy first ratio of 1. The same jobs on the tiny GLM-Image models: tests/jobs/."""

import json

import pytest
import torch

from tandem.rl.config import load_config
from tandem.rl.session import train, train_joint
from tests.fakes import FAMILY, register_fake_family

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
