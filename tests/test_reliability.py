"""Reliability: resume without a checkpoint, crash and Ctrl-C checkpoints, corrupt run files (issue 13)."""

import json
import shutil

import pytest
import torch

from tandem.core.errors import ConfigError
from tandem.rl.config import load_config
from tandem.rl.session import train


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def cfg_for(tiny, out, *extra, stage="decoder"):
    return load_config(f"configs/demo/{stage}.yaml", [f"output_dir={out}", f"model.path={tiny}", "logging.progress=false",
                                                      "reward_host.backend=local", "logging.sample_every=0", *extra],
                       stage=stage)


@pytest.fixture
def killed_run(tiny_model_path, tmp_path):
    """A run killed after logging steps 1 and 2, before any checkpoint (checkpoint_every: 0)."""
    run = train(cfg_for(tiny_model_path, tmp_path / "run", "max_steps=2"), "decoder")
    shutil.rmtree(run / "checkpoints")
    return run


def test_resume_auto_without_checkpoint_restarts_from_step_0(tiny_model_path, killed_run, caplog):
    with caplog.at_level("WARNING", logger="tandem.session"):
        train(cfg_for(tiny_model_path, killed_run, "max_steps=4", "resume=auto"), "decoder")
    assert [r["step"] for r in rows(killed_run)] == [1, 2, 3, 4]
    assert "restarting the run from step 0" in caplog.text


def test_resume_auto_on_another_configs_run_is_refused_before_anything_is_written(tiny_model_path, killed_run):
    before = {f: (killed_run / f).read_bytes() for f in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(ConfigError, match="different config"):
        train(cfg_for(tiny_model_path, killed_run, "max_steps=4", "resume=auto", "grpo.beta=0.5"), "decoder")
    assert {f: (killed_run / f).read_bytes() for f in before} == before
