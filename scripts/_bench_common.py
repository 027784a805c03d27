"""Helpers shared by the GPU benchmarks (``scripts/bench_flow_step.py``, ``scripts/bench_ar_rollout.py``).

Timing: every figure is host wall-clock between two ``torch.cuda.synchronize()`` calls (device work is
asynchronous), after warm-up calls of the same shapes. FLOPs: ``torch.utils.flop_counter.FlopCounterMode``
counts the matrix products and attention (forward and backward) that actually ran; element-wise work is not
counted. MFU = counted FLOPs / seconds / ``PEAK_BF16_FLOPS``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

PEAK_BF16_FLOPS = 790e12
"""Dense bf16 matmul rate measured on this workplace's H200s (8192^3 random bf16 GEMM: 769-798 TFLOP/s)."""
HBM_BYTES_PER_S = 4.3e12
"""Device-to-device copy bandwidth measured on this workplace's H200s (bytes read + written)."""

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/bench_*.py` from anywhere
    sys.path.insert(0, str(REPO))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device):
    """(result, seconds) of ``fn()`` between two device synchronisations."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Optional[float]:
    """``torch.cuda.max_memory_allocated`` since the last ``reset_peak``, GiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def count_flops(fn: Callable):
    """(result, FLOPs) of ``fn()`` under ``FlopCounterMode`` (matmuls + attention, forward and backward). Compiled
    regions run eagerly here: the counter sees torch ops, not inductor kernels (same model FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def mfu(flops: Optional[float], seconds: float, device: torch.device) -> Optional[float]:
    """Fraction of ``PEAK_BF16_FLOPS`` (None on CPU: the peak is the H200's)."""
    if device.type != "cuda" or not flops or seconds <= 0:
        return None
    return flops / seconds / PEAK_BF16_FLOPS


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def environment(device: torch.device) -> Dict[str, object]:
    """Versions, GPU and date, written into every JSON result."""
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "diffusers", "peft", "accelerate", "tokenizers", "omegaconf", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    env: Dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": versions,
        "device": str(device),
        "peak_bf16_flops": PEAK_BF16_FLOPS,
        "hbm_bytes_per_s": HBM_BYTES_PER_S,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count, cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001 - informational only
            env["driver"] = None
    else:
        env.update(gpu=None, cpu_threads=torch.get_num_threads())
    return env


class Results:
    """A JSON result file rewritten after every recorded row, so a run cut short keeps what it measured."""

    def __init__(self, path: Optional[str], header: Dict[str, object]):
        self.path = Path(path) if path else None
        self.data: Dict[str, object] = dict(header)
        self.flush()

    def add(self, section: str, row: Dict[str, object]) -> None:
        self.data.setdefault(section, []).append(row)
        self.flush()

    def set(self, key: str, value: object) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_json_default) + "\n")
        os.replace(tmp, self.path)


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def print_table(title: str, rows: List[Dict[str, object]], columns: Iterable[tuple]) -> None:
    """``columns``: (header, key, format spec). Missing values print as '-'."""
    columns = list(columns)
    cells = [[h for h, _, _ in columns]] + [[fmt(r.get(k), spec) for _, k, spec in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


@contextmanager
def default_device(device: torch.device):
    """Create tensors (module parameters) directly on ``device``: no slow CPU init of billion-parameter models."""
    with torch.device(device):
        yield
