"""Tiny random-init GLM-Image models of the real classes, for tests and the CPU demo.

``build_tiny_glm_image(path)`` builds every component of a ``diffusers.GlmImagePipeline`` —
``GlmImageForConditionalGeneration`` (AR), ``GlmImageProcessor`` with a byte-level BPE tokenizer trained here,
``GlmImageTransformer2DModel``, ``AutoencoderKL``, a ByT5 tokenizer + tiny ``T5EncoderModel`` glyph encoder and
``FlowMatchEulerDiscreteScheduler`` — and writes them with ``save_pretrained``. Everything downstream loads
them back with ``from_pretrained`` from that folder, exactly as it loads the released weights.

Geometry (see docs/glm_image_facts.md): one AR token = 32 px; VAE factor 8 x DiT patch 2 = 16 px per prior token,
so the full-grid tokens are upsampled 2x nearest. The AR codebook has ``CODEBOOK`` codes; ids
``[CODEBOOK, VISION_VOCAB)`` (start/end markers) are suppressed in the saved generation config.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

CODEBOOK = 128  # VQ codes of the tiny AR model (release: 16384)
IMAGE_START = CODEBOOK  # <|dit_token_128|> = bos of the image segment (release: 16384)
IMAGE_END = CODEBOOK + 1  # <|dit_token_129|> = eos (release: 16385)
VISION_VOCAB = CODEBOOK + 4  # lm_head width (release: 16512)
LATENT_CHANNELS = 4
TINY_VERSION = 6  # bump when the tiny models change, so cached folders are rebuilt

# Text items as they are; an image item (an edit's source) as <image start><|image|><image end>, the markers that
# GlmImageModel.get_rope_index looks for to give the source's tokens 2-D positions (without them they get text
# positions and the source grid is taken for a grid still to generate).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% elif item['type'] == 'image' %}"
    f"<|dit_token_{IMAGE_START}|><|image|><|dit_token_{IMAGE_END}|>{{% endif %}}"
    "{% endfor %}{% endfor %}"
)
TOKENIZER_CORPUS = [
    "a red apple on a wooden table", "a cat sitting in the sun", 'a sign that says "OPEN"',
    "a poster with the words 'HELLO WORLD'", "一只猫 在 阳光 下", "写着「你好」的招牌", "0 1 2 3 4 5 6 7 8 9 16",
    "blue sky, green grass, a white house", "a photo of a dog", "the quick brown fox jumps over the lazy dog",
]


def build_glm_tokenizer(vision_vocab: int = VISION_VOCAB, start: int = IMAGE_START, end: int = IMAGE_END,
                        corpus=TOKENIZER_CORPUS):
    """A byte-level BPE trained here on ``corpus`` and wrapped for ``GlmImageProcessor``: special ids
    0..vision_vocab-1 are ``<|dit_token_i|>``, then <sop> <eop> <|image|> and the pad token; bos/eos are the
    image start/end markers; left padding (docs/glm_image_facts.md, "Tokenizer and processor")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [f"<|dit_token_{i}|>" for i in range(vision_vocab)] + ["<sop>", "<eop>", "<|image|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + 400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=f"<|dit_token_{start}|>",
        eos_token=f"<|dit_token_{end}|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={"image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"},
    )


# Shapes of the tiny AR model (policies/tiny.py and ``scripts/make_release_pipeline.py --tiny``); the VQ codebook
# size and the vocabularies come from the caller.
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
TINY_AR_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
                    rope_parameters={**ROPE, "mrope_section": [2, 3, 3]})
TINY_AR_VISION = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=16, spatial_merge_size=1)
TINY_AR_VQ = dict(embed_dim=16, latent_channels=32)


def sample_codebook_ids(model, tokenizer, codebook: int, vision_vocab: int) -> None:
    """The generation config of a random-init AR model: only codebook ids (the image markers and the rest of the
    vision vocabulary suppressed), the release sampler's temperature/top-p, the image segment's bos/eos."""
    gen = model.generation_config
    gen.suppress_tokens = list(range(codebook, vision_vocab))  # a random model must only emit codebook ids
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = True, 0.9, 0.75, 0
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = codebook + 1, tokenizer.pad_token_id, codebook


def _build_ar(tokenizer):
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    text = dict(TINY_AR_TEXT, vocab_size=len(tokenizer), vision_vocab_size=VISION_VOCAB,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=IMAGE_END)
    config = GlmImageConfig(
        text_config=text, vision_config=TINY_AR_VISION, vq_config=dict(TINY_AR_VQ, num_embeddings=CODEBOOK),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"), image_start_token_id=IMAGE_START,
        image_end_token_id=IMAGE_END,
    )
    model = GlmImageForConditionalGeneration(config).eval()
    sample_codebook_ids(model, tokenizer, CODEBOOK, VISION_VOCAB)
    return model


def _build_decoder_parts():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    glyph_tokenizer = ByT5Tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(glyph_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=glyph_tokenizer.pad_token_id,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=1, sample_size=64,
        latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[4.0] * LATENT_CHANNELS,
    ).eval()
    # A random VAE maps every latent to nearly the same colours: per-group normalisation erases the latent's
    # channel balance. One norm group keeps it, latents_std 4 widens what a shift of the normalised latent
    # means, and a 3x output layer widens the colour range, so that the tiny decoder can actually steer what
    # the demo rewards see (a +1 shift of one latent channel moves the mean red by ~24/255).
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(3.0)
    transformer = GlmImageTransformer2DModel(
        patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, text_embed_dim=32, time_embed_dim=32, condition_dim=16,
        prior_vq_quantizer_codebook_size=CODEBOOK,
    ).eval()
    # A random DiT all but ignores its prior tokens; the released one is driven by them. A 5x prior-token path
    # makes the tiny decoder's images depend on the AR tokens, so the AR demo has something to learn.
    with torch.no_grad():
        transformer.prior_token_embedding.weight.mul_(5.0)
        transformer.prior_projector.net[2].weight.mul_(5.0)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, use_dynamic_shifting=True, time_shift_type="linear",
        base_image_seq_len=256, base_shift=0.25, max_shift=0.75,
    )
    return dict(tokenizer=glyph_tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                scheduler=scheduler)


def build_tiny_glm_image(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny pipeline with random weights (seeded) and ``save_pretrained`` it to ``path``."""
    from diffusers import GlmImagePipeline
    from transformers import GlmImageImageProcessor, GlmImageProcessor

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = build_glm_tokenizer()
    processor = GlmImageProcessor(
        image_processor=GlmImageImageProcessor(patch_size=16, temporal_patch_size=1, merge_size=1),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    )
    pipe = GlmImagePipeline(processor=processor, vision_language_encoder=_build_ar(tokenizer), **_build_decoder_parts())
    tmp = path.with_name(path.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "TINY_RANDOM_INIT.json").write_text(json.dumps({"seed": seed, "version": TINY_VERSION}))
    tmp.rename(path)  # atomic: a half-written folder is never mistaken for a model
    return path


def ensure_tiny_glm_image(path: str | os.PathLike) -> Path:
    """Return ``path``, building the tiny models there first if it holds no pipeline yet."""
    path = Path(path)
    marker = path / "TINY_RANDOM_INIT.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") != TINY_VERSION:
        shutil.rmtree(path)  # an outdated tiny build from an earlier version of this file
    if not (path / "model_index.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_glm_image(path)
    return path
