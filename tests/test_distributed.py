"""Data parallel on CPU (ddp and fsdp): 2 processes (gloo) give the same update as one process on the same data."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # multi-process jobs

ROOT = Path(__file__).resolve().parents[1]


def run(args, **kw):
    # faulthandler: a process killed by a signal (an abort in the distributed runtime) prints its Python stacks
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # keep the caller's too
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env, **kw)
    fatal = proc.stderr.find("Fatal Python error")
    stacks = proc.stderr[fatal: fatal + 4000] + "\n[...]\n" if fatal >= 0 else ""
    assert proc.returncode == 0, stacks + proc.stderr[-3000:]
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["metrics"])


CASES = ["decoder-full-ddp", "decoder-full-fsdp", "decoder-lora-fsdp",  # full fine-tuning and LoRA (mixed requires_grad)
         "ar-full-fsdp", "ar-lora-fsdp"]


@pytest.fixture(scope="module")
def steps(tiny_model_path, tmp_path_factory):
    """tests/dist_step.py's updates of every case: out/one/STAGE-TUNING-ddp (one process) and out/two/CASE (two)."""
    out = tmp_path_factory.mktemp("dist_step")
    (out / "one").mkdir(), (out / "two").mkdir()
    one = sorted({case.rsplit("-", 1)[0] + "-ddp" for case in CASES})  # one process: nothing to shard
    run([sys.executable, "tests/dist_step.py", str(tiny_model_path), str(out / "one"), *one])
    run(torchrun("tests/dist_step.py", str(tiny_model_path), str(out / "two"), *CASES))
    return out


@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one_process_on_the_same_data(steps, case):
    one, m1 = read(steps / "one" / f"{case.rsplit('-', 1)[0]}-ddp.safetensors")
    two, m2 = read(steps / "two" / f"{case}.safetensors")
    assert one.keys() == two.keys() and all(one[k].shape == two[k].shape for k in one)  # whole tensors, not shards
    # weights after one SGD step (lr 1) differ by the difference of the averaged gradients: float noise only
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    scale = max(one[k].abs().max().item() for k in one)
    assert diff < 1e-5 * scale, (diff, scale)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)


# one process: [group 0 copies 0-3, group 1 copies 0-3]; two: [rank 0: g0 c0-1, g1 c0-1, rank 1: g0 c2-3, g1 c2-3]
ORDER = torch.tensor([(c // 2) * 4 + g * 2 + c % 2 for g in range(2) for c in range(4)])


@pytest.fixture(scope="module")
def rollouts(tiny_model_path, tmp_path_factory):
    """tests/dist_rollout.py's samples of both stages from 1 process and from 2 (gloo), the latter in the former's
    row order: {stage: (one, two)}."""
    out = tmp_path_factory.mktemp("dist_rollout")
    (out / "one").mkdir(), (out / "two").mkdir()
    run([sys.executable, "tests/dist_rollout.py", str(tiny_model_path), str(out / "one"), "decoder", "ar"])
    run(torchrun("tests/dist_rollout.py", str(tiny_model_path), str(out / "two"), "decoder", "ar"))
    pairs = {}
    for stage in ("decoder", "ar"):
        one, two = (load_file(str(out / n / f"{stage}.safetensors")) for n in ("one", "two"))
        pairs[stage] = one, {k: v[ORDER] for k, v in two.items()}
    return pairs


def test_two_processes_sample_the_rollout_of_one_process(rollouts):
    """Seeds per group and copy (tandem.core.seeds), not per process: copies of a prompt on different processes share
    the SDE window, the conditions' AR tokens and (same_noise_in_group) the starting noise, and the two processes
    together sample exactly what one process holding all 4 copies samples."""
    one, two = rollouts["decoder"]
    for key in ("timesteps", "full_tokens", "group_ids"):
        assert torch.equal(two[key], one[key]), key
    for key in ("latents", "next_latents", "old_log_probs", "advantages"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    assert len(set(one["timesteps"][:, 0].tolist())) == 1  # one window for the rollout call
    rows = one["latents"][:, 0].view(2, 4, -1)  # the same starting noise per group
    torch.testing.assert_close(rows, rows[:, :1].expand_as(rows), rtol=1e-4, atol=1e-5)
    assert not torch.equal(one["next_latents"][0], one["next_latents"][1])  # copies still differ (their SDE noise)


def test_two_processes_sample_the_ar_rollout_of_one_process(rollouts):
    """The AR stage: each copy's tokens come from its own seed (rollout seed, group, copy) and its own stream
    (policies.ar_sampler.SeededDraws), the frozen decoder that renders them for the rewards from one seed per
    group; so the two processes sample exactly the tokens, log-probs and rewards of one process."""
    one, two = rollouts["ar"]
    for key in ("tokens", "decode_seeds", "group_ids"):
        assert torch.equal(two[key], one[key]), key
    for key in ("old_log_probs", "advantages"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    seeds = one["decode_seeds"].view(2, 4)
    assert (seeds == seeds[:, :1]).all() and seeds[0, 0] != seeds[1, 0]  # one decoder seed per group
    assert not torch.equal(one["tokens"][0], one["tokens"][1])  # the copies of a group still differ


def test_training_job_on_two_processes(tiny_model_path, tmp_path):
    """The decoder job under torchrun: copies spread over processes, whole-group advantages, one run dir."""
    run(torchrun("-m", "tandem.rl.cli", "train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={tmp_path}",
                 f"model.path={tiny_model_path}", "max_steps=4", "reward_host.backend=local", "logging.progress=false",
                 "logging.sample_every=0"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # every process's first minibatch of a rollout is on-policy (ratio is averaged over processes)
    assert all(abs(r["ratio/mean"] - 1) < 1e-5 for r in rows if r["time/rollout_s"] > 0)
    assert (tmp_path / "checkpoints" / "step_4" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


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
    proc = subprocess.run([sys.executable, "-m", "tandem.rl.cli", "train", "decoder", "--config", "configs/demo/decoder.yaml",
                           "--dry-run", "distributed.strategy=zero3"], capture_output=True, text=True, cwd=ROOT)
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
    This machine has no GPU, so CUDA's presence is patched in: no run on several GPUs has been made."""
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
