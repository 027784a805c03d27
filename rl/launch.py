"""Multi-node launcher: trainer workers placed by Ray Train next to the reward actors.

``distributed.launcher: ray_train`` runs the same job on ``distributed.num_workers`` Ray Train workers
(``TorchTrainer``; gloo on CPU, NCCL on GPU). Ray Train sets up torch.distributed in each worker; accelerate
picks it up, and the data-parallel GRPO of ``rl.distributed`` does the rest: each worker rolls out its share
of every group, all-gathers the rewards, averages gradients. Each worker's reward client uses the same Ray
cluster — the embedded one this launcher starts, or the one ``reward_host.address`` / ``$RAY_ADDRESS`` names.
"""

from __future__ import annotations

import copy
from pathlib import Path

from tandem.rl.config import ConfigError, JobConfig


def _worker(loop_config: dict) -> None:
    from tandem.rl.runtime import configure_environment, configure_logging, configure_torch
    from tandem.rl.session import train, train_joint

    cfg, stage = loop_config["cfg"], loop_config["stage"]
    configure_environment()
    configure_logging()
    configure_torch(cfg)
    train_joint(cfg) if stage == "joint" else train(cfg, stage)


def _absolute_paths(cfg: JobConfig) -> JobConfig:
    for section, key in (("", "output_dir"), ("model", "path"), ("data", "prompts"), ("data", "eval_prompts"),
                         ("decoder", "buffer_dir")):
        owner = getattr(cfg, section) if section else cfg
        value = getattr(owner, key)
        if value is not None:
            setattr(owner, key, str(Path(value).resolve()))
    return cfg


def launch_ray_train(cfg: JobConfig, stage: str) -> Path:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tandem.rewards.host import Cluster

    d = cfg.distributed
    worker_cfg = _absolute_paths(copy.deepcopy(cfg))  # Ray Train workers run in folders of their own
    worker_cfg.distributed.launcher = "none"  # inside a worker the job runs as one data-parallel process
    resources = {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.gpus_per_worker else {})}
    cluster = Cluster(cfg.reward_host)
    cluster.start()
    try:
        trainer = TorchTrainer(
            _worker, train_loop_config={"cfg": worker_cfg, "stage": stage},
            scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.gpus_per_worker > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(storage_path=str(Path(cfg.output_dir).resolve() / "ray_train"), name="workers"),
        )
        result = trainer.fit()
    finally:
        cluster.stop()
    if result.error is not None:
        error = result.error
        if isinstance(getattr(error, "cause", None), ConfigError):
            raise error.cause
        raise error
    return Path(cfg.output_dir)
