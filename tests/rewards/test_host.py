"""Reward hosting on a real local Ray cluster: plugins by import path, replicas, groupwise rewards, crashes,
timeouts, failing samples, contract errors — and the same scores from the in-process backend."""

import logging

import numpy as np
import pytest

from tandem.rewards.base import RewardConfigError, RewardError
from tandem.rewards.client import RewardClient, RewardScores
from tandem.rl.advantages import compute_advantages
from tandem.rl.config import RewardEntry, RewardHostConfig

pytestmark = pytest.mark.slow  # a Ray cluster

RAY = RewardHostConfig(backend="ray")
LOCAL = RewardHostConfig(backend="local")
P = "tests.reward_plugins:"


def batch(n=6, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    prompts = [f"prompt number {i}" for i in range(n)]
    return images, prompts, [{} for _ in range(n)], np.repeat(np.arange(n // 2), 2)


def score(entries, host, *args):
    with RewardClient(entries, host) as client:
        return client.score(*args).result()


def test_import_path_plugins_end_to_end_match_local(ray_cluster):
    entries = [
        RewardEntry(fn=P + "mean_red", args={"scale": 2.0}, replicas=2, batch_size=2, weight=0.5),
        RewardEntry(fn=P + "PromptLength", args={"offset": 1.0}),
        RewardEntry(fn=P + "PromptLength", name="length_again"),
        RewardEntry(name="brightness", args={"target": 0.2}, num_cpus=0.1),
        RewardEntry(name="brightness"),
    ]
    images, prompts, metadata, groups = batch(7)
    prompts[3] = ""
    remote = score(entries, RAY, images, prompts, metadata, np.arange(7))
    local = score(entries, LOCAL, images, prompts, metadata, np.arange(7))
    assert isinstance(remote, RewardScores)
    assert remote.names == ["mean_red", "PromptLength", "length_again", "brightness", "brightness_2"]
    assert remote.weights == {"mean_red": 0.5, "PromptLength": 1.0, "length_again": 1.0, "brightness": 1.0, "brightness_2": 1.0}
    for name in remote.names:
        assert remote[name].dtype == np.float64 and remote[name].shape == (7,)
        np.testing.assert_array_equal(remote[name], local[name])
    np.testing.assert_allclose(remote["mean_red"], images[..., 0].reshape(7, -1).mean(1) / 255 * 2)
    assert np.isnan(remote["PromptLength"][3]) and remote["PromptLength"][0] == len("prompt number 0") + 1


def test_pipelined_futures_resolve_in_any_order(ray_cluster):
    entries = [RewardEntry(fn=P + "mean_red", replicas=2)]
    with RewardClient(entries, RAY) as client:
        batches = [batch(4, seed=s) for s in range(3)]
        futures = [client.score(*b) for b in batches]
        for k in (2, 0, 1):
            np.testing.assert_allclose(futures[k].result()["mean_red"], batches[k][0][..., 0].reshape(4, -1).mean(1) / 255)


@pytest.mark.parametrize("host", [RAY, LOCAL], ids=["ray", "local"])
def test_groupwise_reward_is_called_once_per_group(ray_cluster, host):
    images, prompts, metadata, _ = batch(7)
    groups = np.array([5, 5, 9, 9, 9, 2, 5])  # groups of 3, 3 and 1, interleaved
    scores = score([RewardEntry(fn=P + "GroupSize", replicas=2)], host, images, prompts, metadata, groups)["GroupSize"]
    np.testing.assert_allclose(scores, [3.0, 3.1, 3.0, 3.1, 3.2, 1.0, 3.2])


def test_actor_killed_mid_batch_is_restarted_and_rescored(ray_cluster, tmp_path):
    marker = tmp_path / "crashed"
    entries = [RewardEntry(fn=P + "CrashOnce", args={"marker": str(marker)}, max_restarts=2), RewardEntry(fn=P + "mean_red")]
    images, prompts, metadata, groups = batch(6)
    result = score(entries, RAY, images, prompts, metadata, groups)
    assert marker.exists(), "the reward did not crash: the test proves nothing"
    np.testing.assert_array_equal(result["CrashOnce"], np.ones(6))


def test_actor_death_without_restarts_is_an_error(ray_cluster, tmp_path):
    entries = [RewardEntry(fn=P + "CrashOnce", args={"marker": str(tmp_path / "m")}, max_restarts=0)]
    with pytest.raises(RewardError, match=r"reward 'CrashOnce': its actor died and max_restarts=0"):
        score(entries, RAY, *batch(2))


def test_timeout_retries_once_then_names_the_reward(ray_cluster, tmp_path, caplog):
    entries = [RewardEntry(fn=P + "Sleepy", args={"seconds": 60, "marker": str(tmp_path / "calls")}, timeout_s=1.5)]
    with caplog.at_level(logging.WARNING, logger="tandem.rewards"):
        with pytest.raises(RewardError, match=r"reward 'Sleepy' did not finish within timeout_s=1.5s, twice"):
            score(entries, RAY, *batch(2))
    assert (tmp_path / "calls").read_text() == "2"  # the first try and one retry
    assert "retrying once" in caplog.text


def test_timeout_then_successful_retry(ray_cluster, tmp_path):
    entries = [RewardEntry(fn=P + "Sleepy", args={"seconds": 60, "marker": str(tmp_path / "calls"), "slow_calls": 1}, timeout_s=1.5)]
    np.testing.assert_array_equal(score(entries, RAY, *batch(4))["Sleepy"], np.full(4, 0.5))


@pytest.mark.parametrize("host", [RAY, LOCAL], ids=["ray", "local"])
def test_failing_sample_is_nan_with_a_warning(ray_cluster, host, caplog):
    images, prompts, metadata, groups = batch(6)
    prompts[4] = "boom"
    with caplog.at_level(logging.WARNING, logger="tandem.rewards"):
        scores = score([RewardEntry(fn=P + "fails_on_boom", batch_size=3)], host, images, prompts, metadata, groups)["fails_on_boom"]
    np.testing.assert_array_equal(np.isnan(scores), [False, False, False, False, True, False])
    assert np.all(scores[~np.isnan(scores)] == 1.0)
    messages = [r.getMessage() for r in caplog.records if r.name == "tandem.rewards"]
    assert any("failed on a batch of 3" in m for m in messages)
    assert any("failed on samples [4]" in m and "boom in prompt" in m for m in messages)


@pytest.mark.parametrize("host", [RAY, LOCAL], ids=["ray", "local"])
def test_wrong_number_of_scores_is_a_clear_error(ray_cluster, host):
    with pytest.raises(RewardError, match=r"reward 'one_short' returned 3 scores for a batch of 4"):
        score([RewardEntry(fn=P + "one_short")], host, *batch(4))


@pytest.mark.parametrize("host", [RAY, LOCAL], ids=["ray", "local"])
def test_reward_that_cannot_be_built_is_a_config_error(ray_cluster, host):
    entry = RewardEntry(fn=P + "NeverBuilds", args={"path": "/models/x"})
    with pytest.raises(RewardConfigError, match=r"reward 'NeverBuilds' could not be built: FileNotFoundError: no weights at /models/x"):
        with RewardClient([entry], host):
            pass


def test_a_start_without_waiting_returns_while_the_reward_builds_and_the_first_score_waits_for_it(ray_cluster,
                                                                                                 tmp_path):
    import contextlib

    from tests.reward_plugins import append_trace

    trace = tmp_path / "trace"
    entry = RewardEntry(fn=P + "BuildTrace", args={"trace": str(trace), "build_s": 1.0})
    images, prompts, metadata, groups = batch(4)
    with contextlib.closing(RewardClient([entry], RAY).start(wait=False)) as client:
        append_trace(trace, "started")
        scores = client.score(images, prompts, metadata, groups).result()["BuildTrace"]
    seen = dict(line.split() for line in trace.read_text().splitlines())
    assert float(seen["started"]) < float(seen["build-end"])  # start() came back before the reward was built
    np.testing.assert_allclose(scores, images[..., 0].reshape(4, -1).mean(1) / 255)


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_none_scores_flow_into_nan_safe_advantages(ray_cluster, aggregation):
    images, prompts, metadata, groups = batch(6)
    prompts[0] = prompts[1] = ""  # PromptLength: no score for the whole first group
    prompts[2] = ""  # ... and for one sample of the second group, which mean_red still scores
    entries = [RewardEntry(fn=P + "PromptLength"), RewardEntry(fn=P + "mean_red", weight=2.0)]
    result = score(entries, RAY, images, prompts, metadata, groups)
    assert np.isnan(result["PromptLength"][:3]).all()
    adv = compute_advantages(result.scores, result.weights, groups, aggregation=aggregation)
    assert np.isfinite(adv.advantages).all()
    assert np.isfinite(adv.rewards).all()  # mean_red scores every sample
    assert adv.metrics["reward/PromptLength/missing_frac"] == 0.5


def test_bad_batches_are_refused(ray_cluster):
    with RewardClient([RewardEntry(name="brightness")], LOCAL) as client:
        with pytest.raises(ValueError, match=r"numpy uint8 array of shape \(B, H, W, 3\)"):
            client.score(np.zeros((2, 8, 8, 3), np.float32), ["a", "b"])
        with pytest.raises(ValueError, match="prompts has 1 entries for a batch of 2"):
            client.score(np.zeros((2, 8, 8, 3), np.uint8), ["a"])
    with pytest.raises(RuntimeError, match="before start"):
        RewardClient([RewardEntry(name="brightness")], LOCAL).score(np.zeros((1, 8, 8, 3), np.uint8), ["a"])


def test_joining_an_existing_cluster_leaves_it_running(ray_cluster, tmp_path):
    """A second driver (a fresh process) joins this session's cluster through RAY_ADDRESS, scores, disconnects."""
    import os
    import subprocess
    import sys

    import ray

    script = (
        "import numpy as np\n"
        "from tandem.rewards.client import RewardClient\n"
        "from tandem.rewards.config import RewardEntry, RewardHostConfig\n"
        "with RewardClient([RewardEntry(fn='tests.reward_plugins:mean_red')], RewardHostConfig(backend='ray')) as c:\n"
        "    print(c.score(np.full((2, 4, 4, 3), 255, np.uint8), ['a', 'b']).result()['mean_red'].tolist())\n"
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[1.0, 1.0]"
    assert ray.is_initialized() and score([RewardEntry(name="brightness")], RAY, *batch(2))["brightness"].shape == (2,)
