"""Reliability: resume without a checkpoint, crash and Ctrl-C checkpoints, one job per run folder, corrupt run
files."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.cli_run import assert_user_mistake, tandem_cli
from tandem.core.errors import ConfigError
from tandem.rewards.host import temp_root
from tandem.rl.config import load_config
from tandem.rl.run_dir import RunDir
from tandem.rl.session import train
from tandem.rl.signals import Stopped

pytestmark = pytest.mark.slow  # jobs and signals

VOLATILE = ("time/", "cost/")  # wall-clock figures differ between any two runs


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def stable(row):
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def wait_for(path, proc, what):
    deadline = time.time() + 300
    while not path.is_file():
        assert proc.poll() is None and time.time() < deadline, f"the run ended before {what}"
        time.sleep(0.02)


def cfg_for(tiny, out, *extra, stage="decoder"):
    return load_config(f"configs/demo/{stage}.yaml", [f"output_dir={out}", f"model.path={tiny}", "logging.progress=false",
                                                      "reward_host.backend=local", "logging.sample_every=0", *extra],
                       stage=stage)


@pytest.fixture
def killed_run(tiny_model_path, tmp_path):
    """A run killed after logging steps 1 and 2, before any checkpoint (checkpoint_every: 0)."""
    run = train(cfg_for(tiny_model_path, tmp_path / "run", "max_steps=2"), "decoder")
    shutil.rmtree(run / "checkpoints")
    return run


def test_resume_auto_without_checkpoint_restarts_from_step_0(tiny_model_path, killed_run, caplog):
    with caplog.at_level("WARNING", logger="tandem.session"):
        train(cfg_for(tiny_model_path, killed_run, "max_steps=4", "resume=auto"), "decoder")
    assert [r["step"] for r in rows(killed_run)] == [1, 2, 3, 4]
    assert "restarting the run from step 0" in caplog.text


def test_resume_auto_on_another_configs_run_is_refused_before_anything_is_written(tiny_model_path, killed_run):
    before = {f: (killed_run / f).read_bytes() for f in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(ConfigError, match="different config"):
        train(cfg_for(tiny_model_path, killed_run, "max_steps=4", "resume=auto", "grpo.beta=0.5"), "decoder")
    assert {f: (killed_run / f).read_bytes() for f in before} == before


def test_reward_error_between_steps_keeps_the_finished_steps(tiny_model_path, tmp_path, plugin_path):
    from tandem.rewards.base import RewardError

    # 2 scoring calls per rollout: the second rollout's first call breaks the contract
    cfg = cfg_for(tiny_model_path, tmp_path, "max_steps=6",
                  "rewards=[{fn: 'tests.reward_plugins:ShortAfter', args: {good_calls: 2}}]")
    with pytest.raises(RewardError, match="ShortAfter"):
        train(cfg, "decoder")
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]
    assert (tmp_path / "checkpoints" / "step_2" / "state.json").is_file()
    assert json.loads((tmp_path / "checkpoints" / "step_2" / "state.json").read_text())["run_state"]["rollouts"] == 1


def test_final_checkpoint_comes_before_the_final_grid(tiny_model_path, tmp_path, monkeypatch):
    from tandem.rl.run_dir import RunDir

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunDir, "save_grid", disk_full)  # fault injection: the final grid cannot be written
    with pytest.raises(OSError):
        train(cfg_for(tiny_model_path, tmp_path, "max_steps=2"), "decoder")
    assert (tmp_path / "checkpoints" / "step_2" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_failing_eval_is_logged_and_training_goes_on(tiny_model_path, tmp_path, plugin_path, caplog):
    cfg = cfg_for(tiny_model_path, tmp_path, "max_steps=4", "logging.eval_every=2", "data.eval_prompts=data/eval_prompts.jsonl",
                  "eval.num_prompts=2", "eval.rewards=[{fn: 'tests.reward_plugins:one_short'}]")
    with caplog.at_level("ERROR", logger="tandem.session"):
        train(cfg, "decoder")
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4]
    assert caplog.text.count("eval at step") == 2 and "one_short" in caplog.text


def test_all_nan_reward_is_warned_about_by_name(tiny_model_path, tmp_path, plugin_path, caplog):
    cfg = cfg_for(tiny_model_path, tmp_path, "max_steps=2",
                  "rewards=[{name: color}, {fn: 'tests.reward_plugins:nothing'}]")
    with caplog.at_level("WARNING", logger="tandem.rewards"):
        train(cfg, "decoder")
    assert "reward 'nothing' scored none of the 8 samples" in caplog.text
    assert "reward 'color'" not in caplog.text


def test_sigterm_stops_at_a_checkpoint_and_resume_continues(tiny_model_path, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = [sys.executable, "-m", "tandem.rl.cli", "train", "decoder", "--config", "configs/demo/decoder.yaml",
            f"output_dir={run}", f"model.path={tiny_model_path}", "logging.progress=false", "reward_host.backend=local",
            "logging.sample_every=0", "max_steps=100"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first step"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err and "stopped by SIGTERM" in err, err
    done = rows(run)[-1]["step"]
    assert 1 <= done < 100 and (run / "checkpoints" / f"step_{done}" / "state.json").is_file()
    train(cfg_for(tiny_model_path, run, f"max_steps={done + 2}", "resume=auto"), "decoder")
    assert [r["step"] for r in rows(run)] == list(range(1, done + 3))


def test_a_run_killed_between_its_final_checkpoint_and_metrics_line_writes_it_on_resume(tiny_model_path, tmp_path,
                                                                                      monkeypatch):
    """The final checkpoint comes before the final step's eval and metrics line; a job that dies between them
    leaves a checkpoint of step 2 and a metrics.jsonl that ends at step 1. resume=auto writes step 2's line, with
    its eval, as the job would have."""
    extra = ["max_steps=2", "logging.eval_every=2", "data.eval_prompts=data/eval_prompts.jsonl", "eval.num_prompts=2"]
    straight = train(cfg_for(tiny_model_path, tmp_path / "straight", *extra), "decoder")

    class Killed(BaseException):
        """What a SIGKILL leaves: nothing runs after it (not even the crash checkpoint)."""

    log_metrics = RunDir.log_metrics

    def killed_at_step_2(self, metrics):
        if metrics["step"] == 2:
            raise Killed
        log_metrics(self, metrics)

    killed = tmp_path / "killed"
    monkeypatch.setattr(RunDir, "log_metrics", killed_at_step_2)  # fault injection: a kill before step 2's line
    with pytest.raises(Killed):
        train(cfg_for(tiny_model_path, killed, *extra), "decoder")
    monkeypatch.undo()
    assert [r["step"] for r in rows(killed)] == [1] and (killed / "checkpoints" / "step_2" / "state.json").is_file()

    train(cfg_for(tiny_model_path, killed, *extra, "resume=auto"), "decoder")
    assert [stable(r) for r in rows(killed)] == [stable(r) for r in rows(straight)]
    assert "eval/color/mean" in rows(killed)[-1] and (killed / "samples" / "step_000002.png").is_file()


def test_ctrl_c_mid_rollout_stops_at_its_end_and_resume_matches_an_uninterrupted_run(tiny_model_path, tmp_path,
                                                                                      plugin_path, monkeypatch):
    """Two scoring calls per rollout of two optimizer steps: a Ctrl-C while the first rollout's second half is
    scored stops after step 2 (the rollout's end) with a checkpoint there, and resume=auto continues exactly."""
    reward = "rewards=[{fn: 'tests.reward_plugins:CtrlCAt'}]"
    straight = train(cfg_for(tiny_model_path, tmp_path / "straight", "max_steps=4", reward), "decoder")

    stopped = tmp_path / "stopped"
    monkeypatch.setenv("TANDEM_TEST_CTRL_C", "2")
    with pytest.raises(Stopped, match=r"^stopped by SIGINT at step 2; the last checkpoint is .*step_2 \(continue with "
                                      r"resume=auto\)$"):
        train(cfg_for(tiny_model_path, stopped, "max_steps=4", reward), "decoder")
    monkeypatch.delenv("TANDEM_TEST_CTRL_C")
    assert [r["step"] for r in rows(stopped)] == [1, 2]
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step_2"]

    train(cfg_for(tiny_model_path, stopped, "max_steps=4", reward, "resume=auto"), "decoder")
    assert [stable(r) for r in rows(stopped)] == [stable(r) for r in rows(straight)]


@pytest.mark.parametrize("second", ["mid_rollout", "while_cleaning_up"])
def test_a_second_ctrl_c_says_what_is_saved_and_leaves_no_ray_folder(tiny_model_path, tmp_path, plugin_path, second):
    """A job on the embedded Ray cluster, its reward 2 s per call: Ctrl-C while the second rollout is scored, then
    again 0.5 s later (mid-rollout: it stops at once, the step-2 checkpoint is what is saved) or as soon as the stop's
    step-4 checkpoint is written (while the job shuts Ray down: ignored). Either way one line that names the
    checkpoint, exit 130, and the cluster's temp folder removed."""
    run = tmp_path / "run"
    reward = f"rewards=[{{fn: 'tests.reward_plugins:Sleepy', args: {{seconds: 2, marker: '{tmp_path / 'calls'}'}}}}]"
    args = [sys.executable, "-m", "tandem.rl.cli", "train", "decoder", "--config", "configs/demo/decoder.yaml",
            f"output_dir={run}", f"model.path={tiny_model_path}", "logging.progress=false", "logging.sample_every=0",
            "logging.checkpoint_every=2", "max_steps=100", reward]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # not this process's Ray cluster
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(run / "checkpoints" / "step_2" / "state.json", proc, "its first checkpoint")
    time.sleep(0.5)  # the second rollout is being scored
    os.kill(proc.pid, signal.SIGINT)
    if second == "mid_rollout":
        time.sleep(0.5)
    else:
        wait_for(run / "checkpoints" / "step_4" / "state.json", proc, "the stop's checkpoint")
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.startswith("tandem: ")]
    step = 2 if second == "mid_rollout" else 4
    assert proc.returncode == 130 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].endswith(f"at step {step}; the last checkpoint is {run / 'checkpoints' / f'step_{step}'} "
                             f"(continue with resume=auto)"), err
    # while cleaning up, the first signal's stop is what the line reports (a second one that comes in the instant
    # between the checkpoint and the stop reports the same checkpoint)
    assert lines[0].startswith(("tandem: stopped at once by a second SIGINT",) if second == "mid_rollout"
                               else ("tandem: stopped by SIGINT", "tandem: stopped at once by a second SIGINT")), err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{s}" for s in range(2, step + 1, 2)]
    assert not glob.glob(os.path.join(temp_root(), f"tandem-ray-{proc.pid}-*")) and not (run / "tandem.lock").exists()


def test_a_second_job_on_a_live_run_is_refused_and_the_killed_runs_lock_is_taken_over(tiny_model_path, tmp_path):
    run = tmp_path / "run"
    common = ["train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={run}",
              f"model.path={tiny_model_path}", "logging.progress=false", "reward_host.backend=local",
              "logging.sample_every=0", "logging.checkpoint_every=2"]
    proc = subprocess.Popen([sys.executable, "-m", "tandem.rl.cli", *common, "max_steps=100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(run / "checkpoints" / "step_2" / "state.json", proc, "its first checkpoint")
        second = tandem_cli(*common, "max_steps=4", "resume=auto")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert_user_mistake(second, f"in use by another tandem job (pid {proc.pid} on host", only="tandem: ")

    done = RunDir(str(run)).read_metrics()[-1]["step"]  # its last line may be cut short by the kill
    resumed = tandem_cli(*common, f"max_steps={done + 2}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"taking over its lock from a job that is no longer running (pid {proc.pid} on host" in resumed.stderr
    assert [r["step"] for r in rows(run)] == list(range(1, done + 3))


# ------------------------------------------------------------------ corrupt run files: one line, before models load
@pytest.fixture(scope="module")
def finished_run(tiny_model_path, tmp_path_factory):
    """A finished 2-step run with its final checkpoint checkpoints/step_2."""
    return train(cfg_for(tiny_model_path, tmp_path_factory.mktemp("finished") / "run", "max_steps=2"), "decoder")


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


def test_stray_checkpoint_folders_are_never_the_resume_point(tiny_model_path, run_copy):
    from tandem.rl.checkpoint import find_resume_point

    shutil.copytree(run_copy / "checkpoints" / "step_2", run_copy / "checkpoints" / "step_10_backup")
    (run_copy / "checkpoints" / ".step_12.partial").mkdir()
    cfg = cfg_for(tiny_model_path, run_copy, "max_steps=4", "resume=auto")
    assert find_resume_point(cfg) == run_copy / "checkpoints" / "step_2"


def test_corrupt_state_json_is_one_line(tiny_model_path, run_copy):
    (run_copy / "checkpoints" / "step_2" / "state.json").write_text('{"step": 2, "fingerp')
    with pytest.raises(ConfigError, match="state.json is corrupt"):
        train(cfg_for(tiny_model_path, run_copy, "max_steps=4", "resume=auto"), "decoder")


def test_truncated_checkpoint_weights_are_one_line(tiny_model_path, run_copy):
    weights = run_copy / "checkpoints" / "step_2" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match="diffusion_pytorch_model.safetensors is truncated or corrupt"):
        train(cfg_for(tiny_model_path, run_copy, "max_steps=4", "resume=auto"), "decoder")


def test_corrupt_metrics_line_on_resume_is_one_line(tiny_model_path, run_copy):
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    (run_copy / "metrics.jsonl").write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2: not a JSON line"):
        train(cfg_for(tiny_model_path, run_copy, "max_steps=4", "resume=auto"), "decoder")


def test_a_last_metrics_line_cut_short_by_a_kill_is_dropped(tmp_path):
    from tandem.rl.run_dir import RunDir

    run = RunDir(str(tmp_path))
    run.metrics_file.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')
    assert [r["step"] for r in run.read_metrics()] == [1, 2]


def test_nan_weight_is_not_logged_as_a_zero_reward():
    import numpy as np

    from tandem.rl.advantages import compute_advantages

    result = compute_advantages({"color": np.array([-0.5, -0.3, -0.2, -0.1])}, {"color": float("nan")}, np.array([0, 0, 1, 1]))
    assert np.isnan(result.metrics["reward/mean"])
