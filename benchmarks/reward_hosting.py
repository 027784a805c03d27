"""Benchmark: OCR-score a batch of rendered text images through Ray reward actors and in-process.

    .venv/bin/python -m benchmarks.reward_hosting [--num-images 64] [--size 512] [--replicas 2]
                                                  [--num-cpus 1.0] [--out runs/bench/reward_hosting.json]
    .venv/bin/python -m benchmarks.reward_hosting --tiny     # smoke test: 4 images of 128², one actor

Each backend is started (timed apart as start_s), warmed up on 2 images (RapidOCR loads its models on first
use), then scores the batch once (seconds, images/s). Prints a table and the Ray / in-process time ratio,
and writes the same figures as JSON. Both backends must return identical scores.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from benchmarks import common as C
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


def score_batch(host: RewardHostConfig, entry: RewardEntry, images: np.ndarray, texts):
    prompts, metadata = ["a sign"] * len(texts), [{"text": t} for t in texts]
    t0 = time.perf_counter()
    with RewardClient([entry], host) as client:
        client.score(images[:2], prompts[:2], metadata[:2]).result()  # warm-up: models load on first use
        t1 = time.perf_counter()
        scores = client.score(images, prompts, metadata).result()["ocr"]
        t2 = time.perf_counter()
    return {"start_s": t1 - t0, "seconds": t2 - t1, "images_per_s": len(images) / (t2 - t1)}, scores


def arguments(ap) -> None:
    ap.add_argument("--num-images", type=int, default=None, help="images scored (default 64; tiny 4)")
    ap.add_argument("--size", type=int, default=None, help="image height = width (default 512; tiny 128)")
    ap.add_argument("--replicas", type=int, default=None, help="OCR actors on the Ray backend (default 2; tiny 1)")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per OCR actor")


def run(bench: C.Bench) -> None:
    args = bench.args
    bench.default("num_images", 64, 4)
    bench.default("size", 512, 128)
    bench.default("replicas", 2, 1)
    images, texts = text_images(args.num_images, args.size)
    entry = RewardEntry(name="ocr", replicas=args.replicas, num_cpus=args.num_cpus)
    rows, scores = {}, {}
    for backend in ("local", "ray"):
        rows[backend], scores[backend] = score_batch(RewardHostConfig(backend=backend), entry, images, texts)
    C.print_table("OCR scoring", [dict(backend=b, **r) for b, r in rows.items()], [
        ("backend", "backend", ""), ("start_s", "start_s", ".2f"), ("seconds", "seconds", ".2f"),
        ("images/s", "images_per_s", ".2f")])
    ratio = rows["ray"]["seconds"] / rows["local"]["seconds"]
    same = bool(np.array_equal(scores["ray"], scores["local"], equal_nan=True))
    print(f"ray / local time: {ratio:.2f}   identical scores: {same}   mean OCR score: {np.nanmean(scores['local']):.3f}")
    for key, value in dict(reward="ocr", cpu_count=os.cpu_count(), backends=rows, ray_over_local=ratio,
                           identical_scores=same, mean_score=float(np.nanmean(scores["local"]))).items():
        bench.results.set(key, value)


def main(argv=None) -> int:
    return C.main("reward_hosting", __doc__, arguments, run, argv, device=None, dtype=False)


if __name__ == "__main__":
    sys.exit(main())
