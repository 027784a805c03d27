"""The benchmarks' smoke tests: ``benchmarks/`` importable (it lives beside the package, not in it), and the tiny
release-layout pipeline with its reward models (``scripts/make_release_pipeline.py --tiny``) that the smoke runs
of end_to_end and profile_ar_rollout read, built once per test run and shared by the pytest workers."""

import os
import sys
from pathlib import Path

import pytest
from filelock import FileLock

REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def tiny_release_work(tmp_path_factory):
    """The folder holding ``tiny-pipe/`` and ``tiny-extras/`` (``benchmarks.common.tiny_release_pipeline``): the
    first worker to need it builds it, the others wait on the lock and read it."""
    from benchmarks import common as C

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    work = root / "tiny-release"
    with FileLock(str(work) + ".lock"):
        C.tiny_release_pipeline(work)
    return work
