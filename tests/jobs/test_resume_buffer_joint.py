"""Two stages in tandem: the shared buffer, the joint schedule, SIGKILL + resume, eval, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_run import assert_user_mistake, tandem_cli
from tandem.rl.buffer import load_buffer_records
from tandem.rl.config import load_config
from tandem.rl.session import train, train_joint

pytestmark = pytest.mark.slow  # end-to-end jobs

VOLATILE = ("time/", "cost/")  # wall-clock figures differ between any two runs


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def stable(row):
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def cfg_for(stage, tiny, out, *extra):
    return load_config(f"configs/demo/{stage}.yaml", [f"output_dir={out}", f"model.path={tiny}", "logging.progress=false",
                                                      "reward_host.backend=local", "logging.sample_every=0", *extra],
                       stage=stage)


def test_decoder_job_trains_from_a_saved_ar_run(tiny_model_path, tmp_path):
    ar_run = train(cfg_for("ar", tiny_model_path, tmp_path / "ar", "max_steps=4", "buffer.save=true"), "ar")
    shards = sorted((ar_run / "buffer").glob("shard_*.safetensors"))
    assert len(shards) == 2
    saved = load_file(str(shards[0]))
    assert saved["images"].dtype == torch.uint8 and saved["images"].shape[1:] == (64, 64, 3)
    assert saved["full_tokens"].shape == (16, 4) and int(saved["full_tokens"].max()) < 128
    records = load_buffer_records(str(ar_run), 64, 64)
    assert len(records) == 32 and all(r.metadata["full_tokens"].shape == (4,) for r in records)

    dec = cfg_for("decoder", tiny_model_path, tmp_path / "dec", "max_steps=2", "decoder.condition_source=buffer",
                  f"decoder.buffer_dir={ar_run}", "data.prompts=null")
    dec_run = train(dec, "decoder")
    assert [r["step"] for r in rows(dec_run)] == [1, 2]
    # the decoder's conditions are exactly the saved token grids
    from tandem.rl.session import build_policy
    from tandem.policies.glm_image import load_pipeline

    policy = build_policy("decoder", dec, load_pipeline(str(tiny_model_path)))
    tokens = policy.adapter.full_tokens([r.prompt for r in records[:3]], [r.metadata for r in records[:3]], seed=0)
    assert torch.equal(tokens, saved["full_tokens"][:3])


def test_sigkill_then_resume_continues_the_same_metric_stream(tiny_model_path, tmp_path):
    overrides = ["max_steps=4", "logging.checkpoint_every=2"]
    reference = train(cfg_for("decoder", tiny_model_path, tmp_path / "straight", *overrides), "decoder")

    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "tandem.rl.cli", "train", "decoder", "--config", "configs/demo/decoder.yaml",
            f"output_dir={killed}", f"model.path={tiny_model_path}", "logging.progress=false",
            "reward_host.backend=local", "logging.sample_every=0", *overrides]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_2" / "state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert rows(killed)[-1]["step"] < 4  # really interrupted

    resumed = train(cfg_for("decoder", tiny_model_path, killed, *overrides, "resume=auto"), "decoder")
    assert [stable(r) for r in rows(resumed)] == [stable(r) for r in rows(reference)]


def test_joint_demo_config_alternates_phases_and_trains_both_models(tiny_model_path, tmp_path):
    """configs/demo/joint.yaml with short phases: AR and decoder phases alternate as configured, every AR rollout
    lands in the buffer, both models are checkpointed. (Each stage's long learning run is tests/jobs/test_demo.py.)"""
    cfg = load_config("configs/demo/joint.yaml", [f"output_dir={tmp_path}", f"model.path={tiny_model_path}",
                                                  "logging.progress=false", "max_steps=8", "joint.ar_steps_per_phase=2",
                                                  "joint.decoder_steps_per_phase=2", "logging.checkpoint_every=8",
                                                  "logging.sample_every=0"], stage="joint")
    run = train_joint(cfg)
    metrics = rows(run)
    assert [r["phase"] for r in metrics] == ["ar", "ar", "decoder", "decoder"] * 2
    assert all(np.isfinite(r["reward/mean"]) and np.isfinite(r["loss"]) for r in metrics)
    assert len(list((run / "buffer").glob("shard_*.safetensors"))) == 2  # every AR rollout, 2 steps each
    assert (run / "checkpoints" / "step_8" / "vision_language_encoder" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "step_8" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert np.isfinite(metrics[-1]["cost/reward_gain"]) and metrics[-1]["cost/elapsed_s"] > 0


def test_joint_resume_at_and_inside_a_decoder_phase_continues_the_same_metric_stream(tiny_model_path, tmp_path):
    """AR phases of 2 steps, decoder phases of 4 (one rollout = 2 steps): resumed from step 2 (the AR phase just
    ended) and from step 4 (inside the decoder phase), the job trains the same phases on the same hand-off and
    prompt stream as the uninterrupted one, so steps 3-6 log the same metrics."""
    def joint(out, *extra):
        return train_joint(load_config("configs/demo/joint.yaml", [
            f"output_dir={out}", f"model.path={tiny_model_path}", "logging.progress=false", "reward_host.backend=local",
            "logging.sample_every=0", "max_steps=6", "joint.ar_steps_per_phase=2", "joint.decoder_steps_per_phase=4",
            "logging.checkpoint_every=2", "buffer.save=false", *extra], stage="joint"))

    straight = joint(tmp_path / "straight")
    assert [r["phase"] for r in rows(straight)] == ["ar"] * 2 + ["decoder"] * 4
    for step in (2, 4):
        resumed = joint(tmp_path / f"from_{step}", f"resume={straight / 'checkpoints' / f'step_{step}'}")
        assert [stable(r) for r in rows(resumed)] == [stable(r) for r in rows(straight)[step:]], step


def test_eval_pass_logs_held_out_rewards(tiny_model_path, tmp_path):
    cfg = cfg_for("decoder", tiny_model_path, tmp_path, "max_steps=4", "logging.eval_every=2",
                  "data.eval_prompts=data/eval_prompts.jsonl", "eval.num_prompts=2",
                  "eval.rewards=[{name: brightness}, {name: color, args: {rgb: [255, 0, 0]}}]", "eval.gold=brightness")
    metrics = rows(train(cfg, "decoder"))
    evals = [r for r in metrics if "eval/brightness/mean" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(-1 <= r["eval/color/mean"] <= 0 and r["eval/hacking_warning"] in (0, 1) for r in evals)


def test_hacking_watch_warns_when_train_rises_and_gold_falls(tmp_path, caplog):
    from tandem.rewards.client import RewardClient
    from tandem.rl.config import JobConfig, RewardEntry, RewardHostConfig
    from tandem.rl.periodic_eval import Evaluator

    class Images:  # a stand-in policy whose eval images get darker at each eval
        def __init__(self):
            self.level = 250

        def sample(self, prompts, metadata, seed):
            self.level -= 100
            return np.full((len(prompts), 32, 32, 3), self.level, dtype=np.uint8)

    cfg = JobConfig(output_dir=str(tmp_path))
    cfg.data.eval_prompts = "data/eval_prompts.jsonl"
    with RewardClient([RewardEntry(name="brightness", args={"target": 1.0})], RewardHostConfig(backend="local")) as client:
        ev, policy = Evaluator(cfg, client), Images()
        assert ev.evaluate(policy, 2, train_reward=0.1)["eval/hacking_warning"] == 0
        with caplog.at_level("WARNING", logger="tandem.eval"):
            assert ev.evaluate(policy, 4, train_reward=0.5)["eval/hacking_warning"] == 1
        assert "reward hacking" in caplog.text


# a job's one error line, whatever the libraries print while its models load
AFTER_LOADING = {"ignore": ("Loading", "\x1b"), "only": "tandem: error:"}


@pytest.mark.parametrize("content", ["garbage", "foreign"])
def test_corrupt_or_foreign_shard_is_one_line(tmp_path, content):
    buffer = tmp_path / "ar" / "buffer"
    buffer.mkdir(parents=True)
    shard = buffer / "shard_000000.safetensors"
    if content == "garbage":
        shard.write_bytes(b"not a safetensors file at all")
    else:
        save_file({"x": torch.zeros(2)}, str(shard))
    out = tmp_path / "dec"
    line = assert_user_mistake(tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={out}",
                              "decoder.condition_source=buffer", f"decoder.buffer_dir={tmp_path / 'ar'}"), **AFTER_LOADING)
    assert "shard_000000" in line
    assert not out.exists()


def test_missing_buffer_run_directory_is_one_line(tmp_path):
    line = assert_user_mistake(tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={tmp_path / 'o'}",
                              "decoder.condition_source=buffer", f"decoder.buffer_dir={tmp_path / 'nothing'}"), **AFTER_LOADING)
    assert "decoder.buffer_dir" in line


def test_checkpoint_of_another_config_refused_and_nothing_overwritten(tiny_model_path, tmp_path):
    run = train(cfg_for("decoder", tiny_model_path, tmp_path, "max_steps=2"), "decoder")
    before = (run / "metrics.jsonl").read_bytes()
    common = ["train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={run}", f"model.path={tiny_model_path}",
              "reward_host.backend=local"]
    line = assert_user_mistake(tandem_cli(*common, "max_steps=4", "resume=auto", "grpo.beta=0.5"), **AFTER_LOADING)
    assert "different config" in line
    line = assert_user_mistake(tandem_cli(*common, "max_steps=4"), **AFTER_LOADING)  # no resume: refuses to write over the run
    assert "resume=auto" in line
    assert (run / "metrics.jsonl").read_bytes() == before


def test_resume_restores_the_per_prompt_reward_histories(tiny_model_path, tmp_path):
    """grpo.per_prompt_stat_tracking: the histories are in state.json, so a run resumed from step 2 computes the
    same advantages at steps 3-4 as the straight run (two prompts, so every rollout sees both again)."""
    prompts = tmp_path / "two.txt"
    prompts.write_text("a red apple\na blue sky\n")
    overrides = ["max_steps=4", "logging.checkpoint_every=2", f"data.prompts={prompts}", "grpo.per_prompt_stat_tracking=true",
                 "grpo.stat_tracking_min_count=4", "grpo.adv_clip_max=100"]
    straight = train(cfg_for("decoder", tiny_model_path, tmp_path / "straight", *overrides), "decoder")
    state = json.loads((straight / "checkpoints" / "step_2" / "state.json").read_text())
    assert sorted(state["stat_trackers"]["decoder"]) == ["a blue sky", "a red apple"]
    assert all(len(h) == 4 for h in state["stat_trackers"]["decoder"].values())  # one rollout batch: 4 copies each
    resumed = train(cfg_for("decoder", tiny_model_path, tmp_path / "resumed", *overrides,
                            f"resume={straight / 'checkpoints' / 'step_2'}"), "decoder")
    assert [stable(r) for r in rows(resumed)] == [stable(r) for r in rows(straight)[2:]]
