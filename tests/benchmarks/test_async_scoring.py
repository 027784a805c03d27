"""The ``--tiny`` smoke run of ``benchmarks.async_scoring`` on the CPU (tests/benchmarks/smoke.py): the same tiny
job with async scoring on and off; both finish, and both train on the same rewards."""

from tests.benchmarks.smoke import run_tiny


def test_tiny_run_writes_its_results(tmp_path, tiny_path, one_thread):
    result = run_tiny("async_scoring", tmp_path, ["--model-path", tiny_path], fills=["results"])
    assert set(result["results"]) == {"async", "sync"} and result["identical_rewards"] is True
