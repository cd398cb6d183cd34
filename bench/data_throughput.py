"""Does data loading keep the training step fed? Loader images/s against training-step images/s, on the same
machine, with and without the preprocessed image cache (``cxrlens train --cache DIR``).

The images are real X-rays of data/cxr3 written as NIH ChestX-ray14 ships them (1024 x 1024 8-bit PNG), so
decoding costs what it costs on the real collection. The loaders are exactly the training loaders
(``cxrlens.train.make_loaders``: decode, clip, resize, pad, X-ray-safe augmentation, batching) with the
in-memory cache off, as for a data set larger than memory. The step is a training step of a registry model
(forward, backward, Adam) on the device: CUDA when there is one, else the CPU. ratio = loader / step:
>= 1 means the loader is not the bottleneck (per loader worker; workers add up).

Usage: python bench/data_throughput.py [--model resnet18] [--size 224] [--batch 16] [--images 96] [--steps 4]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from _machine import cpu_name  # bench/ is on sys.path when run as a script
from PIL import Image

from cxrlens.data import load_manifest
from cxrlens.models import create_model
from cxrlens.runs import TrainConfig
from cxrlens.train import make_loaders

ROOT = Path(__file__).resolve().parents[1]


def nih_like(folder: Path, count: int) -> Path:
    """``count`` cxr3 training/validation X-rays as 1024 px 8-bit PNGs with a labels.csv (3 in 4 train)."""
    rows = pd.read_csv(ROOT / "data" / "cxr3" / "labels.csv", dtype=str, keep_default_na=False)
    rows = rows[rows["split"] == "train"].head(count).copy()
    (folder / "images").mkdir(parents=True)
    paths = []
    for i, path in enumerate(rows["path"]):
        image = Image.open(ROOT / "data" / "cxr3" / path).convert("L").resize((1024, 1024), Image.Resampling.BICUBIC)
        image.save(folder / "images" / f"{i:05d}.png")
        paths.append(f"images/{i:05d}.png")
    rows["path"] = paths
    rows["split"] = ["val" if i % 4 == 3 else "train" for i in range(len(rows))]
    rows.to_csv(folder / "labels.csv", index=False)
    return folder


def loader_rate(config: TrainConfig, data: Path) -> tuple[float, float]:
    """(images/s of one pass over the training loader, seconds spent building the cache first)."""
    started = time.perf_counter()
    train, _ = make_loaders(config, load_manifest(data), progress=False)
    built = time.perf_counter() - started
    seen, start = 0, time.perf_counter()
    for images, _targets in train:
        seen += len(images)
    return seen / (time.perf_counter() - start), built


def step_rate(model_name: str, size: int, batch: int, steps: int, device: torch.device) -> float:
    """Images/s of training steps (forward, backward, Adam) on a resident batch: the consumer's speed."""
    torch.manual_seed(0)
    model = create_model(model_name, 3).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    images = torch.rand(batch, 3, size, size, device=device)
    targets = torch.randint(0, 2, (batch, 3), device=device).float()
    for i in range(steps + 1):
        if i == 1:  # the first step warms up (allocator, kernels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        logits = model(images)
        logits = logits[0] if isinstance(logits, tuple) else logits
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=96, help="1024 px PNGs to write and load")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in the main process)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="cxrlens-throughput-"))
    try:
        data = nih_like(work / "data", args.images)
        base = dict(model=args.model, image_size=args.size, batch_size=args.batch, num_workers=args.workers)
        plain, _ = loader_rate(TrainConfig(**base), data)
        cache_config = TrainConfig(**base, cache=str(work / "cache"))
        _, build_seconds = loader_rate(cache_config, data)  # the first use builds the cache
        cached, _ = loader_rate(cache_config, data)  # later runs and epochs read it
        step = step_rate(args.model, args.size, args.batch, args.steps, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gpu = f", GPU {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    print(f"machine: {platform.machine()} {cpu_name()}{gpu}; torch {torch.__version__}, 1 thread, "
          f"{args.workers} loader workers; shared with other jobs")
    print(f"{args.model}, {args.size} px, batch {args.batch}; {args.images} real X-rays as 1024 px PNG; "
          f"training step on {device.type}")
    print("| | images/s | ratio loader / step |\n|---|---|---|")
    print(f"| training step ({device.type}) | {step:.1f} | |")
    print(f"| loader, decoding every image | {plain:.1f} | {plain / step:.2f} |")
    print(f"| loader, preprocessed cache | {cached:.1f} | {cached / step:.2f} |")
    print(f"cache built once in {build_seconds:.1f} s ({args.images / build_seconds:.1f} images/s, "
          f"{args.size * args.size / 1024:.0f} kB per image)")


if __name__ == "__main__":
    main()
