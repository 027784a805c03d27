"""Launching the multi-process test runs (tests/dist_cases.py, jobs under torchrun)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

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
