"""The ``--tiny`` smoke run of ``benchmarks.memory`` on the CPU (tests/benchmarks/smoke.py): it finishes and writes
its header and its ``setup``, ``probes`` and ``summary`` sections."""

from tests.benchmarks.smoke import run_tiny


def test_tiny_run_writes_its_results(tmp_path, one_thread):
    run_tiny("memory", tmp_path, ["--device", "cpu"], fills=["setup", "probes", "summary"])
