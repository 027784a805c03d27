"""The demo jobs, as `make demo` runs them: fixed seeds, real Ray reward actors, tiny real models.

The long learning test of each stage (`configs/demo/ar.yaml`, `configs/demo/decoder.yaml`) must visibly learn:
the mean reward over the last tenth of its optimizer steps is above the first tenth by at least 3x the spread
(std) of reward/mean over the first tenth, and the images of its last sample grid are closer to the target
colour than those of the step-0 grid (before training).
The editing demos learn too; the DiffusionNFT demo config runs 4 steps.
"""

import json

import numpy as np
import pytest
from PIL import Image

from tandem.policies.families import get_family
from tandem.rewards.simple import color
from tandem.rl.config import load_config
from tandem.rl.run_dir import MIN_TILE
from tandem.rl.session import train

pytestmark = pytest.mark.slow  # end-to-end demo runs

REQUIRED_METRICS = {
    "step", "reward/mean", "reward/std", "reward/color/mean", "advantage/zero_std_frac", "ratio/mean",
    "clipfrac", "kl", "loss", "time/rollout_s", "time/reward_s", "time/recompute_s",
    "time/train_s",
}


def grid_reward(path, tile: int, rgb) -> float:
    """Mean `color` reward of the image tiles of a saved sample grid (one row of tiles above the captions)."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    tiles = np.stack([grid[:tile, x:x + tile] for x in range(0, grid.shape[1] - tile + 1, tile)])
    return float(np.mean(color(tiles, [""] * len(tiles), [{}] * len(tiles), rgb=rgb)))


@pytest.mark.parametrize("stage", ["decoder", "ar"])
def test_demo_visibly_learns(tiny_model_path, tmp_path, stage):
    cfg = load_config(f"configs/demo/{stage}.yaml", [f"output_dir={tmp_path / stage}",
                                                     f"model.path={tiny_model_path}", "logging.progress=false"],
                      stage=stage)
    run = train(cfg, stage)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, cfg.max_steps + 1))
    assert all(REQUIRED_METRICS <= r.keys() for r in rows)
    tenth = len(rows) // 10
    first = np.array([r["reward/mean"] for r in rows[:tenth]])
    last = np.array([r["reward/mean"] for r in rows[-tenth:]])
    assert last.mean() - first.mean() >= 3 * first.std(), (first, last)
    # the first optimizer step of every rollout is exactly on-policy
    assert all(abs(r["ratio/mean"] - 1) < 1e-5 for r in rows if r["time/rollout_s"] > 0)
    # the grids move towards the rewarded colour: step 0 (before training) against the last step
    rgb = cfg.rewards[0].args["rgb"]
    tile = max(1, -(-MIN_TILE // cfg.data.width)) * cfg.data.width  # image_grid enlarges small tiles
    before = grid_reward(run / "samples" / "step_000000.png", tile, rgb)
    after = grid_reward(run / "samples" / f"step_{cfg.max_steps:06d}.png", tile, rgb)
    assert after > before, (before, after)
    assert (run / "reward_curve.png").stat().st_size > 0
    component = get_family(cfg.model.family).components[stage]
    assert any((run / "checkpoints" / f"step_{cfg.max_steps}" / component).glob("*.safetensors"))
    assert load_config(str(run / "config.yaml"), stage=stage) == cfg


def test_nft_demo_config_trains(tiny_model_path, tmp_path):
    """configs/demo/decoder_nft.yaml (DiffusionNFT, ODE rollouts without CFG), 4 steps: the first minibatch of each
    rollout is trained at the rollout's weights (v = v_old), the second after one update (v != v_old). Its 60-step
    learning run is the DiffusionNFT row of benchmarks/algorithms.py (docs/performance.md, "Objectives"); the
    decoder stage's learning test is the flow-GRPO demo above, and the NFT loss and its gradient's direction are
    checked against their closed forms (tests/rl/test_objective_formulas.py, tests/rl/test_objectives_tiny.py)."""
    cfg = load_config("configs/demo/decoder_nft.yaml", [f"output_dir={tmp_path / 'nft'}", f"model.path={tiny_model_path}",
                                                        "logging.progress=false", "max_steps=4"], stage="decoder")
    run = train(cfg, "decoder")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "kl", "nft/r_mean", "nft/old_deviation", "grad_norm"} <= r.keys() for r in rows)
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    deviation = [r["nft/old_deviation"] for r in rows]
    assert deviation[0] < 1e-10 and deviation[2] < 1e-10 and deviation[1] > 1e-8 and deviation[3] > 1e-8, deviation


@pytest.mark.parametrize("name, stage", [("edit", "decoder"), ("edit_ar", "ar")])
def test_edit_demos_reward_rises(tiny_model_path, tmp_path, name, stage):
    """The image-editing demos learn: the decoder stage (configs/demo/edit.yaml) and the AR stage
    (configs/demo/edit_ar.yaml, ar.edit): the mean reward over the last tenth of the steps is above that over the
    first tenth by at least 3x the spread of the first tenth."""
    cfg = load_config(f"configs/demo/{name}.yaml", [f"output_dir={tmp_path / name}", f"model.path={tiny_model_path}",
                                                    "logging.progress=false", "logging.sample_every=0"], stage=stage)
    run = train(cfg, stage)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, cfg.max_steps + 1))
    assert all(np.isfinite(r["reward/source_structure/mean"]) for r in rows)
    tenth = len(rows) // 10
    first = np.array([r["reward/mean"] for r in rows[:tenth]])
    last = np.array([r["reward/mean"] for r in rows[-tenth:]])
    assert last.mean() - first.mean() >= 3 * first.std(), (first, last)
