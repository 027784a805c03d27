"""Typed job configuration: dataclasses, loaded from YAML with dotted ``key.sub=value`` overrides.

Parsing and type checking are OmegaConf structured configs; this module only declares the schema and the
cross-field rules (checked once, when the config is built — never deep inside a run).

Every field has a type, a default and a one-line doc. The YAML files in ``configs/`` are worked examples.
GRPO knob names follow TRL's ``GRPOConfig`` (``num_generations``, ``epsilon``, ``epsilon_high``, ``beta``,
``loss_type``, ``scale_rewards``, ``multi_objective_aggregation``, ``num_iterations``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tandem.core.errors import ConfigError, require as _rule
from tandem.policies.base import trained_stages
from tandem.policies.families import DEFAULT_FAMILY, family_names, get_family
from tandem.policies.flow import WINDOW_ENDS
from tandem.policies.lora import LoraSettings
from tandem.policies.ode_solvers import ODE_SOLVERS
from tandem.policies.token_samplers import DEFAULT_TOKEN_SAMPLER
from tandem.policies.sde import CPS_LOG_PROBS, KL_FORMS, SDE_KINDS
from tandem.rewards.config import RewardEntry, RewardHostConfig
from tandem.rl.advantages import AGGREGATIONS, SCALES
from tandem.rl.losses import LOSS_TYPES
from tandem.rl.objectives import OBJECTIVES
from tandem.rl.paths import absolute_paths, resolve_config_paths


# --------------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    # Generator family (`tandem.policies.families`: the built-in families and plug-ins): how the pipeline is
    # loaded, which stages it trains and which of them edit images; it validates its own settings.
    family: str = DEFAULT_FAMILY
    # Folder of the family's pipeline as written by its `save_pretrained` (the family's module lists its layout).
    path: str = MISSING
    # Build tiny random-init models of the real classes into `path` when it is empty (demo and tests only).
    create_tiny_if_missing: bool = False
    # Weights dtype for the frozen parts and the rollout: float32 | bfloat16 | float16.
    dtype: str = "float32"
    # Device: "auto" (cuda if available, else cpu), "cpu" or "cuda[:N]".
    device: str = "auto"
    # Folder where torch.compile keeps its caches across launches (inductor + Triton), so a second launch of a
    # compiled job starts warm; null = torch's defaults under /tmp (tandem.policies.compile_cache).
    compile_cache_dir: Optional[str] = "~/.cache/tandem/torch_compile"


@dataclass
class DataConfig:
    # Training prompts: .txt (one prompt per line) or .jsonl ({"prompt": ..., "text": ..., "reference": path}).
    prompts: Optional[str] = None
    # Held-out prompts for evaluation (same formats); null = no eval.
    eval_prompts: Optional[str] = None
    # Image height in pixels (multiple of 32).
    height: int = 64
    # Image width in pixels (multiple of 32).
    width: int = 64
    # Shuffle prompts every epoch (seeded).
    shuffle: bool = True
    # Folders besides the prompt file's own (and a buffer's run folder) that a prompt's `reference` image or a
    # buffer shard's `reference_path` may be read from; anything else is refused (no reading arbitrary files).
    allowed_roots: List[str] = field(default_factory=list)


@dataclass
class ARConfig:
    # Sampling temperature of the AR token sampler (release: 0.9).
    temperature: float = 0.9
    # Nucleus top-p of the sampler (release: 0.75); 1.0 disables it.
    top_p: float = 0.75
    # Top-k of the sampler; 0 disables it (transformers' global default of 50 is never used). The release's
    # top_k 16512 is the whole image lm_head: the same as 0.
    top_k: int = 0
    # Suppress every non-codebook id of the image lm_head (start/end markers, the ids past the VQ codebook) in the
    # sampler. Off = the release's sampler: only the end marker is masked (the grid has a fixed length, as
    # min_new_tokens masks it in transformers); on = what a random stand-in model needs (it puts mass on the markers).
    suppress_non_codebook: bool = False
    # Loss weight of the preview-grid tokens (the ~16x16 grid generated first).
    preview_loss_weight: float = 1.0
    # Loss weight of the full-grid tokens (the ones the decoder paints).
    full_loss_weight: float = 1.0
    # Rollout decode loop: a registered token sampler (`tandem.policies.token_samplers` lists them, what each does
    # and what each refuses); the same tokens and stored log-probs whichever runs.
    sampler: str = DEFAULT_TOKEN_SAMPLER
    # Run the token sampler's decode step through torch.compile where it has one (the first rollout compiles it).
    compile: bool = False
    # Decoder denoising steps used to turn AR tokens into images for the rewards (ODE, seeded per group).
    decode_steps: int = 8
    # CFG scale of that frozen decoder (release: 1.5; 1.0 turns CFG off).
    decode_guidance_scale: float = 1.5
    # Image editing: each record's `reference` image is the source to edit. The AR model reads it as image tokens
    # before the instruction (as the family's own pipeline does with a source image) and writes the target's full
    # grid only; training feeds the same source images; the frozen decoder renders with the source's latents and
    # prior tokens (as decoder.edit does). For families that edit (`ModelFamily.edits`) and token samplers that
    # take source images; decoder.edit must match in `train joint`.
    edit: bool = False


@dataclass
class DecoderConfig:
    # Denoising steps per rollout during training (denoising reduction: fewer than eval_num_steps).
    num_steps: int = 10
    # Denoising steps for eval and sample grids.
    eval_num_steps: int = 28
    # CFG scale (release 1.5); 1.0 turns CFG off (one branch, no prior-token drop).
    guidance_scale: float = 1.5
    # SDE noise level `a` of the Flow-SDE step (flow_grpo default 0.7).
    noise_level: float = 0.7
    # Stochastic step kind: "sde" (flow_grpo Flow-SDE) or "cps" (coefficients-preserving sampling; noise_level <= 1).
    sde_type: str = "sde"
    # Log-prob of a "cps" step: "exact" (the Gaussian log-density, mean over dims) or "flow_grpo" (upstream's
    # -(x' - mean)^2, mean over dims: no 1/(2 std^2), no normaliser). The exact log-ratio is flow_grpo's times
    # 1/(2 std^2) (6e3-3e4 at the last steps), so flow_grpo's clip range (grpo.epsilon) transfers only with
    # "flow_grpo". Ignored for sde_type "sde" (both use the exact density there, as flow_grpo does).
    cps_log_prob: str = "exact"
    # Form of the KL penalty (grpo.beta): "exact" = KL(N(mu, std^2) || N(mu_ref, std^2)) =
    # ||mu - mu_ref||^2 / (2 std^2) with std = s*sqrt(-dt) the step's std; "flow_grpo" = its kl_loss, which
    # divides by 2 s^2 (the SDE's s, not the step std): exact = flow_grpo / |dt|, i.e. 4-21x stronger at 10
    # steps. Use "flow_grpo" to reuse a flow_grpo beta. For sde_type "cps" (std = s) the two agree.
    kl_form: str = "exact"
    # Number of consecutive SDE steps inside the window (0 = use timestep_fraction instead).
    sde_window_size: int = 2
    # [lo, hi) step indices inside which the SDE window is placed (randomly per rollout batch, or sliding).
    sde_window_range: List[int] = field(default_factory=lambda: [0, 5])
    # Where the window sits: "random" (anywhere in the range, per rollout batch) or "sliding" (MixGRPO: starts at lo
    # and moves sde_window_stride steps every sde_window_shift_interval rollout batches of the decoder stage).
    sde_window_schedule: str = "random"
    # With sde_window_schedule "sliding": steps the window moves each time (MixGRPO stride s).
    sde_window_stride: int = 1
    # With sde_window_schedule "sliding": rollout batches of the decoder stage between two moves (MixGRPO's shift
    # interval tau, iters_per_group: one training iteration = one rollout), whatever the optimizer steps per rollout;
    # a joint job counts its decoder rollouts only.
    sde_window_shift_interval: int = 10
    # With sde_window_schedule "sliding", once the window reaches hi: "roll_back" (MixGRPO --roll_back, as in both of
    # its released scripts: windows shrink near hi, then it starts again at lo), "shrink" (MixGRPO without it: the
    # window stops at the last start below hi, shrunk) or "stay" (keeps its size, stops at hi - size).
    sde_window_end: str = "roll_back"
    # Solver of the ODE steps outside the SDE window: "euler" or "dpm2m" (DPM-Solver++(2M), MixGRPO-Flash).
    ode_solver: str = "euler"
    # With sde_window_size 0: fraction of the (non-final) steps that are SDE steps and trained.
    timestep_fraction: float = 1.0
    # All copies of one prompt start from the same initial noise.
    same_noise_in_group: bool = False
    # Where the prior tokens come from: "ar" (a frozen AR rollout), "reference" (VQ tokens of
    # metadata["reference"], via the AR model's get_image_tokens) or "buffer" (the token grids an AR run
    # saved in its rollout buffer; see decoder.buffer_dir).
    condition_source: str = "ar"
    # With condition_source "buffer": an AR run directory (or its buffer/ folder); its records replace
    # data.prompts.
    buffer_dir: Optional[str] = None
    # Image editing: each record's `reference` image is the source to edit; the decoder attends to its latents and
    # prior tokens through the transformer's KV cache, as the family's own pipeline does with a source image
    # (two-call CFG only); for families that edit (`ModelFamily.edits`).
    edit: bool = False
    # EMA decay of trained weights used for eval/sample grids, in [0, 1); 0 disables EMA.
    ema_decay: float = 0.0
    # EMA warm-up of flow_grpo (its EMAModuleWrapper): decay_t = min((1 + t) / (10 + t), ema_decay) at the t-th
    # optimizer step (from 0), so early weights fade fast; false = ema_decay from the first step.
    ema_warmup: bool = False
    # Update the EMA every N optimizer steps (flow_grpo's update_step_interval, 8 in train_sd3.py); 1 = every step.
    ema_update_interval: int = 1
    # CFG as one transformer call of 2B instead of two calls of B; the shorter glyph sequence is left
    # zero-padded to the longer (the pipeline's own within-batch padding), so images differ slightly from the
    # release's two-call CFG. Rollout, training and sample grids use the same layout.
    cfg_batch: bool = False
    # torch.compile the transformer's repeated blocks (diffusers regional compilation) for rollout and training;
    # the first rollout and the first training step compile (forward, and forward+backward). In an AR job it
    # compiles the frozen decoder that renders the tokens for the rewards.
    compile: bool = False


@dataclass
class GRPOConfig:
    # Group size: samples per prompt (TRL `num_generations`).
    num_generations: int = 4
    # Prompts per rollout batch; rollout batch = prompts_per_step * num_generations.
    prompts_per_step: int = 2
    # Inner epochs over each rollout batch (TRL `num_iterations`; 1 = strictly on-policy).
    num_iterations: int = 1
    # Samples per minibatch in the update (one optimizer step per minibatch).
    mini_batch_size: int = 8
    # Samples per rollout call, whole groups and whole minibatches (a multiple of num_generations and of
    # mini_batch_size); 0 = auto: measured on a GPU (the largest call that fits the free memory, from the peak of a
    # first one-group call), one minibatch on a CPU. What is sampled does not depend on it (tandem.rl.rollout_batch).
    rollout_batch_size: int = 0
    # Lower clip range; null = stage default (ar: 0.2 like TRL, decoder: 1e-4 like flow_grpo).
    epsilon: Optional[float] = None
    # Upper clip range (DAPO clip-higher); null = same as epsilon.
    epsilon_high: Optional[float] = None
    # KL coefficient (TRL `beta`); ar: k3 estimator, decoder: the step KL in decoder.kl_form (exact or flow_grpo's).
    beta: float = 0.0
    # What the update minimises (`tandem.rl.objectives`): clipped_surrogate (GRPO / Flow-GRPO) or a registered one.
    objective: str = "clipped_surrogate"
    # grpo | bnpo | dr_grpo | dapo (TRL semantics of how token losses are averaged).
    loss_type: str = "grpo"
    # Importance ratio per "token" (GRPO) or one per "sequence", exp(mean_u(logp - old_logp)) (GSPO, Zheng et al.
    # 2025; TRL `importance_sampling_level`); "sequence" needs the ar stage (decoder steps train one per pass).
    importance_sampling_level: str = "token"
    # objective diffusion_nft: guidance strength beta of the implicit policies v+ = (1-b) v_old + b v,
    # v- = (1+b) v_old - b v (DiffusionNFT, Zheng et al. 2025; its configs use 0.1 to 1).
    nft_beta: float = 1.0
    # objective diffusion_nft: forward-process timesteps trained per sample (drawn from the rollout schedule).
    nft_num_timesteps: int = 2
    # objective diffusion_nft: the reference's adaptive loss weight (NVlabs DiffusionNFT): the error of the implied
    # clean sample x0 = x_t - sigma v, divided by its detached mean |.|, i.e. sigma*|v* - v|^2 / mean|v* - v| per
    # sample; false = plain velocity-space |v* - v|^2 (weight 1, default).
    nft_adaptive_weight: bool = False
    # objective diffusion_nft: multiply the policy term (not the KL term) by Z = adv_clip_max, as the reference does;
    # false (default) = unscaled, so the reference's KL coefficient train.beta is grpo.beta = train.beta / Z.
    nft_scale_policy_loss: bool = False
    # objective diffusion_nft: the old policy, which samples the rollouts and gives v_old: 0 (default) = the current
    # weights at each rollout; 1 | 2 = the reference's decay_type 1 | 2 (its released configs), a copy of the
    # trained weights blended before each rollout, old <- d old + (1 - d) theta, d = min(0.001 s, 0.5) (1) or 0 for
    # s < 75 then min(0.0075 (s - 75), 0.999) (2), s = the decoder's optimizer steps so far. Checkpointed.
    nft_old_decay_type: int = 0
    # objective diffusion_nft: draw new timesteps and noise for each of the num_iterations update epochs, as the
    # reference does; false (default) = one draw per rollout, the same in every epoch.
    nft_fresh_noise: bool = False
    # group | batch | none: the std that advantages are divided by (TRL `scale_rewards`). Like TRL 1.16 it applies
    # to sum_then_normalize only: normalize_then_sum always divides each reward by its group std.
    scale_rewards: str = "group"
    # sum_then_normalize | normalize_then_sum (TRL `multi_objective_aggregation`; normalize_then_sum: each reward
    # group-standardised, weighted sum, then standardised over the batch).
    multi_objective_aggregation: str = "sum_then_normalize"
    # Clip advantages to +-adv_clip_max; null = stage default (ar: none, decoder: 5 like flow_grpo).
    adv_clip_max: Optional[float] = None
    # Per-prompt stat tracking across rollouts (flow_grpo / DDPO `per_prompt_stat_tracking`): each sample's
    # combined reward is normalised by the mean and std of the last stat_tracking_buffer_size rewards seen for
    # its prompt (this rollout's included), (R - mean) / (std + 1e-4); replaces scale_rewards and
    # multi_objective_aggregation (rewards are summed first). Kept in checkpoints.
    per_prompt_stat_tracking: bool = False
    # Rewards kept per prompt (DDPO `buffer_size`); 0 = unbounded. flow_grpo clears its tracker after every
    # rollout, i.e. only this rollout's rewards of the prompt count: set per_prompt_stat_tracking false for that
    # (group normalisation is the same statistic when each prompt is one group).
    stat_tracking_buffer_size: int = 16
    # A prompt with fewer rewards seen than this is normalised with the batch's mean and std (DDPO `min_count`).
    stat_tracking_min_count: int = 16
    # The ratio's denominator: "sampler" (the log-probs stored at rollout), "recompute" (a no-grad forward of
    # the training layout before the first update, so step 1's ratio is exactly 1 even where rollout and
    # training numerics differ; the sampler's log-probs stay as the behaviour policy) or "auto" (recompute where
    # the policy says its rollout's numerics differ from training's: the AR stage outside float32 or with a
    # token sampler that says so, decoder.compile / ar.compile; and where rollout calls exceed a minibatch).
    old_log_probs: str = "auto"
    # Truncated importance sampling of the rollout/training mismatch (verl's rollout correction): each unit's
    # loss is weighted by min(exp(old - sampler), cap), detached; needs recomputed old log-probs. null = off.
    rollout_is_cap: Optional[float] = None


@dataclass
class OptimConfig:
    # AdamW learning rate (> 0; the peak of the schedule).
    learning_rate: float = 1e-4
    # AdamW weight decay.
    weight_decay: float = 0.0
    # AdamW beta1 (transformers `adam_beta1`).
    adam_beta1: float = 0.9
    # AdamW beta2 (transformers `adam_beta2`).
    adam_beta2: float = 0.999
    # AdamW epsilon (transformers `adam_epsilon`).
    adam_epsilon: float = 1e-8
    # Learning-rate schedule, a `transformers.get_scheduler` name: constant | constant_with_warmup | linear |
    # cosine | cosine_with_restarts | polynomial | ...; its length is the stage's optimizer steps in max_steps.
    lr_scheduler: str = "constant"
    # Optimizer steps of linear warm-up from 0 to learning_rate (not with lr_scheduler "constant").
    warmup_steps: int = 0
    # Minibatches whose gradients are summed into one optimizer step (transformers/TRL
    # `gradient_accumulation_steps`): each minibatch is one forward/backward of grpo.mini_batch_size samples and its
    # loss is divided by this, so one step trains on mini_batch_size * gradient_accumulation_steps samples exactly
    # as one minibatch of that size would; max_steps and the step metrics count optimizer steps.
    gradient_accumulation_steps: int = 1
    # Gradient-norm clip; 0 = no clipping (the norm is still logged as grad_norm), like transformers' Trainer.
    max_grad_norm: float = 1.0
    # accelerate mixed precision: "no" | "bf16" | "fp16" (fp16: dynamic loss scaling, gradients unscaled before
    # the clip, steps with inf/NaN gradients skipped).
    mixed_precision: str = "no"
    # Gradient checkpointing in the trained model.
    gradient_checkpointing: bool = False
    # LoRA settings.
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class BufferConfig:
    # Save every AR rollout batch (prompts, metadata, token grids, images, rewards) as a safetensors shard in
    # output_dir/buffer/, for decoder jobs (decoder.condition_source: buffer) and for analysis.
    save: bool = False


@dataclass
class JointConfig:
    # `tandem train joint`: optimizer steps of each AR phase; its rollouts condition the next decoder phase.
    ar_steps_per_phase: int = 10
    # Optimizer steps of each decoder phase.
    decoder_steps_per_phase: int = 10


@dataclass
class EvalConfig:
    # Rewards scored on the held-out prompts (data.eval_prompts); empty = the training rewards.
    rewards: List[RewardEntry] = field(default_factory=list)
    # Held-out prompts per eval (0 = all).
    num_prompts: int = 8
    # Eval reward watched for reward hacking (training reward rising while this one falls); null = the first.
    gold: Optional[str] = None
    # Warn when, between two evals, the training reward rose and the gold reward fell by more than this.
    hacking_tolerance: float = 0.0


@dataclass
class DistributedConfig:
    # "none": this process (or every process of `accelerate launch` / `torchrun`); "ray_train": place
    # num_workers trainer workers with Ray Train's TorchTrainer on the Ray cluster, next to the reward actors.
    launcher: str = "none"
    # Trainer workers for launcher ray_train (num_generations and mini_batch_size must be multiples of it).
    num_workers: int = 1
    # CPUs reserved per trainer worker (fractional is fine).
    cpus_per_worker: float = 1.0
    # GPUs per trainer worker (0 on a CPU cluster).
    gpus_per_worker: float = 0.0
    # Data parallelism of the trained module over the processes: "ddp" (a full copy per process, gradients
    # all-reduced) or "fsdp" (FSDP2: parameters, gradients and optimizer state sharded per repeated block;
    # for models that do not fit once per GPU with their optimizer state). Same updates either way.
    strategy: str = "ddp"


@dataclass
class LoggingConfig:
    # Write an image grid to samples/ before training (step 0), every N steps and at the last step; 0 = never.
    sample_every: int = 10
    # Save a checkpoint every N steps (and at the last step); 0 = only at the end.
    checkpoint_every: int = 0
    # Evaluate on data.eval_prompts every N steps; 0 = never.
    eval_every: int = 0
    # Show a progress bar.
    progress: bool = True
    # Keep only the newest N checkpoints in output_dir/checkpoints (older ones are deleted); null = keep all.
    save_total_limit: Optional[int] = None
    # Experiment trackers through accelerate (`Accelerator(log_with=...)`): tensorboard | wandb | comet_ml |
    # mlflow | aim | clearml | dvclive | trackio; they get the config, every step's metrics and the sample grids,
    # under output_dir (tensorboard: output_dir/tensorboard/<project_name>). Empty = metrics.jsonl only; one
    # name alone is a one-item list. A tracker whose package is not installed is refused when the job starts.
    report_to: List[str] = field(default_factory=list)
    # Project (run) name given to the trackers.
    project_name: str = "tandem"


@dataclass
class JobConfig:
    # Run directory: config.yaml, metrics.jsonl, samples/, checkpoints/, reward_curve.png.
    output_dir: str = MISSING
    # Optimizer steps of the job (both phases together for `train joint`).
    max_steps: int = 10
    # Seed of every random choice (prompts, rollouts, noise).
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ar: ARConfig = field(default_factory=ARConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Reward entries (see RewardEntry); the combined reward is their weighted aggregate.
    rewards: List[RewardEntry] = field(default_factory=list)
    # Python modules imported before rewards are looked up (here and in every reward actor), so that the
    # rewards they @register are found by name; the working directory is on sys.path.
    reward_modules: List[str] = field(default_factory=list)
    reward_host: RewardHostConfig = field(default_factory=RewardHostConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # Resume from a checkpoint: "auto" (the latest in output_dir/checkpoints, or start fresh if none) or a
    # checkpoint folder; null = start fresh (an existing metrics.jsonl is then an error).
    resume: Optional[str] = None


# --------------------------------------------------------------------------------------------------- loading
# `optim.lr_scheduler` values: the `transformers.SchedulerType` names that need no extra arguments.
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt")
# `logging.report_to` values: the trackers accelerate integrates (`accelerate.utils.LoggerType`, less "all").
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio")
# List keys that also take a single string, as a one-item list (`report_to: wandb`, as in transformers).
ONE_ITEM_LISTS = ("logging.report_to",)
STAGE_DEFAULTS = {
    "ar": {"epsilon": 0.2, "adv_clip_max": None},
    "decoder": {"epsilon": 1e-4, "adv_clip_max": 5.0},
}


def load_config(path: str, overrides: List[str] = (), stage: str = "decoder") -> JobConfig:
    """Read YAML at ``path``, apply ``key.sub=value`` overrides, check types and rules. Relative input paths in
    the file resolve against its folder, those of overrides against the working directory (``tandem.rl.paths``).

    Raises ConfigError with a one-line message naming the key or file and the fix.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path} (pass --config with the path of a YAML file, e.g. configs/demo/decoder.yaml)")
    schema = OmegaConf.structured(JobConfig)
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as e:  # yaml scanner/parser errors
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    cfg = _merge(schema, _one_item_lists(resolve_config_paths(file_cfg, path)), source=path)
    for item in overrides:
        cfg = _merge(cfg, _one_item_lists(_parse_override(item)), source="command line", key=item.split("=", 1)[0])
    job: JobConfig = OmegaConf.to_object(absolute_paths(_check_missing(cfg, path)))
    apply_stage_defaults(job, stage)
    validate(job, stage)
    return job


def _parse_override(item: str) -> DictConfig:
    """``key.sub=value`` -> a config holding it; the value is YAML (ConfigError naming the override if not)."""
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or (str(e).splitlines() or [""])[0]
        raise ConfigError(f"override '{item}': its value is not valid YAML ({problem}); close its brackets and quotes, "
                          "and quote it for the shell, e.g. 'logging.report_to=[tensorboard]'") from None


def _one_item_lists(cfg: DictConfig) -> DictConfig:
    """A string given for a key of ``ONE_ITEM_LISTS`` becomes a one-item list (``report_to: wandb``)."""
    if isinstance(cfg, DictConfig):
        for key in ONE_ITEM_LISTS:
            value = OmegaConf.select(cfg, key, default=None)
            if isinstance(value, str):
                OmegaConf.update(cfg, key, [value], merge=False)
    return cfg


def _merge(base: DictConfig, other: DictConfig, source: str, key: Optional[str] = None) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = key or e.full_key or "?"
        msg = str(e).splitlines()[0]
        if "not in struct" in msg or "Key" in type(e).__name__ and "not" in msg:
            raise ConfigError(f"unknown config key '{key}' ({source}); see the documented keys in rl/config.py or `tandem train ... --dry-run`") from None
        raise ConfigError(f"bad value for config key '{key}' ({source}): {msg}") from None


def _check_missing(cfg: DictConfig, path: str) -> DictConfig:
    required = ["output_dir", "model.path"]
    if cfg.decoder.condition_source != "buffer":
        required.append("data.prompts")
    for key in required:
        if OmegaConf.is_missing(cfg, key) or OmegaConf.select(cfg, key) is None:
            raise ConfigError(f"config key '{key}' is required; set it in {path} or pass {key}=...")
    for i, entry in enumerate(cfg.rewards):
        if entry.name is None and entry.fn is None:
            raise ConfigError(f"rewards[{i}] needs 'name' (a registered reward) or 'fn' (an import path 'pkg.module:attr')")
    return cfg


def apply_stage_defaults(job: JobConfig, stage: str) -> None:
    for key, value in STAGE_DEFAULTS.get(stage, {}).items():
        if getattr(job.grpo, key) is None:
            setattr(job.grpo, key, value)
    if job.grpo.epsilon_high is None:
        job.grpo.epsilon_high = job.grpo.epsilon


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' is {value!r}; allowed: {', '.join(map(str, allowed))}")


def validate(job: JobConfig, stage: str) -> None:
    """Every rule of a job of ``stage`` (ar | decoder | joint | sample), checked once at load time: each section by
    its own function, then the choices owned by other objects — the model family (``ModelFamily.validate``: its
    stages, editing, its own keys) and the objective (its ``validate``)."""
    _validate_run(job)
    _validate_model(job)
    _validate_data(job)
    _validate_ar(job)
    _validate_decoder(job, stage)
    _validate_grpo(job, stage)
    _validate_optim(job)
    _validate_rewards(job, stage)
    _validate_logging(job, stage)
    _validate_distributed(job)
    get_family(job.model.family).validate(job, stage)
    objective = OBJECTIVES.get(job.grpo.objective)
    if trained_stages(stage) and hasattr(objective, "validate"):  # the objective's own keys
        objective.validate(job, stage)


def _validate_run(job: JobConfig) -> None:
    _rule(job.seed >= 0, "seed", f"must be >= 0, got {job.seed}")
    _rule(job.max_steps >= 1, "max_steps", f"must be >= 1, got {job.max_steps}")
    _rule(job.joint.ar_steps_per_phase >= 1 and job.joint.decoder_steps_per_phase >= 1, "joint",
          "ar_steps_per_phase and decoder_steps_per_phase must be >= 1")


def _validate_model(job: JobConfig) -> None:
    _choice("model.dtype", job.model.dtype, ("float32", "bfloat16", "float16"))
    _rule(re.fullmatch(r"auto|cpu|cuda(:\d+)?", job.model.device) is not None, "model.device",
          f"is {job.model.device!r}; allowed: auto, cpu, cuda, cuda:N")
    _choice("model.family", job.model.family, family_names())


def _validate_data(job: JobConfig) -> None:
    for key in ("height", "width"):
        v = getattr(job.data, key)
        _rule(v >= 32 and v % 32 == 0, f"data.{key}", f"must be a positive multiple of 32 (one AR token = 32 px), got {v}")
    for key in ("prompts", "eval_prompts"):
        p = getattr(job.data, key)
        _rule(p is None or os.path.isfile(p), f"data.{key}", f"file not found: {p}")


def _validate_ar(job: JobConfig) -> None:
    """The AR sampler's processing (``ar.sampler`` itself is the model family's: ``ModelFamily.validate``)."""
    _rule(job.ar.temperature > 0, "ar.temperature", f"must be > 0, got {job.ar.temperature}")
    _rule(0 < job.ar.top_p <= 1, "ar.top_p", f"must be in (0, 1] (1 disables it), got {job.ar.top_p}")
    _rule(job.ar.top_k >= 0, "ar.top_k", f"must be >= 0 (0 disables it), got {job.ar.top_k}")


def _validate_decoder(job: JobConfig, stage: str) -> None:
    """The decoder section: its choices always, and the SDE rules where the decoder stage trains."""
    d = job.decoder
    _rule(0 <= d.ema_decay < 1, "decoder.ema_decay", f"must be in [0, 1) (0 disables EMA), got {d.ema_decay}")
    _rule(d.ema_update_interval >= 1, "decoder.ema_update_interval", f"must be >= 1, got {d.ema_update_interval}")
    _rule(d.eval_num_steps >= 1, "decoder.eval_num_steps", f"must be >= 1, got {d.eval_num_steps}")
    _choice("decoder.kl_form", d.kl_form, KL_FORMS.names())
    _choice("decoder.cps_log_prob", d.cps_log_prob, CPS_LOG_PROBS.names())
    _choice("decoder.sde_type", d.sde_type, SDE_KINDS.names())
    _choice("decoder.sde_window_schedule", d.sde_window_schedule, ("random", "sliding"))
    _choice("decoder.sde_window_end", d.sde_window_end, WINDOW_ENDS)
    _choice("decoder.ode_solver", d.ode_solver, ODE_SOLVERS.names())
    _choice("decoder.condition_source", d.condition_source, ("ar", "reference", "buffer"))
    if d.condition_source == "buffer":
        _rule(d.buffer_dir is not None and os.path.isdir(d.buffer_dir), "decoder.buffer_dir",
              f"must name an AR run directory with a saved buffer (buffer.save: true), got {d.buffer_dir}")
    if "decoder" in trained_stages(stage):
        _validate_sde(job)


def _validate_sde(job: JobConfig) -> None:
    """The decoder stage's SDE rollout: enough steps, a noise level that trains, a window that fits."""
    d, objective = job.decoder, job.grpo.objective
    _rule(d.num_steps >= 2, "decoder.num_steps", f"must be >= 2 (the last step is never trained), got {d.num_steps}")
    _rule(d.noise_level > 0 or not OBJECTIVES.get(objective).uses_old_log_probs, "decoder.noise_level",
          f"must be > 0 to train with grpo.objective={objective} (0 is the deterministic ODE: every log-prob "
          f"is 0, no gradient), got {d.noise_level}")
    _rule(d.sde_type != "cps" or d.noise_level <= 1, "decoder.noise_level",
          f"must be <= 1 with decoder.sde_type=cps (s = sigma' sin(a pi / 2)), got {d.noise_level}")
    if d.sde_window_size > 0:
        lo, hi = (list(d.sde_window_range) + [None, None])[:2]
        _rule(len(d.sde_window_range) == 2 and 0 <= lo < hi, "decoder.sde_window_range",
              f"must be [lo, hi) with 0 <= lo < hi, got {list(d.sde_window_range)}")
        _rule(hi - lo >= d.sde_window_size and hi <= d.num_steps - 1, "decoder.sde_window_range",
              f"window of {d.sde_window_size} steps must fit inside {list(d.sde_window_range)} and end before the "
              f"last of decoder.num_steps={d.num_steps} steps (the last step is never trained)")
    else:
        _rule(0 < d.timestep_fraction <= 1, "decoder.timestep_fraction", "must be in (0, 1]")
    _rule(d.sde_window_stride >= 1 and d.sde_window_shift_interval >= 1, "decoder.sde_window_stride",
          "sde_window_stride and sde_window_shift_interval must be >= 1")


def _validate_grpo(job: JobConfig, stage: str) -> None:
    """The GRPO section: its choices always, the batch arithmetic and clip ranges where a stage trains."""
    g = job.grpo
    _rule(g.stat_tracking_buffer_size >= 0, "grpo.stat_tracking_buffer_size", "must be >= 0 (0 = unbounded)")
    _rule(g.stat_tracking_min_count >= 0, "grpo.stat_tracking_min_count", "must be >= 0")
    _choice("grpo.objective", g.objective, OBJECTIVES.names())
    _choice("grpo.loss_type", g.loss_type, LOSS_TYPES.names())
    _choice("grpo.old_log_probs", g.old_log_probs, ("auto", "recompute", "sampler"))
    _rule(g.rollout_is_cap is None or g.rollout_is_cap >= 1.0, "grpo.rollout_is_cap", "must be >= 1 (or null)")
    _rule(g.rollout_is_cap is None or g.old_log_probs != "sampler", "grpo.rollout_is_cap",
          "the correction weighs trainer against sampler log-probs; set grpo.old_log_probs to recompute or auto")
    _choice("grpo.scale_rewards", g.scale_rewards, SCALES.names())
    _choice("grpo.multi_objective_aggregation", g.multi_objective_aggregation, AGGREGATIONS.names())
    _choice("grpo.importance_sampling_level", g.importance_sampling_level, ("token", "sequence"))
    phases = trained_stages(stage)
    if not phases:
        return
    trains = OBJECTIVES.get(g.objective).stages
    for phase in phases:
        _rule(phase in trains, "grpo.objective",
              f"{g.objective!r} does not train the {phase} stage (it trains: {', '.join(trains)})")
    _validate_batches(job)
    if stage != "joint":  # a joint job resolves the clip ranges per phase (phase_config)
        _rule(g.epsilon > 0 and g.epsilon_high > 0, "grpo.epsilon", "clip ranges must be > 0")
    _rule(g.beta >= 0, "grpo.beta", "must be >= 0")
    _rule(g.importance_sampling_level == "token" or stage == "ar", "grpo.importance_sampling_level",
          "'sequence' (GSPO) needs the whole sequence in one pass: use it with `tandem train ar`")
    _rule("decoder" not in phases or g.nft_old_decay_type == 0 or g.objective == "diffusion_nft",
          "grpo.nft_old_decay_type", f"is DiffusionNFT's old policy, not used by grpo.objective={g.objective}: set it to 0")


def _validate_batches(job: JobConfig) -> None:
    """Group, rollout batch, minibatch and accumulation sizes that divide each other."""
    g = job.grpo
    _rule(g.num_generations >= 2, "grpo.num_generations",
          f"group size must be >= 2 for group-relative advantages, got {g.num_generations}")
    _rule(g.prompts_per_step >= 1, "grpo.prompts_per_step", "must be >= 1")
    _rule(g.num_iterations >= 1, "grpo.num_iterations", "must be >= 1")
    batch = g.prompts_per_step * g.num_generations
    _rule(1 <= g.mini_batch_size <= batch and batch % g.mini_batch_size == 0, "grpo.mini_batch_size",
          f"must divide the rollout batch prompts_per_step*num_generations = {batch}, got {g.mini_batch_size}")
    unit = math.lcm(g.num_generations, g.mini_batch_size)
    _rule(g.rollout_batch_size == 0 or (g.rollout_batch_size % unit == 0 and g.rollout_batch_size <= batch),
          "grpo.rollout_batch_size", f"must be 0 (auto) or a multiple of lcm(num_generations, mini_batch_size) = "
          f"{unit} up to the rollout batch {batch}, got {g.rollout_batch_size}")
    per_step = g.mini_batch_size * job.optim.gradient_accumulation_steps
    _rule(batch % per_step == 0, "optim.gradient_accumulation_steps",
          f"mini_batch_size * gradient_accumulation_steps = {per_step} samples per optimizer step must divide the "
          f"rollout batch prompts_per_step*num_generations = {batch}")


def _validate_optim(job: JobConfig) -> None:
    o = job.optim
    _rule(o.learning_rate > 0, "optim.learning_rate", f"must be > 0, got {o.learning_rate}")
    _rule(o.max_grad_norm >= 0, "optim.max_grad_norm", f"must be >= 0 (0 = no clipping), got {o.max_grad_norm}")
    _rule(o.lora.r >= 1, "optim.lora.r", f"LoRA rank must be >= 1, got {o.lora.r}")
    _choice("optim.mixed_precision", o.mixed_precision, ("no", "bf16", "fp16"))
    _choice("optim.lr_scheduler", o.lr_scheduler, SCHEDULERS)
    _rule(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _rule(o.warmup_steps == 0 or o.lr_scheduler != "constant", "optim.warmup_steps",
          "the 'constant' schedule has no warm-up; set optim.lr_scheduler=constant_with_warmup (or linear, cosine, ...)")
    _rule(o.gradient_accumulation_steps >= 1, "optim.gradient_accumulation_steps",
          f"must be >= 1, got {o.gradient_accumulation_steps}")


def _validate_rewards(job: JobConfig, stage: str) -> None:
    """Reward entries (training and eval) and the reward host; a training job needs a reward."""
    _rule(not trained_stages(stage) or len(job.rewards) >= 1, "rewards", "a training job needs at least one reward entry")
    for i, r in enumerate(list(job.rewards) + list(job.eval.rewards)):
        _rule(r.replicas >= 1, f"rewards[{i}].replicas", "must be >= 1")
        _rule(r.num_cpus >= 0 and r.num_gpus >= 0, f"rewards[{i}].num_cpus", "resources must be >= 0")
        _rule(r.timeout_s > 0, f"rewards[{i}].timeout_s", "must be > 0")
        _rule(math.isfinite(r.weight), f"rewards[{i}].weight", f"must be a finite number, got {r.weight}")
        _rule(r.max_restarts >= -1, f"rewards[{i}].max_restarts", f"must be >= -1 (-1 = restart forever), got {r.max_restarts}")
        _rule(r.batch_size >= 0, f"rewards[{i}].batch_size", f"must be >= 0 (0 = the whole batch), got {r.batch_size}")
    h = job.reward_host
    _choice("reward_host.backend", h.backend, ("ray", "local"))
    _rule(0 <= h.max_failed_frac < 1, "reward_host.max_failed_frac", f"must be in [0, 1), got {h.max_failed_frac}")
    _rule(h.max_failed_rollouts >= 1, "reward_host.max_failed_rollouts", f"must be >= 1, got {h.max_failed_rollouts}")


def _validate_logging(job: JobConfig, stage: str) -> None:
    """Logging and eval: checkpoints kept, trackers (installed, where a stage trains), an eval that has prompts."""
    _rule(job.logging.save_total_limit is None or job.logging.save_total_limit >= 1, "logging.save_total_limit",
          f"must be >= 1 or null (keep all), got {job.logging.save_total_limit}")
    for tracker in job.logging.report_to:
        _choice("logging.report_to", tracker, TRACKERS)
    if trained_stages(stage) and job.logging.report_to:
        from tandem.rl.trackers import check_installed  # imports accelerate (and rl.trackers imports this module)

        check_installed(job.logging.report_to)
    _rule(job.eval.num_prompts >= 0, "eval.num_prompts", f"must be >= 0 (0 = all), got {job.eval.num_prompts}")
    _rule(job.logging.eval_every == 0 or job.data.eval_prompts is not None, "logging.eval_every",
          "eval needs data.eval_prompts (a held-out prompt file)")


def _validate_distributed(job: JobConfig) -> None:
    _choice("distributed.launcher", job.distributed.launcher, ("none", "ray_train"))
    _choice("distributed.strategy", job.distributed.strategy, ("ddp", "fsdp"))
    workers = job.distributed.num_workers
    _rule(workers >= 1, "distributed.num_workers", "must be >= 1")
    for key in ("num_generations", "mini_batch_size"):
        value = getattr(job.grpo, key)
        _rule(value % workers == 0, f"grpo.{key}", f"is {value}; with distributed.num_workers={workers} it must be a multiple of {workers}")


def phase_config(job: JobConfig, phase: str) -> JobConfig:
    """A copy of a joint job's config for one phase ("ar" | "decoder"), with that stage's defaults."""
    import copy

    cfg = copy.deepcopy(job)
    apply_stage_defaults(cfg, phase)
    validate(cfg, phase)
    return cfg


def to_yaml(job: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(job))
