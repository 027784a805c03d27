"""A job's start-up on a real embedded Ray cluster: the reward actors build while the pipeline loads, the run clock
starts once both are done, and whatever ends the start-up (a reward that cannot be built, a failing load, Ctrl-C)
is one line and leaves no Ray process behind.

The pipeline is the fake family's (tests/fakes.py) behind a loader that traces itself: it appends "load-start",
waits until the reward's build has begun (``tests.reward_plugins:BuildTrace`` appends "build-start"; a job that
started its actors only after loading never gets there), notes the Ray processes alive then, and ends as the
folder's ``mode`` file says.
"""

import glob
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.cli_run import assert_user_mistake, tandem_cli
from tests.fakes import FakePolicy, images_of, UNITS
from tests.reward_plugins import append_trace
from tandem.core.errors import ConfigError
from tandem.policies.families import FAMILIES, ModelFamily, register_family
from tandem.rewards.host import temp_root
from tandem.rl.config import load_config
from tandem.rl.run_lock import LOCK_NAME
from tandem.rl.session import train

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]  # the job's own embedded Ray cluster, started and stopped

FAMILY = "test_traced_load"
BUILD_WAIT_S = 120  # the loader's patience for the reward's build to begin (reached only when it never overlaps)


def ray_processes():
    """pids of this process's descendants that belong to a Ray cluster (its daemons run with the cluster's temp
    folder on their command line; its workers are named ray::...)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmdline = p.cmdline()
        except psutil.Error:
            continue
        if any("tandem-ray-" in part for part in cmdline) or (cmdline and cmdline[0].startswith("ray::")):
            found.append(p.pid)
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def traced_load(model_cfg):
    """The fake family's loader (module docstring); ``model.path`` is the trace folder."""
    folder = Path(model_cfg.path)
    trace = folder / "trace"
    append_trace(trace, "load-start")
    deadline = time.monotonic() + BUILD_WAIT_S
    while "build-start" not in trace.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    (folder / "ray_pids.json").write_text(json.dumps(ray_processes()))
    mode = (folder / "mode").read_text()
    if mode == "fail":
        raise ConfigError(f"model.path: no pipeline at {folder} (a test's failing load)")
    if mode == "ctrl_c":
        signal.raise_signal(signal.SIGINT)
    append_trace(trace, "load-end")


@pytest.fixture(scope="module", autouse=True)
def traced_family():
    register_family(ModelFamily(
        name=FAMILY, load=traced_load,
        policies={"ar": lambda pipe, settings: FakePolicy("ar"),
                  "decoder": lambda pipe, settings: FakePolicy("decoder")},
        components={"ar": "fake_ar", "decoder": "fake_decoder"},
        generate=lambda pipe, prompts, cfg, seed: images_of(torch.zeros(len(prompts), UNITS))))
    yield
    FAMILIES.unregister(FAMILY)


def job_args(tmp_path, mode, fail_build=False):
    """Overrides of configs/demo/decoder.yaml for a one-step job on the traced family, its reward on Ray."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "mode").write_text(mode)
    args = {"trace": str(folder / "trace"), "build_s": 0.5, "fail": fail_build}
    return [f"output_dir={tmp_path / 'run'}", f"model.family={FAMILY}", f"model.path={folder}",
            "model.create_tiny_if_missing=false", "logging.progress=false", "logging.sample_every=0",
            "decoder.ema_decay=0", "max_steps=1", "reward_host.backend=ray",
            f"rewards=[{{fn: 'tests.reward_plugins:BuildTrace', args: {json.dumps(args)}}}]"]


def events(tmp_path):
    """{event: wall-clock time} of the trace."""
    lines = (tmp_path / "model" / "trace").read_text().splitlines()
    return {name: float(t) for name, t in (line.split() for line in lines)}


def assert_nothing_left(tmp_path):
    """The Ray processes alive while the pipeline loaded are gone, with the cluster's temp folder and the run lock."""
    spawned = json.loads((tmp_path / "model" / "ray_pids.json").read_text())
    assert spawned, "no Ray process ran while the pipeline loaded: the test proves nothing"
    assert [pid for pid in spawned if alive(pid)] == []
    assert not glob.glob(os.path.join(temp_root(), f"tandem-ray-{os.getpid()}-*"))
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_reward_actors_build_while_the_pipeline_loads_and_the_run_clock_starts_after_both(tmp_path, plugin_path,
                                                                                           caplog):
    cfg = load_config("configs/demo/decoder.yaml", job_args(tmp_path, "ok"), stage="decoder")
    with caplog.at_level("INFO", logger="tandem.session"):
        run = train(cfg, "decoder")
    seen = events(tmp_path)
    assert seen["build-start"] < seen["load-end"]  # the actor was building before the load ended
    # The clock's start, as the metrics line dates it (its file's mtime minus the elapsed seconds it logs), comes
    # after the load ended: the reward was still building then (0.5 s more), and the job waited for it.
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert (run / "metrics.jsonl").stat().st_mtime - row["cost/elapsed_s"] > seen["load-end"]
    assert "start-up: " in caplog.text and "waiting for the rewards to be built" in caplog.text
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("mode, fail_build, code, line", [
    ("ok", True, 2, "tandem: error: reward 'BuildTrace' could not be built: FileNotFoundError: no weights at "),
    ("fail", False, 2, "tandem: error: model.path: no pipeline at "),
    ("ctrl_c", False, 130, "tandem: stopped at once by SIGINT before training started"),
], ids=["reward_cannot_be_built", "load_fails", "ctrl_c_while_loading"])
def test_a_start_up_that_fails_is_one_line_and_leaves_no_ray_process(tmp_path, plugin_path, mode, fail_build, code,
                                                                      line):
    proc = tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml",
                      *job_args(tmp_path, mode, fail_build))
    assert_user_mistake(proc, line, code=code, only="tandem: ")
    assert "build-start" in events(tmp_path)  # the actor had started building when the load ended
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert_nothing_left(tmp_path)
