"""Benchmark: AR-stage token sampling at release GLM-Image size (random init, bf16) on one GPU.

    PYTHONUNBUFFERED=1 python -m benchmarks.ar_rollout --out docs/bench/ar_rollout_h200.json
    .venv/bin/python -m benchmarks.ar_rollout --device cpu --tiny      # CPU smoke test, not a benchmark

What is built: ``GlmImageForConditionalGeneration(GlmImageConfig())`` — the release text decoder (40 layers,
hidden 4096, 32 heads / 2 KV heads, head_dim 128, vocab 168064, lm_head 16512), and the default vision tower
and VQ model (kept at full size although text-to-image never runs them) — random init directly on the GPU,
then cast to bf16. The text config gets ``rope_parameters`` with ``partial_rotary_factor`` 0.5 and
``mrope_section`` [8, 12, 12] (docs/glm_image_facts.md). The tokenizer is a byte-level BPE trained here on a few
sentences whose special tokens are placed so the ids fit the config: ``<|dit_token_i|>`` = id i for
i in 0..16511 (start marker 16384, end marker 16385, as released), then ``<sop>``, ``<eop>``, ``<|image|>``,
``<|endoftext|>``; the config's ``image_token_id`` and ``pad_token_id`` are set to the tokenizer's ids (the
release's 167855 / 167841 would be rows of the same embedding table: no effect on speed).

Sampler: the release one (temperature 0.9, top-p 0.75, ``top_k=0``) plus ``suppress_tokens`` = ids
[16384, 16512) (a random model otherwise samples end markers: docs/glm_image_facts.md), in every row.

Rows, all on the same model in one process, prompts tokenised once beforehand (8 prompts x 4 copies at
batch 32, ~30-40 prompt tokens each, left padded), target 1024² (16x16 preview + 32x32 full grid = 1280 tokens):

* ``hf_generate``: ``model.generate(**inputs, generation_config=...)`` directly (dynamic KV cache);
* ``tandem_sampler``: ``policies.ar_sampler.GenerateSampler`` as ``GlmImageARPolicy.rollout`` calls it —
  ``policy.sampler(policy.model, prompt_inputs(inputs), N, policy.processing, row_seeds(seed, B))`` on an
  ``GlmImageARPolicy`` built over the model (full fine-tuning setup; the decoder rendering is not run). It adds the
  per-row seeded draw (a logits processor; generate itself runs greedy), the log-prob gather and the
  MRoPE-position hook to ``generate``;
* ``hf_generate_static``: ``generate`` with ``cache_implementation="static"`` (transformers then compiles the
  decode forward itself: ``CompileConfig`` default, inductor, mode reduce-overhead);
* ``tandem_sampler_lora`` (``--lora-row``): the sampler on a ``GlmImageARPolicy`` with LoRA rank 32 on
  q/k/v/o_proj (the adapter runs unmerged inside generation, as in AR training).

Timing: only the first ``--tokens`` N of the 1280 tokens are generated (default 512: the 256 preview tokens
and the first 256 full-grid tokens). Before the first row of each batch size, one untimed N-token ``generate``
(``--batch-warmup-tokens``: the first long generation of each batch size runs slower per step whichever row
runs it). Per row: a warm-up call (8 tokens; the static row warms up with N
tokens, which compiles), the median of 3 calls generating 1 token (T1 = prefill + one sample; taken before the
warm-up in the static row, so that the timed call reuses the warmed-up cache), then one call generating N
tokens (TN). decode ms/step = (TN - T1) / (N - 1); tokens/s = B·N / TN (prefill included).
The full-image estimate is T1 + 1279 x ms/step (the KV cache keeps growing past N, so this is a lower bound
for the dynamic cache). Roofline: the bf16 bytes of the weights one decode step must read (text decoder
layers + final norm + lm_head; the 168064 x 4096 embedding table is gathered, not read) / 4.3 TB/s; the
KV-cache bytes read at the mean context length are reported beside it.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Dict, List

import torch

from benchmarks import common as C
from tandem.core.seeds import derive_seed
from tandem.policies.ar import GlmImageARPolicy
from tandem.policies.ar_sampler import GenerateSampler, prompt_inputs
from tandem.policies.glm_image import GlmImageAdapter
from tandem.policies.settings import PolicySettings
from tandem.policies.tiny import CHAT_TEMPLATE, build_glm_tokenizer
from tandem.rl.config import JobConfig, LoraSettings

PROMPTS = [
    "a red apple on a wooden table, soft morning light",
    "a cat sitting in the sun on a window sill",
    'a shop sign that says "OPEN" above a blue door',
    "a poster with the words 'HELLO WORLD' in bold letters",
    "blue sky, green grass, a white house with a red roof",
    "a photo of a dog running on the beach at sunset",
    "the quick brown fox jumps over the lazy dog, illustration",
    "a bowl of ramen with chopsticks, top view, studio photo",
]
CORPUS = PROMPTS + ["一只猫 在 阳光 下", "写着「你好」的招牌", "0 1 2 3 4 5 6 7 8 9 16 32"]
RELEASE = dict(codebook=16384, vision_vocab=16512)  # start marker = codebook, end marker = codebook + 1
TINY = dict(codebook=128, vision_vocab=132)
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}


# ------------------------------------------------------------------------------------------------ building
def build_tokenizer(ids: Dict[str, int]):
    """The byte-level BPE tokenizer of the module docstring, its special-token ids fitted to ``ids``."""
    return build_glm_tokenizer(ids["vision_vocab"], ids["codebook"], ids["codebook"] + 1, CORPUS)


def build_processor(tokenizer):
    """A ``GlmImageProcessor`` over ``tokenizer`` (16-px patches, no merge), with tandem's chat template."""
    from transformers import GlmImageImageProcessor, GlmImageProcessor

    return GlmImageProcessor(image_processor=GlmImageImageProcessor(patch_size=16, temporal_patch_size=1, merge_size=1),
                             tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, ids: Dict[str, int], tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    start, end = ids["codebook"], ids["codebook"] + 1
    text = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=end, vision_vocab_size=ids["vision_vocab"])
    if tiny:
        text.update(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
                    rope_parameters={**ROPE, "mrope_section": [2, 3, 3]})
        vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=16, spatial_merge_size=1)
        vq = dict(embed_dim=16, num_embeddings=ids["codebook"], latent_channels=32)
    else:  # release sizes (the config defaults); only rope and the token ids are set
        text.update(rope_parameters={**ROPE, "mrope_section": [8, 12, 12]})
        vision, vq = {}, {}
    config = GlmImageConfig(text_config=text, vision_config=vision, vq_config=vq,
                            image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
                            image_start_token_id=start, image_end_token_id=end)
    assert len(tokenizer) <= config.text_config.vocab_size
    with C.default_device(device):  # random init directly on the GPU (fp32), then cast
        model = GlmImageForConditionalGeneration(config)
    model.to(dtype).requires_grad_(False).eval()
    gen = model.generation_config
    gen.suppress_tokens = list(range(ids["codebook"], ids["vision_vocab"]))
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = True, 0.9, 0.75, 0
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = end, tokenizer.pad_token_id, start
    return model


def build_policy(model, processor, device, lora: bool, rank: int = 32) -> GlmImageARPolicy:
    """An ``GlmImageARPolicy`` over ``model``; the pipeline is a stand-in with only what the AR side reads (no decoder:
    the benchmark times the sampler, not the rendering)."""
    pipe = SimpleNamespace(processor=processor, vision_language_encoder=model, vae_scale_factor=8,
                           transformer=SimpleNamespace(device=device, config=SimpleNamespace(patch_size=2)))
    cfg = JobConfig()
    cfg.data.height = cfg.data.width = 1024
    cfg.optim.lora = LoraSettings(enabled=lora, r=rank, alpha=rank if rank == 32 else 2 * rank,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return GlmImageARPolicy(pipe, GlmImageAdapter(pipe), PolicySettings.from_job(cfg, "ar"), sampler=GenerateSampler())


def decode_weight_bytes(model) -> Dict[str, int]:
    """bf16 bytes of the weights a decode step reads, and of the embedding table (gathered, not read)."""
    read, embed = 0, 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if "language_model.embed_tokens" in name:
            embed += nbytes
        elif "language_model." in name or name.startswith("lm_head."):
            read += nbytes
    return dict(decode_weight_bytes=read, embed_bytes=embed)


def kv_bytes(model, batch: int, context: float) -> float:
    t = model.config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return 2.0 * t.num_hidden_layers * t.num_key_value_heads * head_dim * 2 * batch * context


# ------------------------------------------------------------------------------------------------ measuring
def hf_generate_fn(model, inputs, static: bool, scores: bool = False):
    """``model.generate`` with the release sampler; ``scores``: also ``return_dict_in_generate`` and
    ``output_scores`` (what ``GenerateSampler`` asked for before its per-row seeded draw)."""
    from transformers import GenerationConfig

    gen = model.generation_config

    def run(n: int, seed: int):
        config = GenerationConfig(
            do_sample=True, temperature=0.9, top_p=0.75, top_k=0, suppress_tokens=gen.suppress_tokens,
            max_new_tokens=n, min_new_tokens=n, num_beams=1, eos_token_id=gen.eos_token_id,
            pad_token_id=gen.pad_token_id, bos_token_id=gen.bos_token_id, use_cache=True,
            **({"cache_implementation": "static"} if static else {}),
            **({"return_dict_in_generate": True, "output_scores": True} if scores else {}),
        )
        torch.manual_seed(seed)
        out = model.generate(**inputs, generation_config=config)
        seq = out.sequences if scores else out
        assert seq.shape[1] == inputs["input_ids"].shape[1] + n, seq.shape
        return out

    return run


def row_seeds(seed: int, batch: int) -> List[int]:
    """One sampler seed per prompt row of a timed call (``TokenSampler`` takes a seed per row)."""
    return [derive_seed(seed, i) for i in range(batch)]


def sampler_fn(policy: GlmImageARPolicy, inputs, sampler=None, keep: Dict[int, object] = None):
    """``run(n, seed)``: ``sampler`` (default: the policy's) on ``inputs`` for ``n`` tokens, one seed per row;
    ``keep``: where the last output of each token count is kept."""
    sampler = sampler or policy.sampler

    def run(n: int, seed: int):
        out = sampler(policy.model, inputs, n, policy.processing, row_seeds(seed, inputs["input_ids"].shape[0]))
        assert out.tokens.shape[1] == n
        if keep is not None:
            keep[n] = out
        return out

    return run


def prompt_batch(adapter, batch: int):
    """``batch`` prompt rows at the 1024² target: 8 prompts x 4 copies each at batch 32 (batch 1: the first)."""
    prompts = [PROMPTS[(i // 4) % len(PROMPTS)] if batch > 1 else PROMPTS[0] for i in range(batch)]
    return prompt_inputs(adapter.ar_inputs(prompts, 1024, 1024))


def recorder(rows: List[Dict[str, object]], results: C.Results):
    """``record(row)``: keep a timed row, write it to the results and print its one-line summary."""

    def record(row):
        rows.append(row)
        results.add("rows", row)
        print(f"{row['row']} b{row['batch']}: {row['decode_ms_per_step']:.2f} ms/step, {row['tokens_per_s']:.1f} tok/s, "
              f"prefill+1 {row['t1_s'] * 1e3:.1f} ms, peak {C.fmt(row['peak_gib'])} GiB", flush=True)

    return record


def decode_columns(baseline: tuple, extra: tuple) -> List[tuple]:
    """The printed table's columns of ``bench_row`` rows, with the ratio to ``baseline`` and one ``extra`` column."""
    return [("row", "row", ""), ("batch", "batch", ""), ("ms/step", "decode_ms_per_step", ".2f"),
            ("x roofline", "x_roofline", ".2f"), baseline, ("tok/s", "tokens_per_s", ".4g"),
            ("prefill+1 ms", "t1_ms", ".4g"), extra, ("1280-tok est s", "full_image_est_s", ".3g"),
            ("peak GiB", "peak_gib", ".1f")]


def vs_baseline(rows: List[Dict[str, object]], baseline: str) -> None:
    """``vs_<baseline>`` of each row: its ms/step over that of the first ``baseline`` row of the same batch."""
    base: Dict[int, float] = {}
    for r in rows:
        if r["row"] == baseline:
            base.setdefault(r["batch"], r["decode_ms_per_step"])
    for r in rows:
        r[f"vs_{baseline}"] = r["decode_ms_per_step"] / base[r["batch"]] if r["batch"] in base else None


def bench_row(name: str, run, inputs, device, n: int, warmup_tokens: int, roofline_s: float, model,
              ones: int = 3, t1_first: bool = False) -> Dict[str, object]:
    b, prompt_len = inputs["input_ids"].shape
    C.reset_peak(device)
    if t1_first:  # static cache: 1-token calls never reach the compiled decode; the N-token warm-up then
        # compiles and leaves a cache of the timed call's size that the timed call reuses (no recompile)
        t1s = [C.timed(lambda: run(1, 1 + i), device)[1] for i in range(ones)]
        _, warm_s = C.timed(lambda: run(warmup_tokens, 0), device)
    else:
        _, warm_s = C.timed(lambda: run(warmup_tokens, 0), device)
        t1s = [C.timed(lambda: run(1, 1 + i), device)[1] for i in range(ones)]
    _, tn = C.timed(lambda: run(n, 100), device)
    t1 = C.median(t1s)
    step = (tn - t1) / (n - 1)
    context = prompt_len + n / 2
    return dict(
        row=name, batch=b, prompt_len=prompt_len, tokens=n, warmup_tokens=warmup_tokens, warmup_s=warm_s,
        t1_s=t1, t1_ms=t1 * 1e3, tn_s=tn, decode_ms_per_step=step * 1e3, tokens_per_s=b * n / tn,
        decode_tokens_per_s=b / step, full_image_est_s=t1 + 1279 * step, roofline_ms=roofline_s * 1e3,
        x_roofline=step / roofline_s, kv_bytes_mean=kv_bytes(model, b, context), peak_gib=C.peak_gib(device),
    )


def arguments(ap) -> None:
    ap.add_argument("--tokens", type=int, default=None, help="tokens generated per timed call (default 512; tiny 16)")
    ap.add_argument("--batches", type=int, nargs="*", default=None, help="batch sizes (default 1 32; tiny 2)")
    ap.add_argument("--no-static", action="store_true", help="skip the static-cache row")
    ap.add_argument("--lora-row", action="store_true", help="also time the sampler with LoRA r32 on q/k/v/o_proj")
    ap.add_argument("--batch-warmup-tokens", type=int, default=None,
                    help="one untimed generation of this many tokens at each batch size before its first row "
                         "(default: --tokens; 0: none, whose first long generation at each batch size runs ~2x "
                         "slower per step)")
    ap.add_argument("--rows", nargs="*", metavar="NAME:BATCH",
                    help="only these dynamic-cache rows, in this order (hf_generate, hf_generate_scores, "
                         "tandem_sampler), e.g. tandem_sampler:1 hf_generate:1")


def run(bench: C.Bench) -> None:
    args, device, dtype = bench.args, bench.device, bench.dtype
    bench.default("tokens", 512, 16)
    bench.default("batches", [1, 32], [2])
    n = args.tokens
    ids = TINY if args.tiny else RELEASE

    torch.manual_seed(0)
    tokenizer = build_tokenizer(ids)
    processor = build_processor(tokenizer)
    model, build_s = C.timed(lambda: build_model(tokenizer, ids, args.tiny, device, dtype), device)
    n_params = sum(p.numel() for p in model.parameters())
    wb = decode_weight_bytes(model)
    roofline_s = wb["decode_weight_bytes"] / C.HBM_BYTES_PER_S
    print(f"built model in {build_s:.1f}s: {n_params / 1e9:.3f}B params, decode path {wb['decode_weight_bytes'] / 1e9:.2f} GB "
          f"(+ embedding {wb['embed_bytes'] / 1e9:.2f} GB), roofline {roofline_s * 1e3:.2f} ms/step", flush=True)

    policy = build_policy(model, processor, device, lora=False)
    adapter, grids, num_units = policy.adapter, policy.grids, policy.num_units
    res = bench.results
    res.set("setup", dict(params=n_params, dtype=args.dtype, tiny=args.tiny, tokens_timed=n,
                          tokens_per_image=num_units, grids=dict(full=[grids.th, grids.tw], preview=[grids.ph, grids.pw]),
                          sampler=dict(temperature=0.9, top_p=0.75, top_k=0, suppress=f"[{ids['codebook']}, {ids['vision_vocab']})"),
                          text_config={k: v for k, v in model.config.text_config.to_dict().items()
                                       if k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                "head_dim", "intermediate_size", "vocab_size", "vision_vocab_size", "rope_parameters")},
                          roofline_ms=roofline_s * 1e3, build_s=build_s, **wb))

    rows: List[Dict[str, object]] = []
    warm_tokens = n if args.batch_warmup_tokens is None else args.batch_warmup_tokens
    warmed: set = set()

    def inputs_for_row(batch: int):
        """The prompts of ``batch``; the first time, one untimed long generation at that batch size (the first
        long generation of a batch size in a process runs slower per step, whatever the path)."""
        inputs = prompt_batch(adapter, batch)
        if warm_tokens and batch not in warmed:
            _, seconds = C.timed(lambda: hf_generate_fn(model, inputs, static=False)(warm_tokens, 999), device)
            res.add("batch_warmups", dict(batch=batch, tokens=warm_tokens, seconds=seconds))
            warmed.add(batch)
        return inputs

    record = recorder(rows, res)
    if args.rows:  # an explicit sequence of dynamic-cache rows, e.g. to check that the order does not matter
        makers = dict(hf_generate=lambda i: hf_generate_fn(model, i, static=False),
                      hf_generate_scores=lambda i: hf_generate_fn(model, i, static=False, scores=True),
                      tandem_sampler=lambda i: sampler_fn(policy, i))
        for spec in args.rows:
            name, batch = spec.split(":")
            inputs = inputs_for_row(int(batch))
            record(bench_row(name, makers[name](inputs), inputs, device, n, 8, roofline_s, model))
        args.no_static, args.lora_row = True, False
    for batch in ([] if args.rows else args.batches):
        inputs = inputs_for_row(batch)
        record(bench_row("hf_generate", hf_generate_fn(model, inputs, static=False), inputs, device, n, 8, roofline_s, model))
        record(bench_row("tandem_sampler", sampler_fn(policy, inputs), inputs, device, n, 8, roofline_s, model))
    big = max(args.batches)
    if not args.no_static:
        inputs = inputs_for_row(big)
        try:
            record(bench_row("hf_generate_static", hf_generate_fn(model, inputs, static=True), inputs, device, n, n,
                             roofline_s, model, t1_first=True))
        except Exception as e:  # noqa: BLE001 - a failure of this optional path is a result too
            res.add("failures", dict(row="hf_generate_static", batch=big, error=f"{type(e).__name__}: {str(e)[:400]}"))
            print(f"hf_generate_static b{big} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
        compiled = getattr(model, "_compiled_call", None) is not None
        res.set("static_compiled_by_transformers", compiled)
    if args.lora_row:
        policy = None  # drops the full fine-tuning setup's frozen reference copy
        C.free_memory(device)
        lora_policy = build_policy(model, processor, device, lora=True)
        inputs = inputs_for_row(big)
        record(bench_row("tandem_sampler_lora", sampler_fn(lora_policy, inputs), inputs, device, n, 8, roofline_s, model))

    vs_baseline(rows, "hf_generate")  # ratios against HF generate (dynamic cache) at the same batch
    res.set("rows", rows)
    C.print_table(f"AR decode, {n} of {num_units} tokens of a 1024² image (roofline {roofline_s * 1e3:.2f} ms/step = "
                  f"{wb['decode_weight_bytes'] / 1e9:.2f} GB / 4.3 TB/s)", rows,
                  decode_columns(("vs HF gen", "vs_hf_generate", ".2f"), ("TN s", "tn_s", ".3g")))


def main(argv=None) -> int:
    return C.main("ar_rollout", __doc__, arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
