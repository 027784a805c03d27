"""Benchmark: peak GPU memory of LoRA training (bf16, gradient checkpointing) at 1024², largest group.

    PYTHONUNBUFFERED=1 python -m benchmarks.memory --out docs/bench/memory_h200.json
    .venv/bin/python -m benchmarks.memory --device cpu --tiny      # CPU smoke test, no memory figures

Both stages at 1024², LoRA rank 32 (AdamW on the adapters), gradient checkpointing, ``grpo.beta`` 0. A group of
G is one prompt x G copies rolled out together and trained as one minibatch (``grpo.num_generations`` =
``grpo.mini_batch_size`` = G), the largest unit of work the trainer holds at once. Each probe runs one rollout and
one ``rl.trainer.update_on_minibatch`` on it and records the peak of each (``torch.cuda.max_memory_allocated``).

* **AR stage**: ``GlmImageARPolicy`` over the release-size ``GlmImageForConditionalGeneration`` (10.1B, random init; the
  model, tokenizer and sampler of ``benchmarks/ar_rollout.py``), LoRA on q/k/v/o_proj, the rollout through
  ``StaticCacheSampler`` with its CUDA graph (1280 tokens: 16x16 preview + 32x32 full grid). The frozen 2.9B
  diffusers-default decoder (``GlmImageTransformer2DModel()``, not the ~7B release DiT) is resident and renders
  the G images with CFG, in one batch as ``GlmImageARPolicy`` does, for 1 ODE step instead of ``ar.decode_steps`` (the
  memory of one step is the memory of every step).
* **Decoder stage**: ``FlowPolicy`` over the 2.9B diffusers-default transformer (the pipeline of
  ``benchmarks/flow_step.py``: random prior tokens, small VAE, 1-layer glyph T5), LoRA on
  to_q/to_k/to_v/to_out.0, CFG 1.5, 2 trained SDE steps; 3 denoising steps instead of 10 (the stored
  latents are those of the 2 trained steps either way).

Search: probes at ``--probes`` sizes give peak ≈ a + b·G (least squares over the probes); the largest G whose
predicted peak is below the GPU's capacity minus ``--margin-gib`` is run to confirm; if it runs out of memory,
the next try is 10 % smaller. Reported: every probe, the fit and the confirmed largest group.
"""

from __future__ import annotations

import copy
import sys
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from accelerate import Accelerator

from benchmarks import ar_rollout as R  # release AR model, tokenizer
from benchmarks import common as C
from benchmarks import flow_step as F  # 2.9B default-DiT decoder pipeline, random prior tokens
from tandem.policies.ar import GlmImageARPolicy
from tandem.policies.ar_engine import StaticCacheSampler
from tandem.policies.glm_image import GlmImageAdapter
from tandem.policies.settings import PolicySettings
from tandem.rl.config import JobConfig, LoraSettings, apply_stage_defaults
from tandem.rl.trainer import update_on_minibatch

PROMPT = 'a shop sign that says "OPEN" above a blue door, photo'


def stage_config(stage: str, size: int) -> JobConfig:
    cfg = JobConfig()
    cfg.output_dir = "unused"
    cfg.data.height = cfg.data.width = size
    cfg.grpo.beta = 0.0
    cfg.optim.gradient_checkpointing = True
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if stage == "ar" else ["to_q", "to_k", "to_v", "to_out.0"]
    cfg.optim.lora = LoraSettings(enabled=True, r=32, alpha=32, target_modules=targets)
    cfg.ar.decode_steps, cfg.ar.decode_guidance_scale = 1, 1.5
    cfg.decoder.num_steps, cfg.decoder.guidance_scale = 3, 1.5
    cfg.decoder.sde_window_size, cfg.decoder.sde_window_range = 2, [0, 2]
    apply_stage_defaults(cfg, stage)
    return cfg


def probe(policy, cfg: JobConfig, group: int, device) -> Dict[str, object]:
    """One rollout of one prompt x ``group`` copies and one optimizer step on all of them; peaks of each."""
    cfg = copy.deepcopy(cfg)
    cfg.grpo.num_generations = cfg.grpo.mini_batch_size = group
    row: Dict[str, object] = dict(group=group)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-5)
    try:
        C.free_memory(device)
        C.reset_peak(device)
        batch, row["rollout_s"] = C.timed(lambda: policy.rollout([PROMPT], [{}], group, seed=group), device)
        row["rollout_peak_gib"] = C.peak_gib(device)
        batch.advantages = torch.randn(group, generator=torch.Generator().manual_seed(0)).to(device)
        C.reset_peak(device)
        _, row["train_s"] = C.timed(lambda: update_on_minibatch(policy, optimizer, batch, cfg,
                                                                 Accelerator(cpu=device.type == "cpu")), device)
        row["train_peak_gib"] = C.peak_gib(device)
        row["status"] = "ok"
        del batch
    except Exception as e:  # noqa: BLE001 - running out of memory is a result
        if not C.is_oom(e):
            raise
        row.update(status="OOM", error=str(e).splitlines()[0][:160], peak_at_failure_gib=C.peak_gib(device))
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    C.free_memory(device)
    if row["status"] == "ok" and row["rollout_peak_gib"] is not None:
        row["peak_gib"] = max(row["rollout_peak_gib"], row["train_peak_gib"])
    return row


def largest_group(run: Callable[[int], Dict[str, object]], probes: List[int], capacity_gib: Optional[float],
                  margin_gib: float, record: Callable[[Dict[str, object]], None], max_group: int) -> Dict[str, object]:
    rows = [run(g) for g in probes]
    for r in rows:
        record(r)
    ok = [r for r in rows if r["status"] == "ok" and r.get("peak_gib") is not None]
    if capacity_gib is None or len(ok) < 2:
        return dict(fit=None, largest=None)
    b, a = np.polyfit([r["group"] for r in ok], [r["peak_gib"] for r in ok], 1)
    target = int((capacity_gib - margin_gib - a) // b)
    out: Dict[str, object] = dict(fit=dict(intercept_gib=float(a), gib_per_sample=float(b)), predicted=target)
    g = min(target, max_group)
    while g > max(probes):
        r = run(g)
        record(r)
        if r["status"] == "ok":
            out["largest"] = g
            return out
        g = int(g * 0.9)
    out["largest"] = max(r["group"] for r in ok)
    return out


def build_ar_policy(pipe, device, dtype, tiny: bool) -> Tuple[GlmImageARPolicy, JobConfig]:
    """An ``GlmImageARPolicy`` (and its config) over the decoder pipeline with the release-size AR model and its
    processor swapped in."""
    ids = R.TINY if tiny else R.RELEASE
    tokenizer = R.build_tokenizer(ids)
    pipe.processor = R.build_processor(tokenizer)
    pipe.vision_language_encoder = R.build_model(tokenizer, ids, tiny, device, dtype)
    cfg = stage_config("ar", 64 if tiny else 1024)
    policy = GlmImageARPolicy(pipe, GlmImageAdapter(pipe), PolicySettings.from_job(cfg, "ar"),
                              sampler=StaticCacheSampler(use_cuda_graph=True))
    return policy, cfg


def arguments(ap) -> None:
    ap.add_argument("--stages", nargs="*", default=["decoder", "ar"], choices=["decoder", "ar"])
    ap.add_argument("--probes", type=int, nargs="*", default=None, help="probe group sizes (default 8 16; tiny 2 4)")
    ap.add_argument("--max-group", type=int, default=256, help="largest group tried")
    ap.add_argument("--margin-gib", type=float, default=2.0)


def run(bench: C.Bench) -> None:
    with F.random_prior_tokens():
        measure(bench)


def measure(bench: C.Bench) -> None:
    args, device, dtype = bench.args, bench.device, bench.dtype
    bench.default("probes", [8, 16], [2, 4])
    probes = args.probes
    capacity = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    res = bench.results
    res.set("setup", dict(dtype=str(dtype), tiny=args.tiny, lora_rank=32, gradient_checkpointing=True,
                          size=64 if args.tiny else 1024, capacity_gib=capacity, margin_gib=args.margin_gib, probes=probes))
    pipe = F.build_pipeline(device, dtype, args.tiny)
    summary = {}
    for stage in args.stages:
        if stage == "decoder":
            cfg = stage_config("decoder", 64 if args.tiny else 1024)
            policy = F.make_policy(pipe, cfg)
        else:
            policy, cfg = build_ar_policy(pipe, device, dtype, args.tiny)
        weights = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None

        def record(row, stage=stage):
            row["stage"] = stage
            res.add("probes", row)
            print(f"{stage} G={row['group']}: {row['status']} rollout peak {C.fmt(row.get('rollout_peak_gib'))} GiB "
                  f"({C.fmt(row.get('rollout_s'))} s), train peak {C.fmt(row.get('train_peak_gib'))} GiB "
                  f"({C.fmt(row.get('train_s'))} s)", flush=True)

        found = largest_group(lambda g: probe(policy, cfg, g, device), probes, capacity, args.margin_gib, record,
                              args.max_group)
        summary[stage] = dict(weights_and_adapters_gib=weights, **found)
        res.set("summary", summary)
        print(f"{stage}: {summary[stage]}", flush=True)
        if stage == "decoder":
            F.release_policy(policy)
        del policy
        C.free_memory(device)
    C.print_table("LoRA r32 + gradient checkpointing, bf16, 1024²", res.data.get("probes", []), [
        ("stage", "stage", ""), ("G", "group", ""), ("status", "status", ""), ("rollout GiB", "rollout_peak_gib", ".1f"),
        ("rollout s", "rollout_s", ".3g"), ("train GiB", "train_peak_gib", ".1f"), ("train s", "train_s", ".3g")])


def main(argv=None) -> int:
    return C.main("memory", __doc__, arguments, run, argv, tiny_help="tiny models at 64² (CPU smoke test)")


if __name__ == "__main__":
    sys.exit(main())
