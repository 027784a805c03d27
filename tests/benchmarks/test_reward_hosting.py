"""The ``--tiny`` smoke run of ``benchmarks.reward_hosting`` (tests/benchmarks/smoke.py): OCR scores of rendered
text in this process and on a Ray actor (this worker's Ray cluster, ``ray_cluster``); both backends' rows are
written and their scores are the same."""

from tests.benchmarks.smoke import run_tiny


def test_tiny_run_writes_its_results(tmp_path, ray_cluster):
    result = run_tiny("reward_hosting", tmp_path, [], fills=["backends"])
    assert set(result["backends"]) == {"local", "ray"} and result["identical_scores"] is True
