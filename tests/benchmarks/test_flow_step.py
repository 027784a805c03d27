"""The ``--tiny`` smoke run of ``benchmarks.flow_step`` on the CPU (tests/benchmarks/smoke.py): it finishes and
writes its header and its ``setup``, ``forward``, ``rollout`` and ``train`` sections."""

from tests.benchmarks.smoke import run_tiny


def test_tiny_run_writes_its_results(tmp_path, one_thread):
    run_tiny("flow_step", tmp_path, ["--device", "cpu"], fills=["setup", "forward", "rollout", "train"])
