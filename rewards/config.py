"""Config sections of the reward layer: one reward entry and the reward host (composed by the job config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass
class RewardEntry:
    # Registered reward name (see `tandem rewards`); give either name or fn.
    name: Optional[str] = None
    # Import path "package.module:attr" of a reward function or class.
    fn: Optional[str] = None
    # Weight in the combined reward.
    weight: float = 1.0
    # Keyword arguments for the reward (class constructor / factory).
    args: Dict[str, Any] = field(default_factory=dict)
    # Calling convention of the reward: "tandem" (images, prompts, metadata) or "trl" (TRL GRPOTrainer's
    # fn(prompts, completions, **kwargs): completions = PIL images, kwargs = metadata columns).
    style: str = "tandem"
    # CPUs per reward actor (fractional is fine).
    num_cpus: float = 0.25
    # GPUs per reward actor (fractional is fine).
    num_gpus: float = 0.0
    # Number of actor replicas; batches are split across them.
    replicas: int = 1
    # Images per call into the reward; 0 = the whole batch at once.
    batch_size: int = 0
    # Seconds before a scoring call is retried (then fails naming the reward).
    timeout_s: float = 300.0
    # Ray restarts of a crashed actor.
    max_restarts: int = 2


@dataclass
class RewardHostConfig:
    # "ray" (reward actors on a Ray cluster) or "local" (in-process, for debugging and GPU benchmarks).
    backend: str = "ray"
    # Ray address to join; null = $RAY_ADDRESS if set, else start an embedded local cluster.
    address: Optional[str] = None
    # CPUs given to the embedded local cluster; null = all.
    num_cpus: Optional[float] = None
    # Seconds a reward actor may take to start and build its reward (model loading included) before the job
    # stops with one line naming it (e.g. its num_gpus cannot be placed on the cluster).
    start_timeout_s: float = 600.0
    # Score each sub-batch of a rollout while the next sub-batch rolls out (sub-batches are minibatches of
    # whole groups, so what is trained stays on-policy); false = score after the whole rollout.
    async_scoring: bool = True
    # Stop the job when a reward raises, or returns a non-number (+-inf, a string), on more than this share of
    # a rollout's samples (scored NaN) ...
    max_failed_frac: float = 0.5
    # ... in this many consecutive rollouts; a reward that scores none of a rollout's samples (all None/NaN)
    # counts too. A None or NaN score among others is "no score", returned on purpose, never a failure.
    max_failed_rollouts: int = 3
