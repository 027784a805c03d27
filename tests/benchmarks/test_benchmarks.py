"""Each benchmark's ``--tiny`` smoke run: tiny models on the CPU through the shared runner, results JSON written.

No timings are checked (a smoke run is not a benchmark): the run must finish, write its header (benchmark name,
command, environment) and the rows it is for. The benchmarks that start Ray reward actors or whole jobs in
subprocesses take tens of seconds even at tiny size and are marked slow.
"""

import json
import sys
from importlib import import_module
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SLOW = pytest.mark.slow

# benchmark module -> the results keys its smoke run must fill
CASES = [
    pytest.param("ar_rollout", ["setup", "rows"], id="ar_rollout"),
    pytest.param("ar_engine", ["setup", "rows", "checks"], id="ar_engine"),
    pytest.param("profile_ar_decode", ["setup", "kernels_eager", "sampling_ms"], id="profile_ar_decode"),
    pytest.param("flow_step", ["setup", "forward", "rollout", "train"], id="flow_step"),
    pytest.param("memory", ["setup", "probes", "summary"], id="memory"),
    pytest.param("algorithms", ["results"], id="algorithms", marks=SLOW),  # Ray reward actors, three jobs
    pytest.param("async_scoring", ["results"], id="async_scoring", marks=SLOW),  # two whole jobs
    pytest.param("reward_hosting", ["backends"], id="reward_hosting", marks=SLOW),  # a Ray cluster and OCR models
    pytest.param("end_to_end", ["rows"], id="end_to_end", marks=SLOW),  # jobs in subprocesses
    pytest.param("profile_ar_rollout", ["setup", "calls"], id="profile_ar_rollout", marks=SLOW),  # builds a pipeline
]


@pytest.mark.parametrize("name,keys", CASES)
def test_tiny_run_writes_its_results(name, keys, tmp_path, one_thread):
    module = import_module(f"benchmarks.{name}")
    out = tmp_path / f"{name}.json"
    argv = ["--tiny", "--out", str(out)]
    if name == "end_to_end":
        argv += ["--device", "cpu", "--stages", "decoder", "--steps", "1", "--prompts", "1", "--generations", "2",
                 "--minibatch", "2", "--work", str(tmp_path / "work")]
    elif name != "reward_hosting":
        argv += ["--device", "cpu"]
    assert module.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["command"].startswith(f"python -m benchmarks.{name} --tiny")
    assert result["environment"]["device"] in ("cpu", None) or name == "reward_hosting"
    for key in keys:
        assert result.get(key), f"{name}: no {key!r} in {sorted(result)}"


def test_a_wrong_flag_is_one_line_and_exit_2(capsys):
    """The runner's parser: an unknown flag ends with argparse's usage line and exit 2, before any model is built."""
    from benchmarks import ar_rollout

    with pytest.raises(SystemExit) as stop:
        ar_rollout.main(["--tiny", "--no-such-flag"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
