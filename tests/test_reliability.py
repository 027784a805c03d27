"""Reliability: resume without a checkpoint, crash and Ctrl-C checkpoints, one job per run folder, corrupt run
files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cli_run import tandem_cli  # tests/ is on sys.path
from tandem.core.errors import ConfigError
from tandem.rl.config import load_config
from tandem.rl.run_dir import RunDir
from tandem.rl.session import train

pytestmark = pytest.mark.slow  # jobs and signals


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


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
    errors = [line for line in second.stderr.splitlines() if line.startswith("tandem: ")]
    assert second.returncode == 2 and len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"in use by another tandem job (pid {proc.pid} on host" in errors[0]

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
