"""Data-set-scale explain, NAP and score on 1 vs 2 processes: images/s, and what N devices would take.

Real cxr3 test images (and data/lungmasks images for the scorecard) at ``--size`` px, ResNet18 with
BatchNorm as after training (``cxrlens.testing.trained_like``), one torch thread per process. Each stage
runs once on one process (here) and once on two gloo processes started by ``cxrlens.distributed.launch``:

* explain --store, saliency and occlusion (chunks of ``--chunk`` images, all three classes);
* nap (the study's five ResNet layers, default groups, batches of ``--chunk``);
* score (saliency on the mask images, blocks of ``--chunk``, shortcut probe off).

A stage's time runs from a barrier before it to a barrier after it on every process (the start-up of the
second process, i.e. importing torch, is reported apart). CPU-seconds per image, summed over the
processes, do not depend on what else runs on the machine, so the sharing overhead is judged on them:
efficiency = CPU-s per image on 1 process / CPU-s per image on 2. The projection for N processes assumes
each has a core (or GPU) of its own: time = images x (cost per image on one) / (N x efficiency), the
cost being CPU-s per image on CPUs and wall seconds per image on a GPU (``--accelerator gpu``).

Usage: python bench/scale.py [--images 16] [--size 128] [--chunk 4] [--window 32] [--accelerator cpu|gpu]
       [--devices 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from _machine import cpu_name

from cxrlens import distributed
from cxrlens.data import load_image_tensor
from cxrlens.explain.config import ExplainConfig
from cxrlens.explain.job import explain_runs
from cxrlens.models import create_model
from cxrlens.nap import NapConfig, NapJob, run_nap_job
from cxrlens.runs import TrainConfig, save_model_weights
from cxrlens.score import ScoreConfig, run_scorecard
from cxrlens.testing import trained_like

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("explain saliency", "explain occlusion", "nap", "score saliency")


def _timed(fn, args: tuple, kwargs: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all processes) of one stage."""
    distributed.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    cpu = time.process_time() - cpu
    distributed.barrier()
    return time.perf_counter() - wall, sum(distributed.gather(cpu))


def _stages(calls: list) -> list[tuple[float, float]]:
    """What every process runs (module level: it pickles by name)."""
    return [_timed(fn, args, kwargs) for fn, args, kwargs in calls]


def _setup(folder: Path, images: int, size: int) -> tuple[Path, Path]:
    frame = pd.read_csv(ROOT / "data" / "cxr3" / "labels.csv", dtype=str, keep_default_na=False)
    test = frame[frame["split"] == "test"]
    pick = pd.concat([test[test["cls"] == c].head(-(-images // 3)) for c in ("covid", "pneumonia", "normal")])
    pick = pick.sort_index().head(images).assign(path=lambda f: [str(ROOT / "data" / "cxr3" / p) for p in f["path"]])
    labels = folder / "labels.csv"
    pick.to_csv(labels, index=False)
    torch.manual_seed(0)
    model = trained_like(create_model("resnet18", 3), torch.stack([load_image_tensor(p, size) for p in pick["path"]]))
    run = folder / "r18"
    run.mkdir()
    TrainConfig(model="resnet18", image_size=size, out=str(run), data=str(labels)).save(run)
    save_model_weights(model, run / "best.safetensors")
    return labels, run


def _calls(folder: Path, labels: Path, run: Path, args: argparse.Namespace) -> list:
    def store(method: str, params: dict) -> ExplainConfig:
        return ExplainConfig(runs=[str(run)], out=str(folder / method), data=str(labels), split=None,
                             max_images=None, methods={method: params}, store=True, chunk_size=args.chunk)

    score = ScoreConfig(masks=str(ROOT / "data" / "lungmasks"), methods=["saliency"], max_images=args.images,
                        shortcut=False, block_size=args.chunk, steps=10, sanity_images=2, sanity_steps=2,
                        robustness_images=2, robustness_samples=2, bootstrap=100)
    return [
        (explain_runs, (store("saliency", {}),), {"progress": False}),
        (explain_runs, (store("occlusion", {"window": args.window, "stride": args.window // 2}),), {"progress": False}),
        (run_nap_job, (NapJob([str(run)], str(folder / "nap"), str(labels), None,
                              NapConfig(batch_size=args.chunk, figures=False, progress=False)),), {}),
        (run_scorecard, ([str(run)], str(folder / "score"), score), {}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=4, help="images per chunk / batch / block")
    parser.add_argument("--window", type=int, default=32, help="occlusion window (stride: half of it)")
    parser.add_argument("--accelerator", default="cpu", help="cpu, or gpu: one GPU per process")
    parser.add_argument("--devices", type=int, default=2, help="processes of the parallel run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        labels, run = _setup(Path(tmp), args.images, args.size)
        one = distributed.launch(_stages, _calls(Path(tmp) / "one", labels, run, args),
                                 launch=distributed.Launch(accelerator=args.accelerator, threads=1))
        started = time.perf_counter()
        many = distributed.launch(_stages, _calls(Path(tmp) / "many", labels, run, args),
                                  launch=distributed.Launch(devices=args.devices, accelerator=args.accelerator,
                                                            threads=1))
        startup = time.perf_counter() - started - sum(wall for wall, _ in many)
    _print(args, one, many, startup, load_before)


def _print(args: argparse.Namespace, one: list, many: list, startup: float, load_before: float) -> None:
    k = args.devices
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.accelerator}, one thread "
          f"per process, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
    print(f"{args.images} images at {args.size} px, chunks / batches / blocks of {args.chunk}, occlusion window "
          f"{args.window} stride {args.window // 2}; the other processes took {startup:.1f} s to start (import "
          "torch, join the group)\n")
    print(f"| stage | 1 process: s | img/s | {k} processes: s | img/s | speed-up | CPU-s/img, 1 | CPU-s/img, {k} | "
          "efficiency | 100k images, 8 processes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    n = args.images
    for name, (w1, c1), (w2, c2) in zip(STAGES, one, many, strict=True):
        efficiency = c1 / c2  # work lost to sharing: per-image CPU time, which load on the machine does not change
        cost = c1 / n if args.accelerator == "cpu" else w1 / n  # on GPUs the wall time per image is the cost
        hours = 100_000 * cost / (8 * efficiency) / 3600
        print(f"| {name} | {w1:.2f} | {n / w1:.1f} | {w2:.2f} | {n / w2:.1f} | {w1 / w2:.2f}x | {c1 / n:.3f} | "
              f"{c2 / n:.3f} | {efficiency:.2f} | {hours:.1f} h |")


if __name__ == "__main__":
    main()
