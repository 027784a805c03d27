"""The ``--tiny`` smoke run of ``benchmarks.algorithms`` on the CPU (tests/benchmarks/smoke.py): one real decoder
job per algorithm (one optimizer step each) with its reward on Ray actors; each job's figures reach the results.
The jobs reuse this worker's Ray cluster (``ray_cluster``) instead of starting and stopping one each."""

from benchmarks.algorithms import ALGORITHMS
from tests.benchmarks.smoke import run_tiny


def test_tiny_run_writes_its_results(tmp_path, tiny_path, ray_cluster, one_thread):
    result = run_tiny("algorithms", tmp_path, ["--device", "cpu", "--model-dir", tiny_path], fills=["results"])
    assert set(result["results"]) == set(ALGORITHMS)
    assert all(row["steps"] == 1 and row["trained_samples"] > 0 for row in result["results"].values())
