"""The shared scenario runner of the benchmarks, and the measuring helpers they share.

Each benchmark is a module of this package that declares its own flags and a ``run(bench)`` body, and hands both
to ``main``, which owns what every benchmark does the same way: the common flags (``--device``, ``--dtype``,
``--tiny``, ``--out``), the device and dtype choice (bf16 on a GPU, fp32 on the CPU), the results JSON (its
header: benchmark, command, arguments, environment; rewritten after every row) and the ``wrote ...`` line.
Run from the repository root:

    python -m benchmarks.NAME [flags]          # e.g. python -m benchmarks.ar_engine --out $OUT/ar_engine.json
    python -m benchmarks.NAME --tiny --device cpu   # the smoke test each benchmark has (not a benchmark)

Timing: every figure is host wall-clock between two ``torch.cuda.synchronize()`` calls (device work is
asynchronous), after warm-up calls of the same shapes. FLOPs: ``torch.utils.flop_counter.FlopCounterMode``
counts the matrix products and attention (forward and backward) that actually ran; element-wise work is not
counted. MFU = counted FLOPs / seconds / ``PEAK_BF16_FLOPS``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

PEAK_BF16_FLOPS = 790e12
"""Dense bf16 matmul rate of an H200, the MFU denominator (a random 8192^3 bf16 GEMM runs at 769-798 TFLOP/s)."""
HBM_BYTES_PER_S = 4.3e12
"""Device-to-device copy bandwidth of an H200 (bytes read + written), the roofline denominator."""

REPO = Path(__file__).resolve().parents[1]


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


def read_metrics(run_dir: Path) -> List[Dict]:
    """The rows of a run folder's ``metrics.jsonl`` (none when the job wrote no file)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def release_tool():
    """``scripts/make_release_pipeline.py`` as a module (a tool beside the benchmarks, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_release_pipeline", REPO / "scripts" / "make_release_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_release_pipeline(work: Path) -> tuple:
    """(pipeline folder, extras folder) of the tiny pipeline and reward models that ``make_release_pipeline --tiny``
    writes under ``work``, built here the first time (on the CPU, this process's random state left as it was).

    The extras are written first: the pipeline's ``model_index.json`` (moved into place last) marks a whole build."""
    model, extras = Path(work) / "tiny-pipe", Path(work) / "tiny-extras"
    if not (model / "model_index.json").is_file():
        tool = release_tool()
        with torch.random.fork_rng(devices=[]):
            tool.build_extras(extras, "cpu", tiny=True)
            tool.build_pipeline(model, "cpu", tiny=True, seed=0)
    return str(model), str(extras)


# ------------------------------------------------------------------------------------------------ the runner
@dataclass
class Bench:
    """What ``main`` hands a benchmark's body: its parsed flags, device, weights dtype and results file."""

    name: str
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    results: Results

    @property
    def tiny(self) -> bool:
        return bool(self.args.tiny)

    def default(self, key: str, full, tiny) -> None:
        """Fill an unset flag (None) with its full-size or ``--tiny`` default."""
        if getattr(self.args, key) is None:
            setattr(self.args, key, tiny if self.tiny else full)


def main(name: str, doc: str, arguments: Callable[[argparse.ArgumentParser], None], body: Callable[[Bench], None],
         argv: Optional[Sequence[str]] = None, device: Optional[str] = "cuda", dtype: bool = True,
         tiny_help: str = "tiny models, a step or two (a smoke test, not a benchmark)") -> int:
    """Parse the common flags and ``arguments``' own, open the results JSON and run ``body``.

    ``device``: the ``--device`` default (None: the benchmark has no device); ``dtype``: whether it takes
    ``--dtype`` (default bf16 on CUDA, fp32 elsewhere).
    """
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.split("\n\n")[0].strip())
    if device is not None:
        ap.add_argument("--device", default=device, help=f"cpu | cuda (default {device})")
    if dtype:
        ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="weights dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--tiny", action="store_true", help=tiny_help)
    ap.add_argument("--out", default=f"runs/bench/{name}.json", help="results JSON (rewritten after every row)")
    arguments(ap)
    args = ap.parse_args(argv)
    dev = torch.device(getattr(args, "device", None) or "cpu")
    if dtype:
        args.dtype = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    results = Results(args.out, dict(benchmark=name, command=" ".join(
        ["python", "-m", f"benchmarks.{name}", *(sys.argv[1:] if argv is None else argv)]),
        args=vars(args), environment=environment(dev)))
    body(Bench(name, args, dev, getattr(torch, args.dtype) if dtype else torch.float32, results))
    print(f"\nwrote {args.out}")
    return 0
