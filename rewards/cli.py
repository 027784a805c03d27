"""``tandem rewards`` and ``tandem score``; rl/cli.py parses the arguments and turns ConfigError into exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from tandem.rewards.base import check_entries, list_rewards, resolve
from tandem.rewards.client import RewardClient
from tandem.core.errors import ConfigError
from tandem.rewards.config import RewardEntry, RewardHostConfig
from tandem.core.data import load_image, load_prompts
from tandem.core.types import PromptRecord

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def cmd_rewards() -> int:
    """One line per registered reward or installed plugin: name, groupwise flag, one-line doc."""
    for name, doc in list_rewards():
        flag = "groupwise" if resolve(name).groupwise else ""
        print(f"{name:<22} {flag:<9} {doc}")
    return 0


def _image_files(images_dir: str) -> Dict[str, Path]:
    folder = Path(images_dir)
    if not folder.is_dir():
        raise ConfigError(f"images folder not found: {images_dir} (pass --images with a folder of .png/.jpg files)")
    files = {p.name: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not files:
        raise ConfigError(f"no .png/.jpg images in {images_dir}")
    return files


def _pair(files: Dict[str, Path], records: List[PromptRecord], images_dir: str, prompts_file: str) -> List[tuple]:
    """(file name, path, record) per image: by the records' "image" field, else by sorted file name order."""
    named = [r for r in records if "image" in r.metadata]
    if named and len(named) != len(records):
        raise ConfigError(f"{prompts_file}: give an 'image' field on every line or on none")
    if named:
        missing = [r.metadata["image"] for r in records if r.metadata["image"] not in files]
        if missing:
            raise ConfigError(f"{prompts_file}: image '{missing[0]}' is not in {images_dir}")
        return sorted(((r.metadata["image"], files[r.metadata["image"]], r) for r in records), key=lambda t: t[0])
    if len(records) != len(files):
        raise ConfigError(
            f"{prompts_file} has {len(records)} prompts for {len(files)} images in {images_dir}; "
            "give one prompt per image (in sorted file-name order) or an 'image' field per line"
        )
    return [(name, path, r) for (name, path), r in zip(files.items(), records)]


def _entry(spec: str, args: Dict) -> RewardEntry:
    return RewardEntry(fn=spec, args=args) if ":" in spec else RewardEntry(name=spec, args=args)


def _json_score(value: float):
    return None if math.isnan(value) else value


def _attach_sources(pairs: List[tuple], sources_dir: str) -> None:
    """Set each record's ``reference`` to the image of the same file name in ``sources_dir`` (edit sources)."""
    sources = _image_files(sources_dir)
    missing = [name for name, _, _ in pairs if name not in sources]
    if missing:
        raise ConfigError(f"--sources {sources_dir} has no source image named {missing[0]} (one per scored image, same file name)")
    for name, _, record in pairs:
        record.metadata["reference"] = load_image(sources[name])


def cmd_score(reward_specs: List[str], images_dir: str, prompts_file: str, backend: str = "local",
              reward_args: Optional[List[Dict]] = None, sources_dir: Optional[str] = None) -> int:
    """Score every image of ``images_dir`` with the rewards; print one JSON object per image on stdout:
    {"image", "prompt", <reward>: score or null, "<reward>/<detail>": ... (a reward's info, e.g. "ocr/read")}.

    ``reward_args[i]`` are the args of ``reward_specs[i]`` (missing = none). Prompt file: .txt (one prompt per
    line, in sorted image-name order) or .jsonl ({"prompt", "text"?, "reference"? (a path), "image"? (a file
    name in images_dir)}). ``sources_dir``: edited images' source images, matched by file name, handed to the
    rewards as ``reference`` (replacing the file's). Images of different sizes are scored in separate batches.
    Bad input raises ConfigError (one line).
    """
    reward_args = list(reward_args or [])
    entries = [_entry(spec, reward_args[i] if i < len(reward_args) else {}) for i, spec in enumerate(reward_specs)]
    check_entries(entries, key="--reward")  # unknown name, bad import path, missing weights: before anything starts
    pairs = _pair(_image_files(images_dir), load_prompts(prompts_file), images_dir, prompts_file)
    if sources_dir is not None:
        _attach_sources(pairs, sources_dir)
    images = [load_image(path) for _, path, _ in pairs]
    by_shape: Dict[tuple, List[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)

    with RewardClient(entries, RewardHostConfig(backend=backend)) as client:
        futures = [
            (idx, client.score(np.stack([images[i] for i in idx]), [pairs[i][2].prompt for i in idx], [pairs[i][2].metadata for i in idx]))
            for idx in by_shape.values()
        ]
        rows: Dict[int, dict] = {}
        for idx, future in futures:
            scores = future.result()
            for k, i in enumerate(idx):
                rows[i] = {}
                for name in scores.names:
                    rows[i][name] = _json_score(float(scores[name][k]))
                    rows[i].update({f"{name}/{key}": value for key, value in scores.info[name][k].items()})
    for i, (name, _, record) in enumerate(pairs):
        print(json.dumps({"image": name, "prompt": record.prompt, **rows[i]}, ensure_ascii=False))
    return 0
