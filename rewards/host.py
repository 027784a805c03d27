"""Reward entries hosted as Ray actors: one actor class for every reward, and the Ray backend of RewardClient.

This is the only module that calls ``ray.get``. Per batch the images are ``ray.put`` once and every actor of
every reward reads that same object (zero-copy, read-only).

Per entry: ``replicas`` actors (the batch is split into near-equal shards, whole groups for a groupwise
reward), each reserving fractional ``num_cpus`` / ``num_gpus``; inside an actor the shard is scored in chunks
of ``batch_size`` (``rewards/scoring.py``).

Faults:
* an actor process that dies is restarted by Ray (``max_restarts``) and its calls re-run
  (``max_task_retries`` = ``max_restarts``), so the caller still gets every score;
* a call that runs past ``timeout_s`` (counted from when it can start: the previous call on that actor has
  finished) is retried once on a fresh actor, then raises RewardError naming the reward and ``timeout_s``;
* a reward that raises on a batch is rescored per sample inside the actor (``score_shard``).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, List, Optional, Sequence, Tuple

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

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
    already initialised in this process is reused as it is.
    """

    def __init__(self, host: RewardHostConfig):
        self.host = host
        self.connected = False
        self.temp_dir: Optional[str] = None
        self._restore: Optional[tuple] = None

    def start(self) -> None:
        if ray.is_initialized():
            return
        address = self.host.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            os.environ["RAY_AUTH_MODE"] = "disabled"  # else Ray 2.60 writes a token under ~/.ray
            self._loopback_only()
            self.temp_dir = f"/tmp/tandem-ray-{os.getpid()}"
            num_cpus = None if self.host.num_cpus is None else max(1, math.ceil(self.host.num_cpus))
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",  # kept as given: clustering is off (above)
                _temp_dir=self.temp_dir,
                log_to_driver=False,
            )
        self.connected = True

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
        if self._restore is not None:
            from ray._private import ray_constants

            env, ray_constants.ENABLE_RAY_CLUSTER = self._restore
            if env is None:
                os.environ.pop(CLUSTERING_ENV, None)
            else:
                os.environ[CLUSTERING_ENV] = env
            self._restore = None


# ---------------------------------------------------------------------------------------------------- replicas
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

    def __init__(self, entry: RewardEntry, label: str, code: List[Tuple[Optional[str], str]]):
        self.entry, self.label, self.code = entry, label, code
        self.pending: Deque[_Call] = deque()
        self.broken: Optional[RewardError] = None
        self.actor = self._spawn()

    def _spawn(self):
        return RewardActor.options(
            num_cpus=self.entry.num_cpus,
            num_gpus=self.entry.num_gpus,
            max_restarts=self.entry.max_restarts,
            max_task_retries=self.entry.max_restarts,
        ).remote(self.entry, self.label, self.code)

    def ready(self) -> bool:
        """Wait until the reward is built; RewardConfigError if it cannot be; returns groupwise."""
        error, groupwise = _get(self.actor.describe.remote(), self.label, self.entry)
        if error:
            raise RewardConfigError(error)
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
            if attempt == 1:
                logger.warning(f"reward '{self.label}' exceeded timeout_s={self.entry.timeout_s}s; retrying once on a fresh actor")
                self._respawn()
        ray.kill(self.actor, no_restart=True)
        self.broken = RewardError(
            f"reward '{self.label}' did not finish within timeout_s={self.entry.timeout_s}s, twice; "
            "raise rewards[].timeout_s or lower rewards[].batch_size"
        )
        raise self.broken

    def _respawn(self) -> None:
        """Replace a hung actor by a fresh one and re-submit every call that was in flight on it."""
        ray.kill(self.actor, no_restart=True)
        self.actor = self._spawn()
        self.ready()
        for call in self.pending:
            call.ref = self.actor.score.remote(*call.args)
        self.pending[0].deadline = time.monotonic() + self.entry.timeout_s

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


class _EntryHost:
    """The replicas of one reward entry."""

    def __init__(self, entry: RewardEntry, label: str):
        self.entry, self.label = entry, label
        code = code_locations(entry, label)
        self.replicas = [_Replica(entry, label, code) for _ in range(entry.replicas)]
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
        self.entries, self.labels = list(entries), list(labels)
        self.cluster = Cluster(host)
        self.hosts: List[_EntryHost] = []

    def start(self) -> None:
        self.cluster.start()
        self.hosts = [_EntryHost(e, label) for e, label in zip(self.entries, self.labels)]
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
