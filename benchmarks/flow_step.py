"""Benchmark: the decoder-stage flow-GRPO policy on the 2.9B diffusers-default DiT (random init, bf16) on one GPU.

    PYTHONUNBUFFERED=1 python -m benchmarks.flow_step --out docs/bench/flow_step_h200.json
    .venv/bin/python -m benchmarks.flow_step --device cpu --tiny      # CPU smoke test, not a benchmark

What is built (a ``GlmImagePipeline`` of the real classes, all random init, weights in ``--dtype``):

* ``GlmImageTransformer2DModel()`` with its diffusers default config (64 heads x 40, 30 layers, ~2.9B parameters;
  not the release decoder, which is 32 heads x 128, 30 layers, ~7B), created directly on the device (``--tiny``: a
  2-layer one of the same geometry);
* a small real ``AutoencoderKL`` (4 blocks of 32 channels: VAE factor 8, 16 latent channels,
  ``latents_mean/std`` set) — the VAE is *not* what is measured; its decode time is reported apart;
* a 1-layer ``T5EncoderModel`` glyph encoder with ``d_model`` = the transformer's ``text_embed_dim`` (1472);
* the tiny processor and AR model of ``policies.tiny`` (the AR model never runs, see below).

**Prior tokens are random.** ``GlmFlowAdapter.full_tokens`` (a frozen AR rollout or reference VQ tokens) is replaced
by ``random_conditions``: uniform random codebook ids, (P, th*tw). The decoder's cost does not depend on the
ids; the AR rollout is benchmarked by ``benchmarks/ar_rollout.py``.

Prompts carry a 63-character quoted string, so the glyph condition is 64 ByT5 tokens (the unconditional
branch's ``""`` is 2), matching the forward reference of docs/glm_image_facts.md ("4096 patch tokens + 64 glyph
tokens" at 1024²).

Measured, with the real ``FlowPolicy`` and ``rl.trainer.update_on_minibatch``:

1. ``forward``: one plain transformer forward (no grad, no CFG) at 1024² batch 1.
2. ``rollout``: ``FlowPolicy.rollout`` (CFG on, ``--num-steps`` steps, 2 SDE steps, the transformer run in
   chunks of ``grpo.mini_batch_size`` as the policy does), images/s; with the plain model (full fine-tuning
   setup) and with the LoRA-wrapped model. Warm-up: one 3-step rollout of the same shapes.
3. ``train``: one optimizer step, ``update_on_minibatch`` on a minibatch of the rollout (2 trained SDE steps,
   CFG: both branches with grad), AdamW, LoRA (rank 32, alpha 32, to_q/to_k/to_v/to_out.0) and full
   fine-tuning, with and without gradient checkpointing; an out-of-memory is recorded as such. One untimed
   warm-up step, then ``--train-reps`` timed steps. ``--train-rows`` picks other rows (e.g. ``1024:lora:8:gc``);
   ``--rollout-reps 0`` skips the rollout timing and trains on the warm-up rollout (same shapes).

``--compile`` repeats the forward, rollout and train rows with ``decoder.compile`` (diffusers regional
compilation: ``torch.compile`` of each ``GlmImageTransformerBlock``, inductor default mode), after the eager rows of
the same run; compiled rows get one more untimed warm-up (the first calls compile). ``--cfg-batch`` repeats the
rollout and train rows (of each compile setting) with ``decoder.cfg_batch`` (both CFG branches in one call of
2B), so each ``+cfg_batch`` row has its two-call baseline from the same run.

FLOPs: ``FlopCounterMode`` (matmuls + attention, forward and backward). Train step: counted on a separate
1-sample step without checkpointing, times the minibatch (all FLOPs of this model are per sample): model FLOPs,
no recompute, also for checkpointed rows. Rollout: one chunk's CFG velocity counted, times steps x chunks (the VAE
and T5 are not counted). MFU = FLOPs / seconds / 790e12. Peak memory: ``torch.cuda.max_memory_allocated`` over
the measured calls (train: the warm-up and timed steps, not the counting step).
A formula estimate (2·N·S per forward over the per-token linear weights N, + 4·L·S²·d attention) is printed
beside the counted forward FLOPs as a cross-check.
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch

from benchmarks import common as C
from tandem.policies.flow import FlowPolicy
from tandem.policies.glm_image_family import GlmFlowAdapter
from tandem.rl.config import JobConfig, LoraSettings, apply_stage_defaults
from tandem.rl.session import build_policy
from tandem.rl.trainer import update_on_minibatch

QUOTE = "GLM-Image flow-GRPO benchmark, a sixty-three character glyph!!!"  # 63 bytes -> 64 ByT5 tokens
assert len(QUOTE.encode()) == 63
PROMPTS = [f'a shop sign that says "{QUOTE}", photo {i}' for i in range(64)]

TINY_DIT = dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, text_embed_dim=32, time_embed_dim=32,
                condition_dim=16)

# GPU plan: size -> rollout prompts x group (batch), rollout chunk (= grpo.mini_batch_size during the rollout),
# and the train rows (minibatch, gradient checkpointing) tried for each of full / LoRA.
GPU_PLAN = {
    512: dict(prompts=4, group=4, chunk=8, train=[(8, False)]),
    1024: dict(prompts=2, group=4, chunk=4, train=[(2, False), (4, False), (4, True)]),
}
TINY_PLAN = {64: dict(prompts=2, group=2, chunk=2, train=[(2, True)]),
             128: dict(prompts=1, group=2, chunk=2, train=[(2, False)])}


# ------------------------------------------------------------------------------------------------ building
def build_pipeline(device: torch.device, dtype: torch.dtype, tiny: bool):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer, GlmImageImageProcessor, GlmImageProcessor, T5Config, T5EncoderModel

    from tandem.policies.tiny import CHAT_TEMPLATE, _build_ar, build_glm_tokenizer

    torch.manual_seed(0)
    tokenizer = build_glm_tokenizer()
    processor = GlmImageProcessor(
        image_processor=GlmImageImageProcessor(patch_size=16, temporal_patch_size=1, merge_size=1),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    )
    ar = _build_ar(tokenizer)  # tiny, never run: the prior tokens are random (random_conditions)
    with C.default_device(device):  # random init directly on the GPU (fp32), then cast
        transformer = GlmImageTransformer2DModel(**(TINY_DIT if tiny else {}))
        glyph_tokenizer = ByT5Tokenizer()
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(glyph_tokenizer), d_model=transformer.config.text_embed_dim, d_kv=64, d_ff=256,
            num_layers=1, num_heads=2, decoder_start_token_id=0, pad_token_id=glyph_tokenizer.pad_token_id,
        ))
        latent = transformer.config.in_channels
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=(32,) * 4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=32, sample_size=64,
            latents_mean=[0.0] * latent, latents_std=[1.0] * latent,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, use_dynamic_shifting=True, time_shift_type="linear",
        base_image_seq_len=256, base_shift=0.25, max_shift=0.75,
    )
    pipe = GlmImagePipeline(tokenizer=glyph_tokenizer, processor=processor, text_encoder=text_encoder,
                            vision_language_encoder=ar, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.vision_language_encoder, pipe.transformer, pipe.vae, pipe.text_encoder):
        module.to(device=device, dtype=dtype).requires_grad_(False).eval()  # as policies.glm_image.load_pipeline
    return pipe


def random_full_tokens(adapter: GlmFlowAdapter, prompts, metadata, seed: int) -> torch.Tensor:
    """Stand-in for ``GlmFlowAdapter.full_tokens``: (P, th*tw) uniform random prior codebook ids (no AR rollout)."""
    codes = adapter.pipe.transformer.config.prior_vq_quantizer_codebook_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, codes, (len(prompts), adapter.grids.num_full), generator=gen).to(adapter.device)


@contextmanager
def random_prior_tokens():
    """``GlmFlowAdapter.full_tokens`` replaced by ``random_full_tokens`` inside the block (the benchmark never runs
    the AR model), given back after it."""
    original = GlmFlowAdapter.full_tokens
    GlmFlowAdapter.full_tokens = torch.no_grad()(random_full_tokens)
    try:
        yield
    finally:
        GlmFlowAdapter.full_tokens = original


def job_config(size: int, chunk: int, num_steps: int, lora: bool, gc: bool, compile_blocks: bool = False,
               cfg_batch: bool = False) -> JobConfig:
    cfg = JobConfig()
    cfg.output_dir = "unused"
    cfg.data.height = cfg.data.width = size
    cfg.decoder.num_steps = num_steps
    cfg.decoder.guidance_scale = 1.5  # CFG on
    cfg.decoder.sde_window_size = 2
    cfg.decoder.sde_window_range = [0, min(5, num_steps - 1)]  # the release default [0, 5) at 10 steps
    cfg.grpo.mini_batch_size = chunk
    cfg.grpo.beta = 0.0  # no KL reference: no frozen copy, no extra forward
    cfg.optim.learning_rate = 1e-5
    cfg.optim.gradient_checkpointing = gc
    cfg.decoder.compile = compile_blocks
    cfg.decoder.cfg_batch = cfg_batch
    cfg.optim.lora = LoraSettings(enabled=lora, r=32, alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    apply_stage_defaults(cfg, "decoder")
    return cfg


def make_policy(pipe, cfg: JobConfig) -> FlowPolicy:
    base = pipe.transformer
    base.disable_gradient_checkpointing()  # FlowPolicy enables it when the config asks
    return build_policy("decoder", cfg, pipe)


def release_policy(policy: FlowPolicy) -> None:
    """Give the base transformer back as it was: LoRA layers removed, frozen, no checkpointing."""
    pipe = policy.adapter.pipe
    if policy.settings.lora.enabled:
        pipe.transformer = policy.model.unload()
    pipe.transformer.requires_grad_(False).eval()
    pipe.transformer.disable_gradient_checkpointing()
    uncompile(pipe.transformer)
    for p in pipe.transformer.parameters():
        p.grad = None


def uncompile(module: torch.nn.Module) -> None:
    """Undo ``nn.Module.compile`` (what ``compile_repeated_blocks`` calls) on every submodule, and drop dynamo's
    compiled code: the next variant compiles afresh, as its own job would (the blocks share one code object, whose
    cache would otherwise carry every earlier variant's shapes toward dynamo's recompile limit)."""
    for m in module.modules():
        m._compiled_call_impl = None
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ counting
def formula_forward_flops(transformer, image_tokens: int, text_tokens: int) -> float:
    """2·N·S + 4·L·S²·d: N = weights of the per-token linear layers of the blocks (+ projectors), S = joint
    sequence length, d = inner dim, L = layers. A cross-check of the counted FLOPs."""
    cfg = transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    per_token = 0
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.") and ".norm" not in name:
            per_token += module.weight.numel()
    s = image_tokens + text_tokens
    return 2.0 * per_token * s + 4.0 * cfg.num_layers * s * s * d


# ------------------------------------------------------------------------------------------------ measuring
def bench_forward(pipe, device, size: int, reps: int, warmup: int, compiled: bool = False) -> Dict[str, object]:
    tr = pipe.transformer
    if compiled:
        tr.compile_repeated_blocks()
    dtype = tr.dtype
    h = w = size // pipe.vae_scale_factor
    n_img = h * w // tr.config.patch_size**2
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, tr.config.in_channels, h, w, generator=g).to(device, dtype)
    glyph = torch.randn(1, 64, tr.config.text_embed_dim, generator=g).to(device, dtype)
    prior = torch.randint(0, tr.config.prior_vq_quantizer_codebook_size, (1, n_img), generator=g).to(device)
    kw = dict(hidden_states=x, encoder_hidden_states=glyph, prior_token_id=prior,
              prior_token_drop=torch.zeros_like(prior, dtype=torch.bool), timestep=torch.tensor([500.0], device=device),
              target_size=torch.tensor([[size, size]], dtype=dtype, device=device),
              crop_coords=torch.zeros(1, 2, dtype=dtype, device=device), return_dict=False)
    with torch.no_grad():
        for _ in range(warmup):
            tr(**kw)
        _, flops = C.count_flops(lambda: tr(**kw))
        C.reset_peak(device)
        times = [C.timed(lambda: tr(**kw), device)[1] for _ in range(reps)]
    t = C.median(times)
    uncompile(tr)
    return dict(compiled=compiled, size=size, batch=1, image_tokens=n_img, glyph_tokens=64, ms=t * 1e3, ms_min=min(times) * 1e3,
                reps=reps, flops=flops, formula_flops=formula_forward_flops(tr, n_img, 64),
                mfu=C.mfu(flops, t, device), peak_gib=C.peak_gib(device))


def timed_decode(policy: FlowPolicy, device, log: List[float]):
    """Wrap ``adapter.decode`` so the VAE decode time of each rollout is recorded apart."""
    inner = type(policy.adapter).decode

    def decode(latents):
        out, seconds = C.timed(lambda: inner(policy.adapter, latents), device)
        log.append(seconds)
        return out

    policy.adapter.decode = decode


def rollout_flops(policy: FlowPolicy, device, batch: int) -> int:
    """FLOPs of one rollout's transformer calls: one chunk's CFG velocity counted, times steps x chunks."""
    a, d = policy.adapter.layout, policy.d
    chunks = policy._rollout_chunks(batch)
    total = 0
    for c in {chunks[0].stop - chunks[0].start, chunks[-1].stop - chunks[-1].start}:
        n = sum(1 for s in chunks if s.stop - s.start == c)
        x = torch.randn(a.latent_shape(c, policy.adapter.height, policy.adapter.width), device=device)
        grids = a.grids(policy.adapter.height, policy.adapter.width)
        prior = a.upsample_prior(random_full_tokens(policy.adapter, [""] * c, None, 0), grids)
        glyph = a.glyph_embeds(PROMPTS[:c])
        neg = a.glyph_embeds([""] * c)
        t, _ = a.schedule(d.num_steps, policy.adapter.height, policy.adapter.width)
        with torch.no_grad():
            _, f = C.count_flops(lambda: a.velocity(policy.model, x, t[0], prior, glyph, neg, d.guidance_scale,
                                                    policy.adapter.height, policy.adapter.width))
        total += f * n * d.num_steps
    return total


def bench_rollout(policy: FlowPolicy, cfg: JobConfig, device, prompts: int, group: int, reps: int, label: str):
    """(row, rollout) of ``policy`` built from the job config ``cfg``; with ``reps == 0`` no row, and the rollout
    is the warm-up's (same shapes, 3 steps)."""
    d = policy.d
    batch = prompts * group
    decode_s: List[float] = []
    timed_decode(policy, device, decode_s)
    ps, meta = PROMPTS[:prompts], [{} for _ in range(prompts)]
    # warm-up: same shapes, 3 steps (kernels, allocator); window moved so that both SDE steps fall inside
    saved = (d.num_steps, list(d.sde_window_range))
    d.num_steps, d.sde_window_range = 3, [0, 2]
    warm = policy.rollout(ps, meta, group, seed=12345)
    d.num_steps, d.sde_window_range = saved
    if reps == 0:
        return None, warm
    del warm
    flops = rollout_flops(policy, device, batch)
    decode_s.clear()
    C.reset_peak(device)
    times, out = [], None
    for r in range(reps):
        out, s = C.timed(lambda: policy.rollout(ps, meta, group, seed=r), device)
        times.append(s)
    t = C.median(times)
    dec = C.median(decode_s)
    row = dict(mode=label, size=policy.adapter.height, batch=batch, chunk=cfg.grpo.mini_batch_size,
               num_steps=d.num_steps, cfg=d.guidance_scale, seconds=t, seconds_min=min(times), reps=reps,
               images_per_s=batch / t, vae_decode_s=dec, images_per_s_no_vae=batch / (t - dec),
               flops=flops, mfu=C.mfu(flops, t, device), mfu_transformer=C.mfu(flops, t - dec, device),
               peak_gib=C.peak_gib(device))
    return row, out


def bench_train(policy: FlowPolicy, job: JobConfig, device, rollout, mb: int, reps: int, label: str, gc: bool,
                warmups: int = 1) -> Dict[str, object]:
    """One optimizer step of ``update_on_minibatch`` on the first ``mb`` samples of ``rollout`` (``policy`` built from
    the job config ``job``).

    FLOPs are counted on a separate 1-sample step without checkpointing (``FlopCounterMode`` tracks modules with
    hooks, which break gradient checkpointing's memory savings), times ``mb``: every FLOP of
    this model is per sample, so that is the model FLOPs of the minibatch (no recompute: MFU, not HFU). Then one
    untimed warm-up step and ``reps`` timed steps; the peak memory is that of the warm-up and timed steps.
    """
    from accelerate import Accelerator

    cfg = copy.deepcopy(job)
    cfg.grpo.mini_batch_size = mb
    transformer = policy.adapter.pipe.transformer
    params = policy.trainable_parameters()
    row: Dict[str, object] = dict(mode=label, size=policy.adapter.height, minibatch=mb, trained_steps=rollout.old_log_probs.shape[1],
                                  cfg=policy.d.guidance_scale, gc=gc, trainable_params=sum(p.numel() for p in params))
    accelerator = Accelerator(mixed_precision="no", cpu=device.type == "cpu")
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.learning_rate, weight_decay=0.0)

    def minibatch(n: int):
        batch = rollout.select(torch.arange(n))
        # Random advantages on the policy's device (the trainer builds them there from the rewards).
        batch.advantages = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
        batch.mask = batch.mask.to(device)
        return batch

    one, batch = minibatch(1), minibatch(mb)
    step = lambda b: update_on_minibatch(policy, optimizer, b, cfg, accelerator)  # noqa: E731
    failed: Optional[str] = None
    row["allocated_at_start_gib"] = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    try:
        transformer.disable_gradient_checkpointing()
        _, flops_one = C.count_flops(lambda: step(one))  # also allocates the optimizer state
        flops = flops_one * mb
        if gc:
            transformer.enable_gradient_checkpointing()
        C.free_memory(device)
        C.reset_peak(device)
        for _ in range(warmups):
            step(batch)
        times = [C.timed(lambda: step(batch), device)[1] for _ in range(reps)]
    except Exception as e:  # noqa: BLE001
        if not C.is_oom(e):
            raise
        failed = "out of memory: " + str(e).splitlines()[0][:160]
    if failed is not None:
        row.update(status="OOM", error=failed, peak_gib=C.peak_gib(device))
    else:
        t = C.median(times)
        row.update(status="ok", seconds=t, seconds_min=min(times), reps=reps, samples_per_s=mb / t, flops=flops,
                   mfu=C.mfu(flops, t, device), peak_gib=C.peak_gib(device))
    optimizer.zero_grad(set_to_none=True)
    del optimizer, batch, one, step
    transformer.disable_gradient_checkpointing()
    C.free_memory(device)
    return row


# ------------------------------------------------------------------------------------------------ main
def arguments(ap) -> None:
    ap.add_argument("--sizes", type=int, nargs="*", help="image sizes (default: 512 1024; tiny: 64)")
    ap.add_argument("--num-steps", type=int, default=None, help="denoising steps per rollout (default 10; tiny 3)")
    ap.add_argument("--rollout-reps", type=int, default=None,
                    help="timed rollouts (default 2; tiny 1); 0: no rollout row, train on the warm-up rollout")
    ap.add_argument("--train-reps", type=int, default=None, help="timed optimizer steps (default 3; tiny 1)")
    ap.add_argument("--forward-reps", type=int, default=None, help="timed plain forwards (default 20; tiny 2)")
    ap.add_argument("--modes", nargs="*", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--train-rows", nargs="*", default=None, metavar="SIZE:MODE:MB[:gc]",
                    help="train rows to run instead of the plan's, e.g. 1024:lora:4:gc (sizes and modes follow)")
    ap.add_argument("--no-forward", action="store_true", help="skip the plain forward reference")
    ap.add_argument("--compile", action="store_true", help="repeat every row with decoder.compile")
    ap.add_argument("--cfg-batch", action="store_true",
                    help="repeat the rollout and train rows with decoder.cfg_batch (CFG as one doubled batch)")


def run(bench: C.Bench) -> None:
    with random_prior_tokens():
        measure(bench)


def measure(bench: C.Bench) -> None:
    args, device, dtype = bench.args, bench.device, bench.dtype
    for key, full, tiny in (("num_steps", 10, 3), ("rollout_reps", 2, 1), ("train_reps", 3, 1), ("forward_reps", 20, 2)):
        bench.default(key, full, tiny)
    plan = copy.deepcopy(TINY_PLAN if args.tiny else GPU_PLAN)
    sizes = args.sizes or ([64] if args.tiny else list(plan))
    train_rows = {(size, mode): [(mb, gc) for mb, gc in plan[size]["train"]] for size in plan for mode in args.modes}
    if args.train_rows is not None:
        train_rows = {}
        for spec in args.train_rows:
            size, mode, mb, *gc = spec.split(":")
            train_rows.setdefault((int(size), mode), []).append((int(mb), gc == ["gc"]))
        sizes = sorted({size for size, _ in train_rows})
        args.modes = [m for m in ("full", "lora") if any(mode == m for _, mode in train_rows)]
    fwd_size = 64 if args.tiny else 1024
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    pipe, build_s = C.timed(lambda: build_pipeline(device, dtype, args.tiny), device)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"built pipeline in {build_s:.1f}s: transformer {n_params / 1e9:.3f}B params, {args.dtype}, {device}", flush=True)
    res = bench.results
    res.set("setup", dict(transformer_params=n_params, transformer_config=dict(pipe.transformer.config), dtype=args.dtype,
                   tiny=args.tiny, num_steps=args.num_steps, guidance_scale=1.5, sde_window_size=2, lora_rank=32,
                   lora_targets=["to_q", "to_k", "to_v", "to_out.0"], optimizer="AdamW (torch default impl)",
                   prior_tokens="uniform random codebook ids (GlmFlowAdapter.full_tokens replaced)",
                   glyph_tokens="64 conditional / 2 unconditional", vae="AutoencoderKL 4x32 channels (not measured)",
                   build_s=build_s))

    variants = [False, True] if args.compile else [False]
    for compiled in variants if not args.no_forward else []:
        fwd = bench_forward(pipe, device, fwd_size, reps=args.forward_reps, warmup=3, compiled=compiled)
        res.add("forward", fwd)
        print(f"forward {fwd_size}² b1 compiled={compiled}: {fwd['ms']:.1f} ms, MFU {C.fmt(fwd['mfu'])}, "
              f"counted {fwd['flops']:.3e} FLOP, formula {fwd['formula_flops']:.3e}", flush=True)

    settings = [(c, b) for c in variants for b in ([False, True] if args.cfg_batch else [False])]
    for size in sizes:
        p = plan[size]
        for mode, (compiled, cfg_batch) in [(m, v) for m in args.modes for v in settings]:
            if (size, mode) not in train_rows:
                continue
            lora = mode == "lora"
            suffix = "+compile" * compiled + "+cfg_batch" * cfg_batch
            job = job_config(size, p["chunk"], args.num_steps, lora=lora, gc=False, compile_blocks=compiled,
                             cfg_batch=cfg_batch)
            policy = make_policy(pipe, job)
            row, rollout = bench_rollout(policy, job, device, p["prompts"], p["group"], args.rollout_reps,
                                         ("lora" if lora else "plain") + suffix)
            if row is not None:
                res.add("rollout", row)
                print(f"rollout {size}² {row['mode']} b{row['batch']} (chunk {row['chunk']}): {row['seconds']:.2f}s, "
                      f"{row['images_per_s']:.2f} img/s, MFU {C.fmt(row['mfu'])}, peak {C.fmt(row['peak_gib'])} GiB",
                      flush=True)
            for mb, gc in train_rows[(size, mode)]:
                row = bench_train(policy, job, device, rollout, mb, args.train_reps, mode + suffix, gc,
                                  warmups=2 if compiled else 1)
                res.add("train", row)
                print(f"train {size}² {mode} mb{mb} gc={gc}: {row['status']} {C.fmt(row.get('seconds'))}s, "
                      f"MFU {C.fmt(row.get('mfu'))}, peak {C.fmt(row.get('peak_gib'))} GiB", flush=True)
            del rollout
            release_policy(policy)
            del policy
            C.free_memory(device)

    C.print_table("forward (no grad, no CFG)", res.data.get("forward", []), [
        ("compiled", "compiled", ""), ("size", "size", ""), ("batch", "batch", ""), ("ms", "ms", ".1f"), ("FLOP", "flops", ".4g"), ("formula FLOP", "formula_flops", ".4g"),
        ("MFU", "mfu", ".3f"), ("peak GiB", "peak_gib", ".1f")])
    C.print_table(f"rollout (CFG, {args.num_steps} steps, incl. VAE decode)", res.data.get("rollout", []), [
        ("size", "size", ""), ("model", "mode", ""), ("batch", "batch", ""), ("chunk", "chunk", ""),
        ("s", "seconds", ".2f"), ("img/s", "images_per_s", ".3g"), ("vae s", "vae_decode_s", ".3f"),
        ("MFU", "mfu", ".3f"), ("MFU excl vae", "mfu_transformer", ".3f"), ("peak GiB", "peak_gib", ".1f")])
    C.print_table("train step (update_on_minibatch: 2 SDE steps x CFG, AdamW)", res.data.get("train", []), [
        ("size", "size", ""), ("mode", "mode", ""), ("mb", "minibatch", ""), ("gc", "gc", ""),
        ("status", "status", ""), ("s", "seconds", ".3f"), ("samples/s", "samples_per_s", ".3g"),
        ("MFU", "mfu", ".3f"), ("peak GiB", "peak_gib", ".1f"), ("alloc at start", "allocated_at_start_gib", ".1f")])


def main(argv=None) -> int:
    return C.main("flow_step", __doc__, arguments, run, argv,
                  tiny_help="tiny transformer at 64², 3 steps, one repeat (CPU smoke test, not a benchmark)")


if __name__ == "__main__":
    sys.exit(main())
