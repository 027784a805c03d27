"""``benchmarks.end_to_end``: its ``--tiny`` smoke run (tests/benchmarks/smoke.py) — a whole ``tandem train
decoder`` job of the glm_image config in a subprocess, reward actors on the Ray cluster that job starts, over the
tiny release-layout pipeline (``tiny_release_work``) — and the parts that read a run without a GPU: the split of
each rollout batch, the DiT FLOPs, the reward overrides."""

import pytest
from omegaconf import OmegaConf

from benchmarks import end_to_end as e2e
from tests.benchmarks.smoke import run_tiny


def test_tiny_run_writes_its_results(tmp_path, tiny_release_work, one_thread):
    """The job runs in ``--work`` (where the tiny pipeline already is) and ends with exit 0 after its one step."""
    flags = ["--device", "cpu", "--stages", "decoder", "--steps", "1", "--prompts", "1", "--generations", "2",
             "--minibatch", "2", "--work", str(tiny_release_work)]
    (row,) = run_tiny("end_to_end", tmp_path, flags, fills=["rows"])["rows"]
    assert row["stage"] == "decoder" and row["rc"] == 0 and row["optimizer_steps"] == 1


def test_summarise_splits_each_rollout_batch():
    metrics = [
        {"rollout": 0, "phase": "ar", "time/rollout_s": 60.0, "time/reward_s": 1.0, "time/train_s": 3.0, "cost/elapsed_s": 80.0},
        {"rollout": 0, "phase": "ar", "time/rollout_s": 0.0, "time/reward_s": 0.0, "time/train_s": 2.0, "cost/elapsed_s": 82.0},
        {"rollout": 1, "phase": "ar", "time/rollout_s": 40.0, "time/reward_s": 0.5, "time/recompute_s": 2.0,
         "time/train_s": 3.0, "cost/elapsed_s": 127.0},
        {"rollout": 1, "phase": "ar", "time/rollout_s": 0.0, "time/reward_s": 0.0, "time/train_s": 1.5, "cost/elapsed_s": 128.5},
    ]
    per_rollout = [{"decode_s": 20.0, "token_s": 35.0}, {"decode_s": 10.0, "token_s": 25.0}]
    row = e2e.summarise(metrics, samples=8, gpus=1, per_rollout=per_rollout, flops={"render": 4.65e15, "train": 1e15})
    first, second = row["batches"]
    assert first["wall_s"] == 82.0 and first["other_s"] == pytest.approx(82 - 60 - 1 - 5)
    assert second["wall_s"] == pytest.approx(46.5) and second["decode_s"] == 10.0 and second["token_s"] == 25.0
    assert row["s_per_rl_step"] == pytest.approx(46.5)  # steady: the batches after the first
    assert row["gpu_s_per_sample"] == pytest.approx(46.5 / 8)
    assert row["train_frac"] == pytest.approx(4.5 / 46.5) and row["decode_frac"] == pytest.approx(10 / 46.5)
    assert row["token_frac"] == pytest.approx(25 / 46.5) and row["recompute_frac"] == pytest.approx(2 / 46.5)
    assert second["other_s"] == pytest.approx(46.5 - 40 - 0.5 - 2 - 4.5)
    assert row["mfu_render"] == pytest.approx(4.65e15 / 10.0 / e2e.C.PEAK_BF16_FLOPS)
    assert row["mfu_train"] == pytest.approx(1e15 / 4.5 / e2e.C.PEAK_BF16_FLOPS) and row["mfu_rollout"] is None
    assert row["optimizer_steps"] == 4 and row["step1"]["phase"] == "ar"


def test_dit_forward_flops_of_a_saved_transformer(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text('{"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 3}')
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {"total_size": 2000}}')
    tokens = (64 // 16) * (128 // 16)  # 32 patch tokens
    assert e2e.dit_forward_flops(tmp_path, 64, 128) == 2 * 1000 * tokens + 4 * 3 * tokens**2 * 16
    assert e2e.dit_forward_flops(tmp_path / "missing", 64, 128) is None


def test_reward_override_is_a_list_of_entries(tmp_path):
    text = e2e.reward_entries(tmp_path, tiny=False, with_ocr=True, with_hands=True, stage="decoder")
    rewards = OmegaConf.to_container(OmegaConf.from_dotlist([text]))["rewards"]
    assert [r["name"] for r in rewards] == ["lpips", "aesthetic", "ocr", "hands"]
    assert rewards[0]["args"]["backbone_weights"] == f"{tmp_path}/alexnet.safetensors"
    assert rewards[1]["num_gpus"] == 0.1
    ar = OmegaConf.to_container(OmegaConf.from_dotlist([e2e.reward_entries(tmp_path, True, False, False, "ar")]))["rewards"]
    assert [r["name"] for r in ar] == ["aesthetic", "vlm"] and ar[0]["args"]["model_name"] == "ViT-B-32"
