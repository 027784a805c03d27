"""The shared rollout buffer: a stage's rollouts saved as shards in a run directory, read back as the next
stage's conditions (the AR stage's token grids condition the decoder stage).

One shard per rollout batch, ``buffer/shard_NNNNNN.safetensors`` — safe to load (no pickles). Tensors:
``images`` (B, H, W, 3) uint8, ``group_ids`` (B,) int64, ``rewards`` (B,) float64 combined, ``advantages``
(B,) float32, ``reward.<name>`` (B,) float64 per reward (NaN = no score), and the policy's hand-off
(``Policy.handoff``, e.g. ``full_tokens`` (B, th*tw) int64), each batch first. The safetensors header's
metadata holds one JSON document under ``tandem_buffer``: format name, version, image size, the hand-off
keys, reward names and weights, and per sample the prompt and its JSON-serialisable metadata (image arrays
are dropped; ``reference_path`` stays). Reading a shard puts each hand-off row into its sample's metadata.

``save_records`` / ``load_records`` keep prompt records exactly, arrays included (a checkpoint's hand-off).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from tandem.core.errors import ConfigError
from tandem.core.data import confined, load_image
from tandem.core.types import PromptRecord

FORMAT, VERSION = "tandem-buffer", 1


def _jsonable(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def save_shard(folder: Path, index: int, *, images: np.ndarray, prompts: List[str], metadata: List[dict],
               group_ids: np.ndarray, payload: Dict[str, torch.Tensor], scores, advantages: np.ndarray,
               combined: np.ndarray, height: int, width: int) -> Path:
    """Write one rollout batch and its hand-off ``payload`` as ``folder/shard_{index}``."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "images": torch.from_numpy(np.ascontiguousarray(images)),
        "group_ids": torch.from_numpy(np.asarray(group_ids, dtype=np.int64)),
        "rewards": torch.from_numpy(np.asarray(combined, dtype=np.float64)),
        "advantages": torch.from_numpy(np.asarray(advantages, dtype=np.float32)),
        **{k: v.detach().cpu().contiguous() for k, v in payload.items()},
    }
    tensors.update({f"reward.{k}": torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in scores.scores.items()})
    header = {
        "format": FORMAT, "version": VERSION, "height": height, "width": width, "payload": sorted(payload),
        "rewards": scores.weights, "prompts": list(prompts), "metadata": [_jsonable(m) for m in metadata],
    }
    path = folder / f"shard_{index:06d}.safetensors"
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata={"tandem_buffer": json.dumps(header)})
    tmp.rename(path)
    return path


HEADER_KEYS = ("format", "version", "height", "width", "prompts", "metadata")


def read_header(path: Path) -> Dict:
    """The JSON header of a shard; ConfigError for a corrupt or foreign file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("tandem_buffer")
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"buffer shard {path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if raw is None:
        raise ConfigError(f"buffer shard {path} is not a tandem buffer shard (no 'tandem_buffer' header)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"buffer shard {path}: its 'tandem_buffer' header is not valid JSON ({e.msg})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"buffer shard {path}: its 'tandem_buffer' header is not a JSON object")
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ConfigError(f"buffer shard {path}: format {header.get('format')} v{header.get('version')}, "
                          f"this tandem reads {FORMAT} v{VERSION}")
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise ConfigError(f"buffer shard {path}: header lacks {', '.join(missing)}; rewrite it with buffer.save: true")
    if not (isinstance(header["prompts"], list) and isinstance(header["metadata"], list)
            and len(header["prompts"]) == len(header["metadata"])
            and all(isinstance(p, str) for p in header["prompts"]) and all(isinstance(m, dict) for m in header["metadata"])):
        raise ConfigError(f"buffer shard {path}: header 'prompts' and 'metadata' must be lists of strings and "
                          f"objects of the same length")
    return header


def _payload(path: Path, header: Dict) -> Dict[str, np.ndarray]:
    """The shard's hand-off tensors: one non-negative integer row per sample (ConfigError otherwise)."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"buffer shard {path} is truncated or corrupt ({str(e).splitlines()[0]})") from None
    payload, n = {}, len(header["prompts"])
    for key in header.get("payload", ["full_tokens"]):
        if key not in tensors:
            raise ConfigError(f"buffer shard {path}: hand-off tensor '{key}' named in its header is missing")
        value = tensors[key]
        if value.dtype.is_floating_point or value.ndim < 1 or value.shape[0] != n or (value.numel() and int(value.min()) < 0):
            raise ConfigError(f"buffer shard {path}: '{key}' must hold {n} rows of non-negative ids, got "
                              f"{value.dtype} {tuple(value.shape)}")
        payload[key] = value.numpy()
    return payload


def load_buffer_records(run_or_buffer_dir: str, height: int, width: int, allowed_roots=()) -> List[PromptRecord]:
    """Every saved sample as a prompt record whose metadata carries its hand-off rows (e.g. ``full_tokens``).

    A sample's ``reference_path`` is read only inside the run folder or ``allowed_roots`` (``data.allowed_roots``)."""
    folder = Path(run_or_buffer_dir)
    folder = folder / "buffer" if (folder / "buffer").is_dir() else folder
    shards = sorted(folder.glob("shard_*.safetensors"))
    if not shards:
        raise ConfigError(f"decoder.buffer_dir: no buffer shards in {folder} (run the AR job with buffer.save: true)")
    roots = [folder.parent if folder.name == "buffer" else folder, *allowed_roots]
    records: List[PromptRecord] = []
    for path in shards:
        header = read_header(path)
        if (header["height"], header["width"]) != (height, width):
            raise ConfigError(f"buffer shard {path} holds {header['height']}x{header['width']} images; this job "
                              f"has data.height/width {height}x{width}")
        payload = _payload(path, header)
        for i, (prompt, meta) in enumerate(zip(header["prompts"], header["metadata"])):
            meta = dict(meta, **{k: v[i] for k, v in payload.items()})
            if "reference_path" in meta:
                ref = confined(Path(str(meta["reference_path"])), roots, f"buffer shard {path}: reference_path")
                meta["reference"] = load_image(ref, (height, width))
            records.append(PromptRecord(prompt, meta))
    return records


RECORDS_FORMAT = "tandem-records"


def save_records(path: Path, records: List[PromptRecord]) -> Path:
    """Write prompt records exactly (a stage's hand-off, kept in a checkpoint): one safetensors file whose header
    holds the prompts and the JSON values of each metadata, and whose tensors hold its arrays (token grids,
    source images), each distinct array once. ``load_records`` reads them back equal."""
    tensors: Dict[str, torch.Tensor] = {}
    names: Dict[int, str] = {}  # id(array) -> tensor name: the copies of a group share their source image
    metadata = []
    for r in records:
        meta = {}
        for key, value in r.metadata.items():
            if isinstance(value, np.ndarray):
                if id(value) not in names:
                    names[id(value)] = f"t{len(names)}"
                    tensors[names[id(value)]] = torch.from_numpy(value.copy())  # rows of one batch share memory
                meta[key] = {"tensor": names[id(value)]}
            else:
                meta[key] = {"value": value}
        metadata.append(meta)
    header = {"format": RECORDS_FORMAT, "prompts": [r.prompt for r in records], "metadata": metadata}
    save_file(tensors, str(path), metadata={"tandem_records": json.dumps(header)})
    return path


def load_records(path: Path) -> List[PromptRecord]:
    """The records ``save_records`` wrote to ``path``; ConfigError (one line) when it is unreadable."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["tandem_records"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path} is truncated or corrupt ({type(e).__name__}); use an earlier checkpoint") from None
    arrays = {name: t.numpy() for name, t in tensors.items()}
    return [PromptRecord(prompt, {k: arrays[v["tensor"]] if "tensor" in v else v["value"] for k, v in meta.items()})
            for prompt, meta in zip(header["prompts"], header["metadata"])]
