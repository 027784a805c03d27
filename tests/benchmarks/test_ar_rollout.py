"""The ``--tiny`` smoke run of ``benchmarks.ar_rollout`` on the CPU (tests/benchmarks/smoke.py): it finishes and
writes its header and its ``setup`` and ``rows`` sections."""

from tests.benchmarks.smoke import run_tiny


def test_tiny_run_writes_its_results(tmp_path, one_thread):
    run_tiny("ar_rollout", tmp_path, ["--device", "cpu"], fills=["setup", "rows"])
