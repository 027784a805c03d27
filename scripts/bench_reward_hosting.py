"""Benchmark: OCR-score a batch of rendered text images through Ray reward actors and in-process.

    .venv/bin/python scripts/bench_reward_hosting.py [--num-images 64] [--size 512] [--replicas 2]
                                                     [--num-cpus 1.0] [--out runs/bench/reward_hosting.json]

Each backend is started (timed apart as start_s), warmed up on 2 images (RapidOCR loads its models on first
use), then scores the batch once (seconds, images/s). Prints a table and the Ray / in-process time ratio,
and writes the same figures as JSON. Both backends must return identical scores.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tandem.rewards.client import RewardClient
from tandem.rl.config import RewardEntry, RewardHostConfig

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
WORDS = ["OPEN", "coffee", "Station", "sale", "Library", "welcome", "42", "north", "river", "Bakery", "exit", "moon"]


def text_images(n: int, size: int, seed: int = 0):
    """n RGB images (size x size) with a two- or three-word caption on a light noisy background, and the texts."""
    rng = np.random.default_rng(seed)
    font = ImageFont.truetype(FONT, size // 10)
    images, texts = [], []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 4))))
        im = Image.fromarray(rng.integers(200, 256, size=(size, size, 3), dtype=np.uint8))
        ImageDraw.Draw(im).text((size // 12, int(rng.integers(size // 8, size * 3 // 4))), text, fill=(20, 20, 20), font=font)
        images.append(np.asarray(im))
        texts.append(text)
    return np.stack(images), texts


def run(host: RewardHostConfig, entry: RewardEntry, images: np.ndarray, texts):
    prompts, metadata = ["a sign"] * len(texts), [{"text": t} for t in texts]
    t0 = time.perf_counter()
    with RewardClient([entry], host) as client:
        client.score(images[:2], prompts[:2], metadata[:2]).result()  # warm-up: models load on first use
        t1 = time.perf_counter()
        scores = client.score(images, prompts, metadata).result()["ocr"]
        t2 = time.perf_counter()
    return {"start_s": t1 - t0, "seconds": t2 - t1, "images_per_s": len(images) / (t2 - t1)}, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--replicas", type=int, default=2, help="OCR actors on the Ray backend")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per OCR actor")
    ap.add_argument("--out", default="runs/bench/reward_hosting.json")
    args = ap.parse_args()

    images, texts = text_images(args.num_images, args.size)
    entry = RewardEntry(name="ocr", replicas=args.replicas, num_cpus=args.num_cpus)
    rows, scores = {}, {}
    for backend in ("local", "ray"):
        rows[backend], scores[backend] = run(RewardHostConfig(backend=backend), entry, images, texts)

    print(f"{'backend':<8} {'start_s':>8} {'seconds':>8} {'images/s':>9}")
    for backend, r in rows.items():
        print(f"{backend:<8} {r['start_s']:>8.2f} {r['seconds']:>8.2f} {r['images_per_s']:>9.2f}")
    ratio = rows["ray"]["seconds"] / rows["local"]["seconds"]
    same = bool(np.array_equal(scores["ray"], scores["local"], equal_nan=True))
    print(f"ray / local time: {ratio:.2f}   identical scores: {same}   mean OCR score: {np.nanmean(scores['local']):.3f}")

    result = {
        "reward": "ocr", "num_images": args.num_images, "size": args.size, "replicas": args.replicas,
        "num_cpus_per_actor": args.num_cpus, "cpu_count": os.cpu_count(), "backends": rows,
        "ray_over_local": ratio, "identical_scores": same, "mean_score": float(np.nanmean(scores["local"])),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
