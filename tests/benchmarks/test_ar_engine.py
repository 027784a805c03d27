"""The ``--tiny`` smoke run of ``benchmarks.ar_engine`` on the CPU (tests/benchmarks/smoke.py): it finishes and
writes its header and its ``setup``, ``rows`` and ``checks`` sections."""

from tests.benchmarks.smoke import run_tiny


def test_tiny_run_writes_its_results(tmp_path, one_thread):
    run_tiny("ar_engine", tmp_path, ["--device", "cpu"], fills=["setup", "rows", "checks"])
