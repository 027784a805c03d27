"""One job per run folder (the lock), Ctrl-C handling, the joint schedule and the hand-off kept by checkpoints:
the parts that need no training job. The jobs themselves: tests/jobs/test_reliability.py and
tests/jobs/test_resume_buffer_joint.py."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.cli_run import tandem_cli
from tandem.core.errors import ConfigError
from tandem.core.types import PromptRecord
from tandem.rl.run_lock import LOCK_NAME, RunLock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------ the lock
def test_a_second_job_on_a_held_run_folder_is_one_line_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunLock(str(run)):
        proc = tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={run}",
                          "resume=auto")
        holder = json.loads((run / LOCK_NAME).read_text())
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("tandem: error: output_dir") and "in use by another tandem job" in lines[0]
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in lines[0]
    assert holder["pid"] == os.getpid()
    assert not run.exists()  # the lock's folder goes with it when nothing else was written


def test_a_lock_left_by_a_dead_job_is_taken_over_with_a_log_line(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": (pid := dead_pid()), "host": socket.gethostname(),
                                                  "started": "2026-01-01 00:00:00"}))
    with caplog.at_level("WARNING", logger="tandem.session"):
        with RunLock(str(tmp_path)):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over its lock from a job that is no longer running (pid {pid} on host" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists() and tmp_path.exists()  # released; a folder it did not create stays


def test_the_lock_is_released_for_the_next_job(tmp_path, caplog):
    with RunLock(str(tmp_path)):
        with pytest.raises(ConfigError, match="in use by another tandem job"):
            RunLock(str(tmp_path)).acquire()
    with caplog.at_level("WARNING", logger="tandem.session"), RunLock(str(tmp_path)):
        pass
    assert "taking over" not in caplog.text


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock (some network mounts): the recorded holder decides."""
    import fcntl

    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)


def test_without_flock_a_live_holder_on_this_host_is_refused_and_a_dead_one_taken_over(tmp_path, no_flock):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        with pytest.raises(ConfigError, match=f"pid {live.pid} on host"):
            RunLock(str(tmp_path)).acquire()
    finally:
        live.kill()
        live.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    RunLock(str(tmp_path)).acquire().release()


def test_without_flock_a_holder_on_another_host_is_refused_with_the_file_to_delete(tmp_path, no_flock):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(ConfigError, match=f"if that job is no longer running, delete {tmp_path / LOCK_NAME}"):
        RunLock(str(tmp_path)).acquire()


def test_only_the_main_process_takes_the_lock(tmp_path, monkeypatch):
    from tandem.rl.session import holds_run_folder
    from tandem.rl.config import JobConfig

    seen = []
    job = holds_run_folder(lambda cfg: seen.append((tmp_path / LOCK_NAME).exists()))
    monkeypatch.setenv("RANK", "1")
    job(JobConfig(output_dir=str(tmp_path)))
    monkeypatch.setenv("RANK", "0")
    job(JobConfig(output_dir=str(tmp_path)))
    assert seen == [False, True]


# ------------------------------------------------------------------------------------------------ Ctrl-C
def ctrl_c():
    signal.raise_signal(signal.SIGINT)


def test_ctrl_c_before_training_stops_at_once():
    from tandem.rl.signals import Interrupted, StopSignals

    with StopSignals(), pytest.raises(Interrupted, match="^stopped at once by SIGINT before training started$"):
        ctrl_c()


def test_first_ctrl_c_asks_for_a_stop_and_a_second_stops_at_once_naming_the_last_checkpoint():
    from tandem.rl.signals import Interrupted, StopSignals

    with StopSignals() as signals:
        signals.arm(lambda: "at step 3; the last checkpoint is RUN/checkpoints/step_2 (continue with resume=auto)")
        ctrl_c()
        assert signals.requested == "SIGINT"
        with pytest.raises(Interrupted) as stop:
            ctrl_c()
    assert str(stop.value) == ("stopped at once by a second SIGINT at step 3; the last checkpoint is "
                               "RUN/checkpoints/step_2 (continue with resume=auto)")


def test_a_second_ctrl_c_waits_for_the_checkpoint_being_written():
    from tandem.rl.signals import Interrupted, StopSignals

    written = []
    with StopSignals() as signals:
        signals.arm(lambda: f"at step 4; the last checkpoint is step_{written[-1] if written else 2}")
        ctrl_c()
        with pytest.raises(Interrupted, match="the last checkpoint is step_4$"):
            with signals.shielded():
                ctrl_c()
                written.append(4)


def test_ctrl_c_while_the_job_cleans_up_is_logged_and_ignored(caplog):
    from tandem.rl.signals import StopSignals

    before = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN where started in the background
    with StopSignals() as signals, caplog.at_level("WARNING", logger="tandem.session"):
        signals.arm(lambda: "at step 1")
        ctrl_c()
        signals.close()
        ctrl_c()
        ctrl_c()
    assert caplog.text.count("already stopping; cleaning up") == 2
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_an_interrupt_without_a_message_is_one_line(monkeypatch):
    import tandem.rl.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "rewards", interrupted)
    proc = tandem_cli("rewards")
    assert proc.returncode == 130 and proc.stderr.strip() == "tandem: interrupted"


# ------------------------------------------------------------------------------ joint schedule and hand-off
def test_joint_phase_is_a_function_of_the_global_step():
    from tandem.rl.config import JobConfig
    from tandem.rl.session import joint_phase

    cfg = JobConfig(max_steps=11)
    cfg.joint.ar_steps_per_phase, cfg.joint.decoder_steps_per_phase = 2, 4
    phases = [joint_phase(cfg, step) for step in range(11)]
    assert [p[0] for p in phases] == ["ar"] * 2 + ["decoder"] * 4 + ["ar"] * 2 + ["decoder"] * 3
    assert phases[0] == ("ar", 0, 2) and phases[2] == phases[5] == ("decoder", 2, 6)
    assert phases[10] == ("decoder", 8, 11)  # the last phase ends at max_steps


def test_handoff_records_round_trip_exactly(tmp_path):
    from tandem.rl.buffer import load_records, save_records

    source = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    tokens = np.arange(12, dtype=np.int64).reshape(3, 4)
    records = [PromptRecord(f"p{i // 2}", {"text": "hi", "n": i, "weights": [0.5, None], "reference": source,
                                           "full_tokens": tokens[i % 3]}) for i in range(4)]
    back = load_records(save_records(tmp_path / "h.safetensors", records))
    assert [r.prompt for r in back] == [r.prompt for r in records]
    for a, b in zip(records, back):
        assert a.metadata.keys() == b.metadata.keys()
        for k, v in a.metadata.items():
            w = b.metadata[k]
            same = np.array_equal(v, w) and v.dtype == w.dtype if isinstance(v, np.ndarray) else v == w
            assert same, k
    assert back[0].metadata["reference"] is back[3].metadata["reference"]  # one copy of a shared source image


def test_a_prompt_sampler_state_keeps_its_seed():
    from tandem.rl.data import PromptSampler

    records = [PromptRecord(str(i), {}) for i in range(5)]
    a = PromptSampler(records, seed=7)
    a.next_batch(3)
    b = PromptSampler(records, seed=0)
    b.load_state_dict(a.state_dict())
    assert [r.prompt for r in b.next_batch(9)] == [r.prompt for r in a.next_batch(9)]


def test_a_stop_at_once_keeps_its_message_when_a_library_raises_a_bare_keyboard_interrupt():
    from tandem.rl.signals import Interrupted, StopSignals

    with pytest.raises(Interrupted, match="^stopped at once by a second SIGINT at step 5$"):
        with StopSignals() as signals:
            signals.arm(lambda: "at step 5")
            ctrl_c()
            try:
                ctrl_c()
            except Interrupted:
                raise KeyboardInterrupt from None  # what ray.get raises when a signal handler raised inside it
