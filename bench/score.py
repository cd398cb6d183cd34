"""Seconds per image of our batched deletion / insertion and pointing game against Quantus's
implementation of the same metric, on the same model, images, maps and masks. Prints the ratios.

* deletion: ours (``cxrlens.score.metrics.perturbation_curves``: every (image, step) perturbation
  built by one comparison of pixel ranks and stacked into large forward passes) against Quantus's
  ``PixelFlipping`` (one forward pass of the image batch per step) with the same number of steps and
  the same zero baseline. Quantus flips channel values, so it gets the map copied to the 3 channels
  and 3x the features per step: the same pixels removed at each step, the same forward passes.
* insertion: ours only (Quantus has no insertion curve); same work as deletion.
* pointing game: ``cxrlens.score.metrics.pointing_game`` against Quantus's ``PointingGame`` (both
  tolerance 0) on the lung masks of ``data/lungmasks``.

Timings alternate ours / theirs so both see the same machine load; the best of ``--repeats`` is kept.

Usage: python bench/score.py [--size 224] [--images 4] [--steps 24] [--repeats 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _machine import cpu_name  # bench/ is on sys.path when run as a script

from cxrlens.models import create_model
from cxrlens.score.masks import load_mask_set
from cxrlens.score.metrics import perturbation_curves, pointing_game
from cxrlens.testing import trained_like

ROOT = Path(__file__).resolve().parents[1]


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import quantus

    torch.manual_seed(0)
    masks = load_mask_set(ROOT / "data" / "lungmasks", args.size)
    images = masks.images[: args.images].contiguous()
    model = trained_like(create_model(args.model, 3), masks.images[args.images: args.images + 4])
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(len(images), 1, args.size, args.size, generator=generator)  # no ties
    targets = np.zeros(len(images), dtype=int)
    n_pixels = args.size * args.size
    per_step = 3 * n_pixels // args.steps  # Quantus's features (channel values) per step
    if 3 * n_pixels % args.steps or n_pixels % per_step:
        raise SystemExit(f"--steps must be a multiple of 3 dividing {3 * n_pixels}, so both sides take equal steps")
    print(f"CPU: {cpu_name()}; torch threads: {args.threads}; torch {torch.__version__}; quantus {quantus.__version__}")
    print(f"model {args.model} (random weights), {len(images)} real lungmasks images at {args.size} px, "
          f"{args.steps} steps, zero baseline, logits; best of {args.repeats}")

    results: dict[str, object] = {}

    def ours(mode: str, x: torch.Tensor = images, a: torch.Tensor = maps) -> None:
        results[mode] = perturbation_curves(model, x, a, [0], mode=mode, steps=args.steps, baseline=0.0,
                                            output="logit", max_batch=args.max_batch)

    metric = quantus.PixelFlipping(features_in_step=per_step, perturb_baseline=0.0, normalise=False, abs=False,
                                   disable_warnings=True)
    x_np, a_np = images.numpy(), maps.expand(-1, 3, -1, -1).numpy().copy()  # the same map on every channel

    def quantus_deletion() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results["quantus"] = metric(model=model, x_batch=x_np, y_batch=targets, a_batch=a_np, softmax=False,
                                        batch_size=len(images))

    ours("deletion", images[:1], maps[:1])  # warm-up (allocator, kernels)
    t_ours, t_theirs, t_ins = [], [], []
    for _ in range(args.repeats):  # alternate, so both see the same machine load
        t_ours.append(best_time(lambda: ours("deletion"), 1))
        t_theirs.append(best_time(quantus_deletion, 1))
        t_ins.append(best_time(lambda: ours("insertion"), 1))
    ours_del, theirs_del, ours_ins = min(t_ours), min(t_theirs), min(t_ins)
    curves = results["deletion"][:, 0, 1:].numpy()
    theirs = np.asarray(results["quantus"])
    n = len(images)
    print(f"deletion   ours {1000 * ours_del / n:8.1f} ms/image   quantus PixelFlipping {1000 * theirs_del / n:8.1f} "
          f"ms/image   quantus/ours = {theirs_del / ours_del:.2f}x")
    print(f"insertion  ours {1000 * ours_ins / n:8.1f} ms/image   (no Quantus counterpart)")
    print(f"           same curves: max |ours - quantus| = {np.abs(curves - theirs).max():.2g} logits "
          "(float noise: the two run the model on different batch sizes)")

    lung = masks.masks["lungs"]
    big_maps = torch.rand(len(lung), 1, args.size, args.size, generator=generator)
    point = quantus.PointingGame(disable_warnings=True, normalise=False)
    x_zero, y_zero = np.zeros((len(lung), 1, args.size, args.size)), np.zeros(len(lung), dtype=int)
    s_np, m_np = lung[:, None].numpy().astype(float), big_maps.numpy()

    def quantus_point() -> list:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return point(model=None, x_batch=x_zero, y_batch=y_zero, a_batch=m_np, s_batch=s_np)

    def ours_point() -> torch.Tensor:
        return pointing_game(big_maps, lung)

    ours_point()
    tp_ours = best_time(ours_point, max(3, args.repeats))
    tp_theirs = best_time(quantus_point, max(3, args.repeats))
    same = np.array_equal(ours_point()[:, 0].numpy(), np.asarray(quantus_point(), dtype=float))
    print(f"pointing   ours {1000 * tp_ours / len(lung):8.3f} ms/image   quantus PointingGame "
          f"{1000 * tp_theirs / len(lung):8.3f} ms/image   quantus/ours = {tp_theirs / tp_ours:.2f}x   "
          f"({len(lung)} images, identical results: {same})")


if __name__ == "__main__":
    main()
