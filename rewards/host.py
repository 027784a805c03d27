"""Reward entries hosted as Ray actors: one actor class for every reward, and the Ray backend of RewardClient.

This is the only module that calls ``ray.get``. Per batch the images are ``ray.put`` once and every actor of
every reward reads that same object (zero-copy, read-only).

Per entry: ``replicas`` actors (the batch is split into near-equal shards, whole groups for a groupwise
reward), each reserving fractional ``num_cpus`` / ``num_gpus``; inside an actor the shard is scored in chunks
of ``batch_size`` (``rewards/scoring.py``).

Security: the embedded cluster runs with Ray's token authentication on (``RAY_AUTH_MODE=token``), with a
fresh random token per job in a 0700 folder of its own (``$TMPDIR/tandem-ray-<pid>-*``; Ray's temp folder
is inside it: Ray makes that one 0777), bound to 127.0.0.1; the folder is removed when the job ends, and folders left by a killed job are
swept on the next start. Only this job's processes can read the token, so no other local user can join.

Start-up comes in two halves, so that a job loads its pipeline while the actors build their rewards (reward
models load in the actors' own processes): ``start`` spawns the actors and returns, ``wait_ready`` waits until
every reward is built. An entry whose ``num_cpus`` / ``num_gpus`` fit no node of the cluster is refused at once
by ``start``; a reward that cannot be built, or an actor that has not built its reward within
``reward_host.start_timeout_s`` of being spawned, stops the job with one line from ``wait_ready``.

Faults:
* an actor process that dies is restarted by Ray (``max_restarts``) and its calls re-run
  (``max_task_retries`` = ``max_restarts``), so the caller still gets every score;
* a call that runs past ``timeout_s`` (counted from when it can start: the previous call on that actor has
  finished) is retried once on a fresh actor, then raises RewardError naming the reward and ``timeout_s`` — or,
  when the actor's process died meanwhile (Ray restarting a crash-looping actor is what took the time),
  "its actor died/restarting" with the exit Ray recorded for that process;
* a reward that raises on a batch is rescored per sample inside the actor (``score_shard``).
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, List, Optional, Sequence, Tuple

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from tandem.core.process import pid_alive
from tandem.rewards.base import RewardConfigError, RewardError, build_reward, code_locations, import_code, logger
from tandem.rewards.scoring import ShardScores, log_warnings, score_shard, split_shards
from tandem.rewards.config import RewardEntry, RewardHostConfig

CLUSTERING_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch for multi-node clustering (on for Linux)


@ray.remote
class RewardActor:
    """Builds one reward entry in its own process and scores shards of batches with it.

    ``code``: [(sys.path folder, module)] to import first — the user module that defines (and registers) the
    reward, which this fresh process has never imported (``rewards.base.code_locations``).
    """

    def __init__(self, entry: RewardEntry, label: str, code: List[Tuple[Optional[str], str]]):
        self.reward, self.error = None, None
        try:
            import_code(code)
            self.reward = build_reward(entry, label)
        except RewardConfigError as e:  # reported by describe(): a config error must not crash-loop the actor
            self.error = str(e)

    def describe(self) -> Tuple[Optional[str], bool]:
        """(construction error or None, groupwise)."""
        return self.error, bool(self.reward and self.reward.groupwise)

    def score(self, images: np.ndarray, batch: Tuple[List[str], List[dict], np.ndarray], indices: np.ndarray, batch_size: int) -> ShardScores:
        prompts, metadata, group_ids = batch
        return score_shard(self.reward, images, prompts, metadata, group_ids, indices, batch_size)


# ---------------------------------------------------------------------------------------------------- cluster
class Cluster:
    """An embedded local Ray cluster started (and stopped) here, or a connection to an existing one.

    ``host.address`` or ``$RAY_ADDRESS`` joins that cluster (only this driver disconnects at the end); a Ray
    already initialised in this process is reused as it is. The embedded one is private to this job (module
    docstring: security).
    """

    PREFIX = "tandem-ray-"
    AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

    def __init__(self, host: RewardHostConfig):
        self.host = host
        self.connected = False
        self.temp_dir: Optional[str] = None
        self._restore: Optional[tuple] = None
        self._auth_env: Optional[dict] = None

    def start(self) -> None:
        if ray.is_initialized():
            return
        address = self.host.address or os.environ.get("RAY_ADDRESS")
        if address:
            check_reachable(address, "reward_host.address" if self.host.address else "$RAY_ADDRESS")
            try:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise RewardConfigError(f"cannot join the Ray cluster at {address} ({type(e).__name__}: {first}); "
                                        "check reward_host.address / $RAY_ADDRESS") from None
        else:
            root = temp_root()
            sweep_temp_dirs(root)
            self.temp_dir = tempfile.mkdtemp(prefix=f"{self.PREFIX}{os.getpid()}-", dir=root)  # mode 0700
            self._private_token()
            self._loopback_only()
            num_cpus = None if self.host.num_cpus is None else max(1, math.ceil(self.host.num_cpus))
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",  # kept as given: clustering is off (above)
                _temp_dir=os.path.join(self.temp_dir, "r"),  # Ray opens it to all; its 0700 parent does not
                log_to_driver=False,
            )
        self.connected = True

    def _private_token(self) -> None:
        """Token auth with a fresh token in this job's 0700 folder (never ~/.ray/auth_token): Ray's processes
        inherit RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH from this one."""
        from ray._raylet import AuthenticationTokenLoader, Config

        token = os.path.join(self.temp_dir, "auth_token")
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        self._auth_env = {k: os.environ.get(k) for k in self.AUTH_ENV}
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN_PATH"] = "token", token
        Config.initialize("")  # this process re-reads the mode and the token
        AuthenticationTokenLoader.instance().reset_cache()

    def _loopback_only(self) -> None:
        """Keep a single-node cluster on 127.0.0.1.

        Ray 2.60 replaces ``_node_ip_address="127.0.0.1"`` by the address of the interface that routes to a
        public DNS server (``services.resolve_ip_for_localhost``) unless multi-node clustering is off
        (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by the child processes from the environment and by this
        one from ``ray_constants``). An embedded cluster never has a second node, so turn it off while it runs.
        """
        from ray._private import ray_constants

        self._restore = (os.environ.get(CLUSTERING_ENV), ray_constants.ENABLE_RAY_CLUSTER)
        os.environ[CLUSTERING_ENV] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False

    def stop(self) -> None:
        if self.connected:
            ray.shutdown()
            self.connected = False
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
        if self._auth_env is not None:
            _set_env(self._auth_env)
            self._auth_env = None
        if self._restore is not None:
            from ray._private import ray_constants

            env, ray_constants.ENABLE_RAY_CLUSTER = self._restore
            _set_env({CLUSTERING_ENV: env})
            self._restore = None


def _set_env(values: dict) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def temp_root() -> str:
    """The system temp folder, or /tmp when it is too long for Ray's socket paths (AF_UNIX: 107 bytes, and
    Ray adds ~80 characters below it)."""
    root = tempfile.gettempdir()
    return root if len(root) <= 20 else "/tmp"


def sweep_temp_dirs(root: str) -> List[str]:
    """Remove this user's ``tandem-ray-<pid>-*`` folders in ``root`` whose job is gone (killed before it could
    clean up); returns the removed paths."""
    removed = []
    for name in os.listdir(root):
        if not name.startswith(Cluster.PREFIX):
            continue
        path = os.path.join(root, name)
        pid = name[len(Cluster.PREFIX):].split("-")[0]
        try:
            if os.stat(path).st_uid != os.getuid() or not pid.isdigit() or pid_alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS is one) answers with SETTINGS.
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def check_reachable(address: str, key: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` address must hold a gRPC server (Ray's GCS) at the address Ray dials for it, else
    ``ray.init`` retries for minutes and prints pages of GCS errors: RewardConfigError in one line instead.

    Ray dials the node's own IP for 127.0.0.1 / localhost (``services.resolve_ip_for_localhost``), so that is
    the address checked (and named when it differs)."""
    if "://" in address or address == "auto" or ":" not in address:
        return
    from ray._private.services import resolve_ip_for_localhost

    host, _, port = address.rpartition(":")
    dialed = resolve_ip_for_localhost(host)
    dials = f"Ray dials {dialed}:{port} for it; " if dialed != host else ""
    fix = "start one (`ray start --head`) or remove the key to use an embedded cluster"
    try:
        with socket.create_connection((dialed, int(port)), timeout=timeout_s) as conn:
            conn.sendall(_H2_HELLO)
            answer = conn.recv(9)
    except (OSError, ValueError) as e:
        cause = getattr(e, "strerror", None) or e
        raise RewardConfigError(f"{key} {address}: no Ray cluster answers there ({dials}{cause}); {fix}") from None
    if len(answer) < 4 or answer[3] != 4:  # the server's first frame must be SETTINGS
        raise RewardConfigError(f"{key} {address}: something answers there, but not a Ray cluster ({dials}no gRPC); "
                                f"check the port (`ray status` on the head prints the address), or {fix}")


def check_resources(entries: Sequence[RewardEntry], labels: Sequence[str]) -> None:
    """Each entry's ``num_cpus`` / ``num_gpus`` must fit on one alive node of the cluster (else its actors
    would wait forever); RewardConfigError naming the reward and what the nodes have."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for entry, label in zip(entries, labels):
        if not any(entry.num_cpus <= r.get("CPU", 0) and entry.num_gpus <= r.get("GPU", 0) for r in nodes):
            have = ", ".join(f"{r.get('CPU', 0):g} CPU / {r.get('GPU', 0):g} GPU" for r in nodes) or "no alive node"
            raise RewardConfigError(f"reward '{label}' asks num_cpus={entry.num_cpus:g}, num_gpus={entry.num_gpus:g} "
                                    f"per actor, but no Ray node has that ({have}); lower rewards[].num_cpus/num_gpus")


# ---------------------------------------------------------------------------------------------------- replicas
def actor_info(actor) -> dict:
    """The GCS actor table's entry of ``actor``: State (ALIVE, RESTARTING, DEAD, ...), NumRestarts, Pid, ..."""
    from ray._private.state import actors

    return actors(actor._actor_id.hex())


def worker_exit(pid: int) -> str:
    """Why the worker process ``pid`` ended, as the GCS worker table records it (first sentence of Ray's exit
    detail and the exit type), or what is known without it."""
    from ray._private.state import state
    from ray.core.generated import common_pb2, gcs_pb2

    if not pid:
        return "its process exited"
    for raw in state._connect_and_get_accessor().get_worker_table():
        worker = gcs_pb2.WorkerTableData.FromString(raw)
        if worker.pid == pid and not worker.is_alive:
            detail = worker.exit_detail.split(". ")[0].strip().rstrip(".")
            kind = common_pb2.WorkerExitType.Name(worker.exit_type)
            return f"process {pid} exited ({kind}: {detail or 'no detail'})"
    return f"process {pid} exited"


def _get(ref: Any, label: str, entry: RewardEntry) -> Any:
    """ray.get with Ray's errors turned into the reward's own errors."""
    try:
        return ray.get(ref)
    except RayTaskError as e:
        if isinstance(e.cause, (RewardError, RewardConfigError)):
            raise type(e.cause)(str(e.cause)) from None
        raise RewardError(f"reward '{label}' failed inside its actor: {type(e.cause).__name__}: {e.cause}") from None
    except RayActorError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise RewardError(f"reward '{label}': its actor died and max_restarts={entry.max_restarts} are used up ({first})") from None


@dataclass
class _Call:
    """One scoring call on one replica; ``deadline`` is set once the call can start."""

    args: tuple
    ref: Any
    deadline: Optional[float] = None
    done: bool = False
    value: Optional[ShardScores] = None
    error: Optional[BaseException] = None


class _Replica:
    """One actor slot of an entry and its calls in flight (in submission order)."""

    def __init__(self, entry: RewardEntry, label: str, code: List[Tuple[Optional[str], str]], start_timeout_s: float):
        self.entry, self.label, self.code, self.start_timeout_s = entry, label, code, start_timeout_s
        self.pending: Deque[_Call] = deque()
        self.broken: Optional[RewardError] = None
        self.seen: Tuple[int, int] = (0, 0)  # (restarts, pid) of the actor when it was last seen alive
        self._spawn()

    def _spawn(self) -> None:
        """Start a fresh actor, which builds its reward in its own process; returns at once (``ready`` waits)."""
        self.actor = RewardActor.options(
            num_cpus=self.entry.num_cpus,
            num_gpus=self.entry.num_gpus,
            max_restarts=self.entry.max_restarts,
            max_task_retries=self.entry.max_restarts,
        ).remote(self.entry, self.label, self.code)
        self.spawned = time.monotonic()
        self.described = self.actor.describe.remote()  # runs as soon as the reward is built

    def ready(self) -> bool:
        """Wait until the reward is built, at most ``start_timeout_s`` after the actor was spawned;
        RewardConfigError if it cannot be; returns groupwise."""
        ref, timeout_s = self.described, self.start_timeout_s
        if not ray.wait([ref], timeout=max(0.0, self.spawned + timeout_s - time.monotonic()))[0]:
            crash = self._crashed()
            ray.kill(self.actor, no_restart=True)
            if crash:
                raise RewardError(f"reward '{self.label}': {crash} while it was being built, within "
                                  f"reward_host.start_timeout_s={timeout_s:g}s; fix what kills its process (its log is "
                                  "in Ray's session folder, logs/worker-*.err)")
            raise RewardConfigError(
                f"reward '{self.label}': its actor did not start within reward_host.start_timeout_s={timeout_s:g}s "
                f"(num_cpus={self.entry.num_cpus:g}, num_gpus={self.entry.num_gpus:g}: are they free on the cluster? "
                "see `ray status`); free them, lower them, or raise reward_host.start_timeout_s")
        error, groupwise = _get(ref, self.label, self.entry)
        if error:
            raise RewardConfigError(error)
        info = actor_info(self.actor)
        self.seen = (info.get("NumRestarts", 0), info.get("Pid", 0))
        return groupwise

    def submit(self, *args) -> _Call:
        call = _Call(args, self.actor.score.remote(*args))
        if not self.pending:
            call.deadline = time.monotonic() + self.entry.timeout_s
        self.pending.append(call)
        return call

    def result(self, call: _Call) -> ShardScores:
        while not call.done:
            head = self.pending[0]
            try:
                head.value = self._wait(head)
            except RewardError as e:
                head.error = e
            head.done = True
            self.pending.popleft()
            if self.pending:  # the next call starts now that this one is over
                self.pending[0].deadline = time.monotonic() + self.entry.timeout_s
        if call.error is not None:
            raise call.error
        return call.value

    def _wait(self, call: _Call) -> ShardScores:
        for attempt in (1, 2):
            if self.broken is not None:
                raise self.broken
            ready, _ = ray.wait([call.ref], timeout=max(0.0, call.deadline - time.monotonic()))
            if ready:
                return _get(call.ref, self.label, self.entry)
            crash = self._crashed()
            if attempt == 1:
                what = f": {crash}" if crash else f" exceeded timeout_s={self.entry.timeout_s}s"
                logger.warning(f"reward '{self.label}'{what}; retrying once on a fresh actor")
                self._respawn()
        ray.kill(self.actor, no_restart=True)
        if crash:
            self.broken = RewardError(f"reward '{self.label}': {crash}, on a fresh actor too; fix what kills its process "
                                      "(its log is in Ray's session folder, logs/worker-*.err)")
        else:
            self.broken = RewardError(
                f"reward '{self.label}' did not finish within timeout_s={self.entry.timeout_s}s, twice; "
                "raise rewards[].timeout_s or lower rewards[].batch_size"
            )
        raise self.broken

    def _crashed(self) -> Optional[str]:
        """After a call's deadline passed: "its actor died/restarting ..." with the cause when the actor's process
        died since it was last seen alive (Ray restarting it is then what took the time), else None."""
        restarts, pid = self.seen
        try:
            info = actor_info(self.actor)
            if info.get("NumRestarts", 0) <= restarts and info.get("State") not in ("RESTARTING", "DEAD"):
                return None  # alive, or still being created for the first time: slow, not dying
            cause = worker_exit(pid)
        except Exception:  # noqa: BLE001 - the GCS tables are a diagnosis only: without them it is a timeout
            return None
        died = max(1, info.get("NumRestarts", 0) - restarts)
        state = "dead" if info.get("State") == "DEAD" else "restarting"
        return f"its actor died/{state} ({died} time(s), max_restarts={self.entry.max_restarts}): {cause}"

    def _respawn(self) -> None:
        """Replace a hung (or crash-looping) actor by a fresh one and re-submit every call that was in flight on it."""
        ray.kill(self.actor, no_restart=True)
        self._spawn()
        self.ready()
        for call in self.pending:
            call.ref = self.actor.score.remote(*call.args)
        self.pending[0].deadline = time.monotonic() + self.entry.timeout_s

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


class _EntryHost:
    """The replicas of one reward entry."""

    def __init__(self, entry: RewardEntry, label: str, start_timeout_s: float):
        self.entry, self.label = entry, label
        code = code_locations(entry, label)
        self.replicas = [_Replica(entry, label, code, start_timeout_s) for _ in range(entry.replicas)]
        self.groupwise = False

    def ready(self) -> None:
        self.groupwise = any([r.ready() for r in self.replicas])

    def submit(self, images_ref, batch_ref, group_ids: np.ndarray) -> List[Tuple[_Replica, _Call, np.ndarray]]:
        shards = split_shards(len(group_ids), group_ids, self.groupwise, len(self.replicas))
        return [(rep, rep.submit(images_ref, batch_ref, idx, self.entry.batch_size), idx) for rep, idx in zip(self.replicas, shards)]

    def collect(self, calls, n: int) -> ShardScores:
        out = ShardScores.merge([(idx, replica.result(call)) for replica, call, idx in calls], n)
        log_warnings(out)
        return out


class RayBackend:
    """RewardClient backend: each entry in ``replicas`` Ray actors on an embedded or joined cluster."""

    def __init__(self, entries: Sequence[RewardEntry], labels: Sequence[str], host: RewardHostConfig):
        self.entries, self.labels, self.host = list(entries), list(labels), host
        self.cluster = Cluster(host)
        self.hosts: List[_EntryHost] = []

    def start(self) -> None:
        """Start (or join) the cluster and spawn every entry's actors; returns while they build their rewards."""
        self.cluster.start()
        check_resources(self.entries, self.labels)
        for e, label in zip(self.entries, self.labels):
            self.hosts.append(_EntryHost(e, label, self.host.start_timeout_s))  # close() kills the ones spawned

    def wait_ready(self) -> None:
        """Wait until every actor has built its reward (module docstring: start-up)."""
        for h in self.hosts:
            h.ready()

    def submit(self, images, prompts, metadata, group_ids):
        images_ref = ray.put(images)
        batch_ref = ray.put((prompts, metadata, group_ids))
        calls = {h.label: (h, h.submit(images_ref, batch_ref, group_ids)) for h in self.hosts}
        n = len(prompts)
        return lambda: {label: h.collect(c, n) for label, (h, c) in calls.items()}

    def close(self) -> None:
        if ray.is_initialized():
            for h in self.hosts:
                for r in h.replicas:
                    r.kill()
        self.hosts = []
        self.cluster.stop()
