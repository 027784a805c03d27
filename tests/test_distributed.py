"""Data parallel on CPU: 2 processes (gloo) give the same update as one process on the same data."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


def run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
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


def test_two_processes_match_one_process_on_the_same_data(tiny_model_path, tmp_path):
    run([sys.executable, "tests/dist_step.py", str(tiny_model_path), str(tmp_path / "one.safetensors")])
    run(torchrun("tests/dist_step.py", str(tiny_model_path), str(tmp_path / "two.safetensors")))
    one, m1 = read(tmp_path / "one.safetensors")
    two, m2 = read(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    # weights after one SGD step (lr 1) differ by the difference of the averaged gradients: float noise only
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    scale = max(one[k].abs().max().item() for k in one)
    assert diff < 1e-5 * scale, (diff, scale)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)


def test_training_job_on_two_processes(tiny_model_path, tmp_path):
    """The decoder job under torchrun: copies spread over processes, whole-group advantages, one run dir."""
    run(torchrun("-m", "rl.cli", "train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={tmp_path}",
                 f"model.path={tiny_model_path}", "max_steps=4", "reward_host.backend=local", "logging.progress=false",
                 "logging.sample_every=0"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # every process's first minibatch of a rollout is on-policy (ratio is averaged over processes)
    assert all(abs(r["ratio/mean"] - 1) < 1e-5 for r in rows if r["time/rollout_s"] > 0)
    assert (tmp_path / "checkpoints" / "step_4" / "decoder.trained.safetensors").is_file()


def test_ray_train_places_two_cpu_workers(tiny_model_path, tmp_path):
    """`distributed.launcher: ray_train` on a local Ray cluster: 2 trainer workers next to the reward actors."""
    run([sys.executable, "-m", "rl.cli", "train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={tmp_path}",
         f"model.path={tiny_model_path}", "max_steps=4", "logging.progress=false", "logging.sample_every=0",
         "distributed.launcher=ray_train", "distributed.num_workers=2", "distributed.cpus_per_worker=0.5",
         "reward_host.num_cpus=2"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(abs(r["ratio/mean"] - 1) < 1e-5 for r in rows if r["time/rollout_s"] > 0)
    assert (tmp_path / "checkpoints" / "step_4" / "decoder.trained.safetensors").is_file()
