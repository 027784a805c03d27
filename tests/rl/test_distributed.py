"""Data-parallel jobs on CPU: torchrun (fsdp, with checkpoints and resume) and Ray Train (ddp) launch `tandem train`.

That two processes compute what one does (ddp and fsdp steps, rollouts) is tests/rl/test_distributed_equivalence.py."""

import json
import sys

import pytest
import torch
from tests.cli_run import tandem_cli
from tests.dist_launch import run, torchrun
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # multi-process jobs


def stable(row):
    return {k: v for k, v in row.items() if not k.startswith(("time/", "cost/"))}  # wall-clock figures differ


def test_fsdp_job_checkpoints_full_weights_and_resumes_exactly(tiny_model_path, tmp_path):
    """`distributed.strategy=fsdp` under torchrun: sharded training, sample grids and eval from every process,
    whole-tensor checkpoints, and a resume from the step-2 checkpoint that reproduces steps 3-4 exactly (weights,
    AdamW state and EMA restored into the shards)."""
    def job(out, *extra):
        run(torchrun("-m", "tandem.rl.cli", "train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={out}",
                     f"model.path={tiny_model_path}", "max_steps=4", "reward_host.backend=local", "logging.progress=false",
                     "distributed.strategy=fsdp", "logging.checkpoint_every=2", "logging.sample_every=2",
                     "logging.eval_every=4", "data.eval_prompts=data/eval_prompts.jsonl", "eval.num_prompts=2", *extra))
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    straight = job(tmp_path / "straight")
    assert [r["step"] for r in straight] == [1, 2, 3, 4] and "eval/reward/mean" in straight[-1]
    assert all(abs(r["ratio/mean"] - 1) < 1e-5 for r in straight if r["time/rollout_s"] > 0)
    step_2 = tmp_path / "straight" / "checkpoints" / "step_2"
    resumed = job(tmp_path / "resumed", f"resume={step_2}")
    assert [stable(r) for r in resumed] == [stable(r) for r in straight[2:]]
    grids = [(tmp_path / run_dir / "samples" / "step_000004.png").read_bytes() for run_dir in ("straight", "resumed")]
    assert grids[0] == grids[1]  # EMA weights (the grid's) restored too

    # the checkpoint is the same whole-tensor files a single process writes, and loads into a plain pipeline
    from tandem.policies.glm_image import load_pipeline
    from tandem.policies.families import get_family
    from tandem.rl.checkpoint import load_trained_weights

    pipe = load_pipeline(str(tiny_model_path), device="cpu")
    step_4 = tmp_path / "straight" / "checkpoints" / "step_4"
    load_trained_weights(pipe, str(step_4), get_family("glm_image").components)
    weights = load_file(str(step_4 / "transformer" / "diffusion_pytorch_model.safetensors"))
    params = dict(pipe.transformer.named_parameters())
    assert params.keys() <= weights.keys() and all(torch.equal(weights[k], params[k]) for k in params)
    adam = torch.load(step_4 / "decoder.optimizer.pt", weights_only=True)["state"]
    assert adam.keys() == params.keys() and all(adam[k]["exp_avg"].shape == params[k].shape for k in adam)
    ema = load_file(str(step_4 / "ema" / "transformer" / "diffusion_pytorch_model.safetensors"))  # by name
    assert {k: v.shape for k, v in ema.items() if k in params} == {k: v.shape for k, v in params.items()}
    assert json.loads((step_4 / "state.json").read_text())["ema_steps"] == {"decoder": 4}


def test_bad_strategy_is_a_one_line_config_error():
    proc = tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", "--dry-run", "distributed.strategy=zero3")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "distributed.strategy" in proc.stderr


def test_ray_train_places_two_cpu_workers(tiny_model_path, tmp_path):
    """`distributed.launcher: ray_train` on a local Ray cluster: 2 trainer workers next to the reward actors."""
    run([sys.executable, "-m", "tandem.rl.cli", "train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={tmp_path}",
         f"model.path={tiny_model_path}", "max_steps=4", "logging.progress=false", "logging.sample_every=0",
         "distributed.launcher=ray_train", "distributed.num_workers=2", "distributed.cpus_per_worker=0.5",
         "reward_host.num_cpus=2"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(abs(r["ratio/mean"] - 1) < 1e-5 for r in rows if r["time/rollout_s"] > 0)
    assert (tmp_path / "checkpoints" / "step_4" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_each_process_of_a_job_gets_its_own_gpu(monkeypatch):
    """``model.device: auto`` (or ``cuda``) under torchrun: ``LOCAL_RANK`` picks the GPU, modulo those visible.
    CUDA's presence is patched in, so the test runs without GPUs."""
    from tandem.policies.base import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for local_rank, index in (("0", 0), ("1", 1), ("3", 1)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", index)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_device_without_a_gpu_is_a_config_error():
    from tandem.policies.base import resolve_device
    from tandem.rl.config import ConfigError

    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="no GPU is visible"):
            resolve_device(name)
