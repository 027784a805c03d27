"""Rewards that break are loud and one line; the embedded Ray cluster is private; nothing hangs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from tests.cli_run import assert_user_mistake, tandem_cli
from tandem.core.errors import ConfigError
from tandem.rewards.base import RewardConfigError, build_reward, check_entries
from tandem.rewards.client import RewardClient
from tandem.rewards.config import RewardEntry, RewardHostConfig

pytestmark = pytest.mark.slow  # Ray clusters


@pytest.mark.parametrize("args", [{"rgb": [1, 2]}, {"rgb": ["a", "b", "c"]}, {"rgb": [0, 0, 999]}])
def test_bad_color_args_fail_when_the_reward_is_built(args):
    entry = RewardEntry(name="color", args=args)
    with pytest.raises(RewardConfigError, match="args.rgb must be three numbers"):
        check_entries([entry])
    with pytest.raises(RewardConfigError, match="reward 'color': bad rewards"):
        build_reward(entry)


def test_reward_error_in_the_cli_is_one_line_naming_the_reward(tmp_path, plugin_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(images / f"{i}.png")
    (tmp_path / "p.txt").write_text("a\nb\n")
    proc = tandem_cli("score", "--reward", "tests.reward_plugins:one_short", "--images", str(images), "--prompts", str(tmp_path / "p.txt"))
    assert_user_mistake(proc, "reward 'one_short' returned 1 scores for a batch of 2", code=1)


def test_a_prompt_longer_than_the_ar_context_is_one_line(tiny_model_path):
    from tandem.policies.glm_image import load_pipeline
    from tandem.policies.glm_image_family import check_prompts
    from tandem.rl.config import JobConfig

    pipe, cfg = load_pipeline(str(tiny_model_path)), JobConfig(output_dir="unused")
    check_prompts(pipe, ["a red apple"], cfg, "ar")
    with pytest.raises(ConfigError, match="longer than the AR model's context allows"):
        check_prompts(pipe, ["a red apple " * 200_000], cfg, "ar")  # 2.4 MB: refused without tokenising it
    with pytest.raises(ConfigError, match="shorten it"):
        check_prompts(pipe, ["apple " * 4000], cfg, "ar")  # tokenised: more tokens than the 4096 positions


def test_unreachable_reward_host_address_is_one_line_before_models_load(tmp_path):
    proc = tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={tmp_path / 'run'}",
               f"model.path={tmp_path / 'no-model-needed'}", "reward_host.address=127.0.0.1:9")
    assert_user_mistake(proc, "reward_host.address 127.0.0.1:9: no Ray cluster answers there")
    assert not (tmp_path / "run").exists()


@pytest.fixture
def http_port(request):
    """A plain HTTP/1 server (not Ray) bound to ``request.param``; its port."""
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # its request log would go to the captured stderr
            pass

    server = http.server.HTTPServer((request.param, 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


# On every local address, Ray dials the address itself; on 127.0.0.1 only, Ray dials this machine's own IP for
# 127.0.0.1 (where nothing answers), unless that IP is loopback too: one line either way, with no Ray output.
@pytest.mark.own_ray  # Ray's own choice of the address it dials, without the shared loopback-only cluster
@pytest.mark.timeout(120)  # ray.init on such an address retries for many minutes
@pytest.mark.parametrize("http_port", ["0.0.0.0", "127.0.0.1"], indirect=True)
def test_a_reward_host_address_that_is_not_ray_is_one_line_without_ray_output(tmp_path, http_port, capfd):
    proc = tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={tmp_path / 'run'}",
                      f"model.path={tmp_path / 'no-model-needed'}", f"reward_host.address=127.0.0.1:{http_port}")
    line = assert_user_mistake(proc, f"reward_host.address 127.0.0.1:{http_port}: ")
    assert "not a Ray cluster (" in line or "no Ray cluster answers there (Ray dials" in line
    assert "GCS" not in capfd.readouterr().err  # nothing from Ray's own logging on the process's stderr


def test_the_address_of_a_live_ray_cluster_passes_the_check(ray_cluster):
    import ray

    from tandem.rewards.host import check_reachable

    check_reachable(ray.get_runtime_context().gcs_address, "reward_host.address")


def test_an_actor_in_a_crash_loop_is_reported_as_dying_not_as_a_timeout(ray_cluster, plugin_path):
    import numpy as np

    from tandem.rewards.base import RewardError

    entry = RewardEntry(fn="tests.reward_plugins:SlowThenDies", args={"build_s": 2}, timeout_s=3, max_restarts=3)
    with RewardClient([entry], RewardHostConfig(backend="ray")) as client:
        with pytest.raises(RewardError, match=r"reward 'SlowThenDies': its actor died/restarting \(\d time\(s\), "
                                              r"max_restarts=3\): process \d+ exited \(SYSTEM_ERROR"):
            client.score(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"]).result()


def test_an_actor_that_dies_while_it_is_built_is_reported_as_dying(ray_cluster, plugin_path):
    from tandem.rewards.base import RewardError

    entry = RewardEntry(fn="tests.reward_plugins:DiesWhenBuilt", args={"build_s": 1}, max_restarts=5)
    with pytest.raises(RewardError, match="reward 'DiesWhenBuilt': its actor died/restarting .* while it was being built"):
        RewardClient([entry], RewardHostConfig(backend="ray", start_timeout_s=5)).start()

def test_unschedulable_reward_actor_is_refused_at_once(ray_cluster):
    entry = RewardEntry(name="color", num_gpus=1)  # no node of this cluster has a GPU
    with pytest.raises(RewardConfigError, match="reward 'color' asks num_cpus=0.25, num_gpus=1 per actor, but no Ray node"):
        RewardClient([entry], RewardHostConfig(backend="ray")).start()


def test_reward_actor_that_does_not_start_in_time_is_one_line(ray_cluster, plugin_path):
    entry = RewardEntry(fn="tests.reward_plugins:SlowToBuild", args={"seconds": 120})
    with pytest.raises(RewardConfigError, match="'SlowToBuild': its actor did not start within reward_host.start_timeout_s=3s"):
        RewardClient([entry], RewardHostConfig(backend="ray", start_timeout_s=3)).start()


PRIVACY_PROBE = textwrap.dedent('''
    import json, os, stat, subprocess, sys
    import ray
    from tandem.rewards.host import Cluster
    from tandem.rewards.config import RewardHostConfig

    stale = os.path.join(sys.argv[1], "tandem-ray-999999999-old")  # left by a SIGKILLed job (no such pid)
    os.makedirs(stale)
    import tempfile
    tempfile.tempdir = sys.argv[1]
    cluster = Cluster(RewardHostConfig(num_cpus=1))
    cluster.start()
    folder, token = cluster.temp_dir, os.path.join(cluster.temp_dir, "auth_token")
    mode = lambda p: oct(stat.S_IMODE(os.stat(p).st_mode))
    out = {"swept": not os.path.exists(stale), "folder": mode(folder), "token": mode(token),
           "owner": os.stat(folder).st_uid == os.getuid(),
           "home_token": os.path.exists(os.path.expanduser("~/.ray/auth_token")),
           "worker_auth": ray.get(ray.remote(num_cpus=0.1)(lambda: os.environ.get("RAY_AUTH_MODE")).remote())}
    gcs = ray.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    join = f"import ray; ray.init(address='{gcs}', _node_ip_address='127.0.0.1'); print('JOINED')"
    try:
        outsider = subprocess.run([sys.executable, "-c", join], env=dict(env, RAY_AUTH_MODE="disabled"),
                                  capture_output=True, text=True, timeout=120)
        out["outsider_joined"] = "JOINED" in outsider.stdout
    except subprocess.TimeoutExpired:  # still knocking after 2 minutes: not in
        out["outsider_joined"] = False
    cluster.stop()
    out["removed"] = not os.path.exists(folder)
    print("PROBE " + json.dumps(out))
''')


def test_embedded_cluster_is_private_and_cleans_up():
    import shutil
    import tempfile

    short = tempfile.mkdtemp(prefix="t-", dir="/tmp")  # Ray's socket paths must stay under 108 characters
    home_token = os.path.expanduser("~/.ray/auth_token")
    had_home_token = os.path.exists(home_token)
    try:
        proc = subprocess.run([sys.executable, "-c", PRIVACY_PROBE, short], capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert found, proc.stderr[-3000:]
    probe = json.loads(found[0][6:])
    assert probe == {"swept": True, "folder": "0o700", "token": "0o600", "owner": True, "home_token": had_home_token,
                     "worker_auth": "token", "outsider_joined": False, "removed": True}, proc.stderr[-2000:]
