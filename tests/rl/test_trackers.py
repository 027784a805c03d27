"""A run with trackers, accumulation, a warm-up schedule and a checkpoint limit; its resume; tandem's logger."""

import json
import logging

import pytest

from tandem.rl.config import load_config
from tandem.rl.session import train

pytestmark = pytest.mark.slow  # jobs

SETTINGS = ["max_steps=4", "logging.progress=false", "reward_host.backend=local", "logging.sample_every=2",
            "logging.report_to=[tensorboard]", "optim.lr_scheduler=linear", "optim.warmup_steps=2",
            "optim.learning_rate=0.01", "grpo.mini_batch_size=4", "optim.gradient_accumulation_steps=2",
            "logging.checkpoint_every=1", "logging.save_total_limit=2"]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def stable(row):
    return {k: v for k, v in row.items() if not k.startswith(("time/", "cost/"))}


@pytest.fixture(scope="module")
def straight(tiny_model_path, tmp_path_factory):
    """4 optimizer steps of the decoder demo, each on a whole rollout of 8 samples as 2 accumulated minibatches."""
    out = tmp_path_factory.mktemp("straight")
    return train(load_config("configs/demo/decoder.yaml", [f"output_dir={out}", f"model.path={tiny_model_path}",
                                                           *SETTINGS], stage="decoder"), "decoder")


@pytest.mark.slow  # an end-to-end job
def test_accumulated_steps_warmup_and_checkpoint_limit(straight):
    metrics = rows(straight)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4] and [r["rollout"] for r in metrics] == [0, 1, 2, 3]
    assert [r["lr"] for r in metrics] == pytest.approx([0.0, 0.005, 0.01, 0.005])  # linear: warm-up 2, decay to 0 at 4
    assert all(abs(r["ratio/mean"] - 1) < 1e-5 for r in metrics)  # the first minibatch of each step is on-policy
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_3", "step_4"]


@pytest.mark.slow  # an end-to-end job
def test_tensorboard_events_hold_metrics_grids_and_config(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = straight / "tensorboard" / "tandem"
    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"reward/mean", "loss", "kl", "grad_norm", "lr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("reward/mean")] == pytest.approx([r["reward/mean"] for r in rows(straight)])
    assert [e.step for e in events.Images("samples")] == [0, 2, 4]  # step 0: before training
    assert events.Images("samples")[0].width > 64  # the captioned grid, not one tile
    hparams = [p for p in logdir.iterdir() if p.is_dir() and (p / "hparams.yml").is_file()]
    assert hparams and "optim.gradient_accumulation_steps: 2" in (hparams[0] / "hparams.yml").read_text()


@pytest.mark.slow  # an end-to-end job
def test_resume_restores_the_schedule_and_says_so(straight, tiny_model_path, tmp_path, capfd):
    from tandem.rl.runtime import configure_logging

    configure_logging("info")
    step_3 = straight / "checkpoints" / "step_3"
    state = json.loads((step_3 / "state.json").read_text())
    assert state["schedulers"]["decoder"]["last_epoch"] == 3
    resumed = train(load_config("configs/demo/decoder.yaml", [f"output_dir={tmp_path}", f"model.path={tiny_model_path}",
                                                              *SETTINGS, f"resume={step_3}"], stage="decoder"), "decoder")
    assert [stable(r) for r in rows(resumed)] == [stable(r) for r in rows(straight)[3:]]
    assert f"resumed from {step_3} at step 3" in capfd.readouterr().err
    logging.getLogger("tandem").handlers.clear()


def test_log_level_flag_sets_tandems_logger(capfd):
    from tandem.rl.cli import main

    assert main(["rewards", "--log-level", "warning"]) == 0
    logger = logging.getLogger("tandem.session")
    logger.info("hidden")
    logger.warning("shown")
    err = capfd.readouterr().err
    assert "shown" in err and "hidden" not in err
    logging.getLogger("tandem").handlers.clear()
    logging.getLogger("tandem").setLevel(logging.NOTSET)
