"""The one driver-side object the trainer talks to: ``RewardClient``.

    with RewardClient(cfg.rewards, cfg.reward_host) as client:
        future = client.score(images, prompts, metadata, group_ids)   # returns at once
        ...                                                            # roll out the next batch meanwhile
        scores = future.result()                                       # RewardScores

Backends (``reward_host.backend``): ``ray`` hosts every reward entry in Ray actors (``rewards/host.py``);
``local`` runs the same rewards in this process (on a background thread with ``async_scoring``; debugging,
GPU boxes without Ray). Both give the same RewardScores for the same rewards.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from tandem.rewards.base import RewardConfigError, build_reward, check_entries, unique_labels
from tandem.rewards.scoring import FailureGuard, ShardScores, log_warnings, score_shard
from tandem.rewards.config import RewardEntry, RewardHostConfig

Collect = Callable[[], Dict[str, ShardScores]]


@dataclass
class RewardScores:
    """Scores of one batch.

    scores:  {reward name: float64 (B,)}, NaN = no score for that sample;
    weights: {reward name: weight from the config entry};
    failed:  {reward name: bool (B,)}, True where the reward raised or returned a non-number (scored NaN);
    errors:  {reward name: first error "Type: message" of the batch, or None};
    info:    {reward name: B dicts of readable details (e.g. OCR's read text), {} where none}.
    Names are the entries' ``name`` (or the attribute name of ``fn``), de-duplicated as ocr, ocr_2, ...
    """

    scores: Dict[str, np.ndarray]
    weights: Dict[str, float]
    failed: Dict[str, np.ndarray] = field(default_factory=dict)
    errors: Dict[str, Optional[str]] = field(default_factory=dict)
    info: Dict[str, List[dict]] = field(default_factory=dict)

    @staticmethod
    def concat(parts: Sequence["RewardScores"]) -> "RewardScores":
        """The scores of consecutive sub-batches as one batch."""
        def cat(attr):
            return {n: np.concatenate([getattr(p, attr)[n] for p in parts]) for n in getattr(parts[0], attr)}

        return RewardScores(cat("scores"), dict(parts[0].weights), cat("failed"),
                            {n: next((p.errors[n] for p in parts if p.errors.get(n)), None) for n in parts[0].errors},
                            {n: [d for p in parts for d in p.info[n]] for n in parts[0].info})

    def __getitem__(self, name: str) -> np.ndarray:
        return self.scores[name]

    @property
    def names(self) -> List[str]:
        return list(self.scores)


class ScoreFuture:
    """Handle on a batch being scored; ``result()`` blocks until every reward is done (then caches)."""

    def __init__(self, collect: Collect, weights: Dict[str, float]):
        self._collect, self._weights = collect, weights
        self._result: Optional[RewardScores] = None

    def result(self) -> RewardScores:
        if self._result is None:
            shards = self._collect()
            self._result = RewardScores({n: s.scores for n, s in shards.items()}, dict(self._weights),
                                        {n: s.failed for n, s in shards.items()}, {n: s.error for n, s in shards.items()},
                                        {n: s.info for n, s in shards.items()})
            self._collect = None  # lets the batch's objects in the Ray object store go
        return self._result


class LocalBackend:
    """Every reward built and called in this process. With ``reward_host.async_scoring`` a batch is scored on
    one background thread (so a GPU rollout and CPU-bound rewards that release the GIL — ONNX OCR, torch — run
    side by side); without it, at once inside ``submit`` (plain tracebacks for debugging)."""

    def __init__(self, entries: Sequence[RewardEntry], labels: Sequence[str], host: RewardHostConfig):
        self.entries, self.labels = list(entries), list(labels)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-reward") if host.async_scoring else None

    def start(self) -> None:
        self.rewards = [build_reward(e, label) for e, label in zip(self.entries, self.labels)]

    def wait_ready(self) -> None:
        """Built in ``start`` already."""

    def _score(self, images, prompts, metadata, group_ids) -> Dict[str, ShardScores]:
        everything = np.arange(len(prompts))
        out = {}
        for reward, entry in zip(self.rewards, self.entries):
            out[reward.name] = score_shard(reward, images, prompts, metadata, group_ids, everything, entry.batch_size)
            log_warnings(out[reward.name])
        return out

    def submit(self, images, prompts, metadata, group_ids) -> Collect:
        if self.pool is None:
            out = self._score(images, prompts, metadata, group_ids)
            return lambda: out
        return self.pool.submit(self._score, images, prompts, metadata, group_ids).result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.rewards = []


def _ray_backend(entries, labels, host):
    from tandem.rewards.host import RayBackend  # imports ray: only when asked for

    return RayBackend(entries, labels, host)


BACKENDS: Dict[str, Callable] = {"local": LocalBackend, "ray": _ray_backend}


def _check_batch(images, prompts, metadata, group_ids):
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3):
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
        raise ValueError(f"images must be a numpy uint8 array of shape (B, H, W, 3), RGB; got {got}")
    n = len(images)
    metadata = [{} for _ in range(n)] if metadata is None else list(metadata)
    group_ids = np.arange(n) if group_ids is None else np.asarray(group_ids).astype(np.int64)
    for what, value in (("prompts", prompts), ("metadata", metadata), ("group_ids", group_ids)):
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries for a batch of {n} images")
    return list(prompts), metadata, group_ids


class RewardClient:
    """Hosts the configured rewards and scores batches with them.

    Use as a context manager (or ``start()`` / ``close()``). An unknown reward name or a bad import path
    raises ``rewards.base.RewardConfigError`` at once (nothing is started); a reward that cannot be built
    raises it from ``start()``, before any batch is scored.

    Start-up in two halves: ``start(wait=False)`` starts the rewards and returns while the Ray backend's actors
    build them in their own processes (the job loads its pipeline meanwhile); ``wait_ready()`` (or the first
    ``score``) waits until every reward is built and raises the error of one that cannot be. Whatever fails,
    what was started is closed (no actor is left behind).
    """

    def __init__(self, entries: Sequence[RewardEntry], host: Optional[RewardHostConfig] = None):
        host = host or RewardHostConfig()
        if host.backend not in BACKENDS:
            raise RewardConfigError(f"config key 'reward_host.backend' is {host.backend!r}; allowed: {', '.join(BACKENDS)}")
        check_entries(entries)
        self.entries = list(entries)
        self.names = unique_labels(self.entries)
        self.weights = {name: float(e.weight) for name, e in zip(self.names, self.entries)}
        self._backend = BACKENDS[host.backend](self.entries, self.names, host)
        self._guard = FailureGuard(host.max_failed_frac, host.max_failed_rollouts)
        self._started = self._ready = False

    def start(self, wait: bool = True) -> "RewardClient":
        """Start the rewards (the Ray backend: join or start the cluster, spawn each entry's actors); with ``wait``,
        also wait until every reward is built (``wait_ready``)."""
        if not self._started:
            self._closing_on_error(self._backend.start)
            self._started = True
        return self.wait_ready() if wait else self

    def wait_ready(self) -> "RewardClient":
        """Wait until every reward is built; RewardConfigError (or RewardError: its actor died) naming one that
        cannot be, after closing the client."""
        if not self._started:
            raise RuntimeError("RewardClient.wait_ready() before start(): use `with RewardClient(...) as client:`")
        if not self._ready:
            self._closing_on_error(self._backend.wait_ready)
            self._ready = True
        return self

    def _closing_on_error(self, step: Callable[[], None]) -> None:
        try:
            step()
        except BaseException:
            self._backend.close()
            self._started = False
            raise

    def close(self) -> None:
        if self._started:
            self._backend.close()
            self._started = self._ready = False

    def __enter__(self) -> "RewardClient":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def score(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Optional[Sequence[dict]] = None,
        group_ids: Optional[Sequence[int]] = None,
    ) -> ScoreFuture:
        """Start scoring a batch; returns at once (ray backend), once the rewards are built (``wait_ready``).

        images: uint8 (B, H, W, 3) RGB; prompts: B strings; metadata: B dicts (default: empty);
        group_ids: (B,) ints naming each sample's prompt group (default: every sample its own group).
        """
        if not self._started:
            raise RuntimeError("RewardClient.score() before start(): use `with RewardClient(...) as client:`")
        self.wait_ready()
        prompts, metadata, group_ids = _check_batch(images, prompts, metadata, group_ids)
        return ScoreFuture(self._backend.submit(images, prompts, metadata, group_ids), self.weights)

    def check_failures(self, rollout: RewardScores) -> None:
        """Count one rollout's failures; RewardError naming the reward once one has raised on more than
        ``reward_host.max_failed_frac`` of the samples in ``reward_host.max_failed_rollouts`` rollouts in a row.
        With several processes, pass the whole rollout's failures (``rl.distributed.Layout.gather_rollout``):
        every process then counts the same samples and stops at the same rollout."""
        self._guard.observe(rollout.failed, rollout.errors, rollout.scores)
