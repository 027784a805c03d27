"""The ``--tiny`` smoke run of ``benchmarks.profile_ar_decode`` on the CPU (tests/benchmarks/smoke.py): it finishes
and writes its header and its ``setup``, ``kernels_eager`` and ``sampling_ms`` sections."""

from tests.benchmarks.smoke import run_tiny


def test_tiny_run_writes_its_results(tmp_path, one_thread):
    run_tiny("profile_ar_decode", tmp_path, ["--device", "cpu"], fills=["setup", "kernels_eager", "sampling_ms"])
