"""The ``--tiny`` smoke run of ``benchmarks.profile_ar_rollout`` on the CPU (tests/benchmarks/smoke.py): the AR
policy built as ``tandem train ar --config configs/glm_image/ar.yaml`` builds it, over the tiny release-layout
pipeline (``tiny_release_work``, built once per test run); its timed calls and the profiled one are written."""

from tests.benchmarks.smoke import run_tiny


def test_tiny_run_writes_its_results(tmp_path, tiny_release_work, one_thread):
    flags = ["--device", "cpu", "--model", str(tiny_release_work / "tiny-pipe"),
             "--extras", str(tiny_release_work / "tiny-extras")]
    result = run_tiny("profile_ar_rollout", tmp_path, flags, fills=["setup", "calls", "profiled_call", "top_host_ops"])
    assert result["setup"]["sampler"] == "engine"
