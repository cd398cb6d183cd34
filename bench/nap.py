"""How much does profiling cost? Images/s of the streaming NAP pass vs plain inference.

ResNet18 (untrained weights: the cost does not depend on them) at 128 px on ~64 real cxr3 test images,
preprocessed once into memory, batches of 16. The NAP pass hooks the study's five layers (maxpool,
layer1-4), folds every batch into the four default groups' float64 sums, min/max and map statistics,
and finishes (contrastive NAPs, distances, rankings); figures and files are not part of it. Runs
alternate and the best of ``--repeats`` is reported, so load from other processes hurts both alike.
Goal: ratio (NAP images/s / plain images/s) >= 0.8.
Usage: python bench/nap.py [--images 64] [--size 128] [--batch 16] [--repeats 7] [--gradient]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from cxrlens.data import XrayDataset, load_manifest
from cxrlens.models import create_model
from cxrlens.nap import NapConfig, compute_naps
from cxrlens.testing import trained_like


def load_images(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` test images, about a third per class, preprocessed once."""
    test = load_manifest().split("test")
    picks = []
    for cls in ("covid", "pneumonia", "normal"):
        picks += list(test.frame.index[test.frame["cls"] == cls][: -(-n // 3)])
    subset = test.select(np.isin(test.frame.index, picks[:n]))
    dataset = XrayDataset(subset, size)
    images, targets = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images).contiguous(), torch.stack(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--gradient", action="store_true", help="also time gradient-weighted NAPs")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    images, targets = load_images(args.images, args.size)
    batches = [(images[i : i + args.batch], targets[i : i + args.batch]) for i in range(0, len(images), args.batch)]
    model = trained_like(create_model("resnet18", 3), images[:8])
    classes = ("COVID-19", "Pneumonia", "Normal")

    def plain() -> None:
        with torch.inference_mode():
            for x, _ in batches:
                model(x)

    def nap(gradient: bool = False) -> None:
        compute_naps({"resnet18": model}, batches, classes, NapConfig(gradient_weighted=gradient, progress=False))

    passes = {"plain inference": plain, "NAP pass": nap}
    if args.gradient:
        passes["gradient-weighted NAP pass"] = lambda: nap(True)
    for run in passes.values():  # warm-up: oneDNN kernels, allocator
        run()
    wall: dict[str, list[float]] = {name: [] for name in passes}
    cpu: dict[str, list[float]] = {name: [] for name in passes}  # process CPU time: less hurt by other load
    for _ in range(args.repeats):
        for name, run in passes.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    n = len(images)
    print(f"resnet18, {n} real cxr3 images at {args.size} px, batch {args.batch}, "
          f"{torch.get_num_threads()} torch threads, best / median of {args.repeats} alternating runs, "
          f"load average before: {load_before:.1f}")
    print("| pass | images/s (best) | images/s (median) | ratio to plain (best) | images per CPU-s (best) | ratio |")
    print("|---|---|---|---|---|---|")
    best_plain, cpu_plain = n / min(wall["plain inference"]), n / min(cpu["plain inference"])
    for name in passes:
        best, median, per_cpu = n / min(wall[name]), n / statistics.median(wall[name]), n / min(cpu[name])
        print(f"| {name} | {best:.1f} | {median:.1f} | {best / best_plain:.2f} | {per_cpu:.1f} | "
              f"{per_cpu / cpu_plain:.2f} |")
    ratio = (n / min(wall["NAP pass"])) / best_plain
    print(f"NAP/plain throughput ratio: {ratio:.2f} (goal >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})")


if __name__ == "__main__":
    main()
