"""Shared fixtures. The tiny GLM-Image models are built once per test session and loaded from disk."""

import json
import os

# Inductor's CPU kernels without SIMD code: gcc builds them faster. The tests compare compiled against eager;
# GPUs run Triton kernels anyway.
# Set before torch (diffusers imports inductor's config, which reads it once); the jobs the tests launch inherit it.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from tandem.policies.tiny import ensure_tiny_glm_image


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """Folder of a tiny random-init GlmImagePipeline written with save_pretrained."""
    return ensure_tiny_glm_image(tmp_path_factory.getbasetemp() / "tiny-glm-image")


@pytest.fixture(scope="module")
def tiny_path(tiny_model_path):
    """The same folder as a string."""
    return str(tiny_model_path)


@pytest.fixture(scope="module")
def edit_records():
    """The edit demo's prompt records (data/demo_edit_prompts.jsonl), source images loaded at 64x64."""
    from tandem.core.data import load_prompts

    return load_prompts("data/demo_edit_prompts.jsonl", image_size=(64, 64))


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models gain nothing from intra-op threads, and they thrash when other jobs share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def plugin_path():
    """Make "tests.reward_plugins:attr" importable here and in Ray workers started afterwards (repo root on
    sys.path and PYTHONPATH), whatever the working directory."""
    import os
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return root


@pytest.fixture(scope="session")
def ray_cluster(plugin_path):
    """One local Ray cluster for the reward-hosting tests and the benchmarks' smoke runs that score on Ray, started
    the way RewardClient embeds one (RewardClients created while it runs reuse it and leave it running)."""
    from tandem.rewards.host import Cluster
    from tandem.rl.config import RewardHostConfig

    cluster = Cluster(RewardHostConfig(num_cpus=2))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(autouse=True)
def shared_ray_for_slow_tests(request):
    """Slow tests run whole jobs in this process; they share ``ray_cluster`` instead of starting and stopping an
    embedded cluster per job: a job reuses a running Ray and leaves it running. A test
    marked ``own_ray`` (joining another address, the embedded start itself) gets this process without Ray; the
    next slow test, or fast test that asks for ``ray_cluster``, starts the shared cluster again."""
    if request.node.get_closest_marker("slow") is None and "ray_cluster" not in request.fixturenames:
        yield
        return
    import ray

    cluster = request.getfixturevalue("ray_cluster")
    if request.node.get_closest_marker("own_ray"):
        cluster.stop()
    elif not ray.is_initialized():
        cluster.start()
    yield


# ------------------------------------------------------------------------ tiny reward models (random init)
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """Name of a tiny open_clip architecture registered in this process (the aesthetic reward uses ViT-L-14)."""
    import json

    import open_clip

    name = "tandem-tiny-ViT"
    config = tmp_path_factory.mktemp("open_clip") / f"{name}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    return name


TINY_VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _build_tiny_llava(folder) -> None:
    """Tokenizer (BPE trained here), CLIP image processor, 1-layer CLIP + Llama LLaVA: save_pretrained to folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    corpus = ["user assistant Does this image show: a red cat on a blue mat? Answer yes or no. Yes No"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<pad>", "<s>", "</s>", "<image>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=TINY_VLM_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, intermediate_size=64, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """Folder of a tiny random-init LLaVA (processor + model) written with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny_llava")
    _build_tiny_llava(folder)
    return folder


TINY_CLIP_CORPUS = ["a red apple on a wooden table", "a cat", "a sign that says OPEN above a shop door"]


@pytest.fixture(scope="session")
def tiny_pickscore(tmp_path_factory):
    """A tiny random-init transformers CLIPModel + CLIPProcessor (BPE tokenizer trained here), save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TINY_CLIP_CORPUS * 10, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<pad>", "<|startoftext|>", "<|endoftext|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<|startoftext|>", eos_token="<|endoftext|>")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    special = {k: getattr(tokenizer, f"{k}_id") for k in ("eos_token", "pad_token", "bos_token")}
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=77, **{f"{k}_id": v for k, v in special.items()}),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("tiny_pickscore")
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


TINY_OPEN_CLIP = {  # open_clip's own tokenizer (49408 ids) runs on it
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """(name of a tiny open_clip architecture registered here, its random state dict saved as HPSv2 ships
    its checkpoint: {"state_dict": ...} in a torch file)."""
    import open_clip

    name = "tandem-tiny-hps"
    config = tmp_path_factory.mktemp("open_clip_hps") / f"{name}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    model = open_clip.create_model(name, pretrained=None)
    path = config.parent / "HPS_tiny_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return name, path, model.eval()
