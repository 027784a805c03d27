"""What every benchmark's ``--tiny`` smoke test checks: tiny models on the CPU through the shared runner
(``benchmarks.common.main``), the run finishes and writes its results JSON with its header (benchmark name,
command, environment) and the rows it is for. No timings are checked: a smoke run is not a benchmark."""

import json
from importlib import import_module
from pathlib import Path
from typing import Sequence


def run_tiny(name: str, tmp_path: Path, flags: Sequence[str], fills: Sequence[str]) -> dict:
    """Run ``python -m benchmarks.NAME --tiny --out OUT FLAGS`` in this process; check exit 0, the header and that
    every key of ``fills`` holds something. Returns the results JSON."""
    module = import_module(f"benchmarks.{name}")
    out = tmp_path / f"{name}.json"
    assert module.main(["--tiny", "--out", str(out), *flags]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["command"].startswith(f"python -m benchmarks.{name} --tiny")
    assert result["environment"]["device"] == "cpu" and result["environment"]["versions"]["torch"]
    for key in fills:
        assert result.get(key), f"{name}: no {key!r} in {sorted(result)}"
    return result
