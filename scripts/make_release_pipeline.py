"""Write a random-init GLM-Image pipeline at the release's shapes, plus reward-model folders and prompt files.

Why: no weights can be downloaded here, yet the glm_image configs must be run end to end at the size users run
them. This script writes, with ``save_pretrained`` (bf16, sharded safetensors), a ``GlmImagePipeline`` folder in
the release layout, so ``configs/glm_image/*.yaml`` run unchanged with ``model.path=OUT``:

* ``vision_language_encoder/``: ``GlmImageForConditionalGeneration(GlmImageConfig())`` — the transformers
  defaults are the release AR (40-layer GLM-4-9B text decoder, 40-layer vision tower, VQ with 16384 codes,
  ~10.1B); only ``rope_parameters`` (partial rotary 0.5, mrope [8, 12, 12]) and the token ids are set.
* ``transformer/``: ``GlmImageTransformer2DModel`` at the release shape (32 heads x 128, 30 layers, ~7B).
* ``vae/``: ``AutoencoderKL`` at the release's inferred shape (CogView4-style: 16 latent channels, factor 8,
  blocks (128, 512, 1024, 1024) x 3 layers), so rendering and edit-encoding cost what the release's do;
  ``latents_mean``/``latents_std`` are placeholders (0 / 1): the release's values are not known here
  (docs/glm_image_facts.md, "The release's own settings": which values are verified and which inferred).
* ``text_encoder/`` + ``tokenizer/``: a ByT5-small-shaped ``T5EncoderModel`` (d_model 1472 = the DiT's
  ``text_embed_dim``, 12 layers, gated-gelu) and ``ByT5Tokenizer``.
* ``processor/``: ``GlmImageProcessor`` with a byte-level BPE tokenizer trained here. Ids 0..16511 are the
  vision tokens as released (start 16384, end 16385); ``<sop>``/``<eop>``/``<|image|>``/pad follow at 16512..
  instead of the release's 167845.. (rows of the same 168064-row embedding: same shapes and cost).
* ``scheduler/``: ``FlowMatchEulerDiscreteScheduler`` with the release's linear dynamic shift.

With ``--extras DIR`` it also writes reward models at their real architectures with random weights (no
weights ship for them): ``DIR/clip-vit-l-14.safetensors`` (open_clip ViT-L-14), ``DIR/aesthetic-head.safetensors``
(LAION MLP on 768), ``DIR/alexnet.safetensors`` (torchvision AlexNet for lpips), ``DIR/vlm/`` (a LLaVA of CLIP
ViT-L/14-336 + a TinyLlama-1.1B-shaped Llama, ~1.4B, tokenizer trained here), and ``DIR/prompts.jsonl`` with
reference images for the decoder stage. OCR (RapidOCR) and hands (mediapipe) ship their own models.

Weights are initialised on ``--device`` in bf16 (no CPU init of 17B parameters). ``--tiny`` shrinks every
component (same classes, same code path) for a CPU smoke test.

    python scripts/make_release_pipeline.py /models/GLM-Image --extras /models/extras
    python scripts/make_release_pipeline.py /tmp/rel --tiny --device cpu --extras /tmp/rel-extras
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tandem.policies.tiny import (CHAT_TEMPLATE, ROPE, TINY_AR_TEXT, TINY_AR_VISION, TINY_AR_VQ, TOKENIZER_CORPUS,
                                  build_glm_tokenizer, sample_codebook_ids)

CODEBOOK, VISION_VOCAB = 16384, 16512  # release: start marker = 16384, end marker = 16385
PROMPTS = [
    ("a storefront sign that reads \"FRESH BREAD\" above a bakery window", "FRESH BREAD"),
    ("a red apple on a wooden table", None),
    ("a poster with the words 'HELLO WORLD' in bold letters", "HELLO WORLD"),
    ("a hand holding a cup of coffee", None),
    ("写着「你好」的红色招牌", "你好"),
    ("a green highway sign saying \"EXIT 42\"", "EXIT 42"),
    ("a cat sleeping in the sun, soft light", None),
    ("a chalkboard menu listing \"TOMATO SOUP\"", "TOMATO SOUP"),
]


def build_ar(tokenizer, codebook: int, vision_vocab: int, tiny: bool):
    """The release AR (transformers defaults) or a tiny one; generation config = the release sampler."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    end = codebook + 1
    text = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=end, vision_vocab_size=vision_vocab,
                rope_parameters={**ROPE, "mrope_section": [8, 12, 12]})
    vision, vq = {}, {}
    if tiny:
        text.update(TINY_AR_TEXT, vocab_size=len(tokenizer))
        vision, vq = TINY_AR_VISION, dict(TINY_AR_VQ, num_embeddings=codebook)
    config = GlmImageConfig(text_config=text, vision_config=vision, vq_config=vq,
                            image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
                            image_start_token_id=codebook, image_end_token_id=end)
    model = GlmImageForConditionalGeneration(config).eval()
    sample_codebook_ids(model, tokenizer, codebook, vision_vocab)
    return model


def build_decoder_parts(codebook: int, tiny: bool) -> dict:
    """DiT (release 32x128x30 or tiny), VAE, ByT5-shaped glyph encoder, scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    latent = 16
    if tiny:
        dit = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, text_embed_dim=32, time_embed_dim=32,
                   condition_dim=16)
        t5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
        blocks, layers = (8, 8, 8, 8), 1
    else:
        dit = dict(num_attention_heads=32, attention_head_dim=128, num_layers=30, text_embed_dim=1472,
                   time_embed_dim=512, condition_dim=256)
        t5 = dict(d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6)  # ByT5-small
        blocks, layers = (128, 512, 1024, 1024), 3  # CogView4's VAE shape (inferred)
    transformer = GlmImageTransformer2DModel(patch_size=2, in_channels=latent, out_channels=latent,
                                             prior_vq_quantizer_codebook_size=codebook, **dit).eval()
    glyph_tokenizer = ByT5Tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(glyph_tokenizer), feed_forward_proj="gated-gelu", decoder_start_token_id=0,
        pad_token_id=glyph_tokenizer.pad_token_id, **t5)).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=blocks, layers_per_block=layers,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=min(32, blocks[0]), sample_size=1024,
        latents_mean=[0.0] * latent, latents_std=[1.0] * latent,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, use_dynamic_shifting=True, time_shift_type="linear",
        base_image_seq_len=256, base_shift=0.25, max_shift=0.75,
    )
    return dict(tokenizer=glyph_tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                scheduler=scheduler)


def build_processor(codebook: int, vision_vocab: int, tiny: bool = False):
    """``GlmImageProcessor``: the BPE tokenizer above and an image processor for reference images.

    The image processor's pixel bounds are 512^2..2048^2 (``smart_resize``'s own defaults). The class default
    (``longest_edge`` 28*28*1280 = 1003520 px) shrinks a 1024^2 reference to 992^2, whose VQ grid is 31x31
    instead of the 32x32 the decoder needs (the decoder then fails with "shape '[1, 1, 32, 32]' is invalid for
    input of size 961")."""
    from transformers import GlmImageProcessor

    return GlmImageProcessor(image_processor=build_image_processor(tiny),
                             tokenizer=build_glm_tokenizer(vision_vocab, codebook, codebook + 1), chat_template=CHAT_TEMPLATE)


def build_image_processor(tiny: bool = False):
    """Patch 16, no temporal patch or merge; pixel bounds (32^2 when tiny, else 512^2) .. 2048^2."""
    from transformers import GlmImageImageProcessor

    return GlmImageImageProcessor(patch_size=16, temporal_patch_size=1, merge_size=1,
                                  size={"shortest_edge": (32 if tiny else 512) ** 2, "longest_edge": 2048 * 2048})


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_pipeline(out: Path, device: str, tiny: bool, seed: int) -> dict:
    """Build every component on ``device`` in bf16 and ``save_pretrained`` it (sharded safetensors)."""
    from diffusers import GlmImagePipeline

    codebook, vision_vocab = (128, 132) if tiny else (CODEBOOK, VISION_VOCAB)
    torch.manual_seed(seed)
    processor = build_processor(codebook, vision_vocab, tiny)
    tokenizer = processor.tokenizer
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are created in bf16, directly on the device
    try:
        with torch.device(device):
            ar = build_ar(tokenizer, codebook, vision_vocab, tiny)
            parts = build_decoder_parts(codebook, tiny)
    finally:
        torch.set_default_dtype(default)
    init_s = time.perf_counter() - t0
    pipe = GlmImagePipeline(processor=processor, vision_language_encoder=ar, **parts)
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    (tmp / "RELEASE_SHAPE_RANDOM_INIT.json").write_text(json.dumps({"seed": seed, "tiny": tiny}))
    tmp.rename(out)  # a half-written folder is never mistaken for a model
    return {"ar_params": count(ar), "dit_params": count(parts["transformer"]), "vae_params": count(parts["vae"]),
            "text_encoder_params": count(parts["text_encoder"]), "init_s": round(init_s, 1),
            "save_s": round(time.perf_counter() - t0, 1)}


def build_vlm(folder: Path, device: str, tiny: bool) -> int:
    """LLaVA: CLIP ViT-L/14-336 vision + TinyLlama-1.1B-shaped Llama (tokenizer trained here, has yes/no)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    corpus = ["user assistant Does this image show: a red cat on a blue mat? Answer yes or no. Yes No"] * 20 + TOKENIZER_CORPUS
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", "<s>", "</s>", "<image>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if tiny:
        image, patch = 32, 8
        vision = CLIPVisionConfig(hidden_size=32, image_size=image, patch_size=patch, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
    else:
        image, patch = 336, 14
        vision = CLIPVisionConfig(hidden_size=1024, image_size=image, patch_size=patch, num_hidden_layers=24,
                                  num_attention_heads=16, intermediate_size=4096, projection_dim=768)
        text = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                    intermediate_size=5632)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>",
        chat_template=("{% for message in messages %}{{ message['role'] }}: {% for item in message['content'] %}"
                       "{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}{% endif %}{% endfor %}\n"
                       "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"),
    )
    config = LlavaConfig(vision_config=vision,
                         text_config=LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **text),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return count(model)


def write_prompts(folder: Path, size: int) -> None:
    """``prompts.jsonl`` (prompt, OCR text, reference image path) and the reference PNGs it names."""
    from PIL import Image, ImageDraw

    rng = torch.Generator().manual_seed(0)
    lines = []
    for i, (prompt, text) in enumerate(PROMPTS):
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=rng))
        im = Image.new("RGB", (size, size), colour)
        ImageDraw.Draw(im).text((size // 8, size // 2), text or prompt[:20], fill=(255 - colour[0], 255, 255))
        im.save(folder / f"ref_{i}.png")
        row = {"prompt": prompt, "reference": f"ref_{i}.png"}
        if text:
            row["text"] = text
        lines.append(json.dumps(row, ensure_ascii=False))
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")


def build_extras(folder: Path, device: str, tiny: bool) -> dict:
    """Reward-model files at their real architectures (random init) and the prompt file."""
    import open_clip
    import torchvision
    from safetensors.torch import save_file

    from tandem.rewards.aesthetic import aesthetic_head

    folder.mkdir(parents=True, exist_ok=True)
    name = "ViT-B-32" if tiny else "ViT-L-14"
    with torch.device(device):
        clip = open_clip.create_model(name, pretrained=None)
        head = aesthetic_head(open_clip.get_model_config(name)["embed_dim"])
        alex = torchvision.models.alexnet()
    save_file({k: v.detach().contiguous().cpu() for k, v in clip.state_dict().items()}, str(folder / "clip-vit-l-14.safetensors"))
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(folder / "aesthetic-head.safetensors"))
    save_file({k: v.detach().contiguous().cpu() for k, v in alex.state_dict().items()}, str(folder / "alexnet.safetensors"))
    vlm = build_vlm(folder / "vlm", device, tiny)
    write_prompts(folder, 64 if tiny else 1024)
    return {"clip_model": name, "clip_params": count(clip), "vlm_params": vlm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder to write the GlmImagePipeline to (must not exist)")
    ap.add_argument("--extras", default=None, help="also write reward models and prompts to this folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, same classes (CPU smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; pass a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    info = build_pipeline(out, args.device, args.tiny, args.seed)
    if args.extras:
        info.update(build_extras(Path(args.extras), args.device, args.tiny))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
