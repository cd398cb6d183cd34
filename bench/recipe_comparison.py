"""Is the default training recipe worth using? ResNet18 from scratch at 128 px on cxr3:

* baseline: a plain timm + PyTorch loop (Adam 1e-3, batch 8, no augmentation, 10 epochs, the epoch
  with the best validation loss, threshold 0.5), written out here so nothing of cxrlens is in it;
* cxrlens: ``cxrlens.train`` with its defaults (X-ray-safe augmentation, warm-up + cosine schedule,
  best epoch by validation loss) and per-class thresholds chosen on the validation split.

Both are scored on the test split with the same metric code. Prints a markdown table.
Usage: python bench/recipe_comparison.py [--epochs 20] [--size 128] [--out runs/recipe]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cxrlens.data import XrayDataset, load_manifest
from cxrlens.evaluate import compute_metrics, evaluate_run, markdown_table
from cxrlens.runs import TrainConfig
from cxrlens.train import train


def plain_timm_loop(size: int, epochs: int = 10, seed: int = 1701) -> np.ndarray:
    torch.manual_seed(seed)
    manifest = load_manifest()
    train_set = XrayDataset(manifest.split("train"), size)
    val_set, test_set = XrayDataset(manifest.split("val"), size), XrayDataset(manifest.split("test"), size)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    best, best_state = float("inf"), None
    for epoch in range(epochs):
        model.train()
        for images, targets in DataLoader(train_set, batch_size=8, shuffle=True):
            loss = F.binary_cross_entropy_with_logits(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = np.mean(
                [float(F.binary_cross_entropy_with_logits(model(x), y)) for x, y in DataLoader(val_set, batch_size=32)]
            )
        print(f"baseline epoch {epoch}: val loss {val_loss:.4f}", flush=True)
        if val_loss < best:
            best, best_state = val_loss, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        return torch.cat([torch.sigmoid(model(x)) for x, _ in DataLoader(test_set, batch_size=32)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the cxrlens recipe")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default="runs/recipe")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    classes = ["COVID-19", "Pneumonia", "Normal"]
    results, timings = {}, {}
    start = time.perf_counter()
    probs = plain_timm_loop(args.size)
    timings["baseline"] = time.perf_counter() - start
    test = load_manifest().split("test")
    results["plain timm loop (10 ep, no aug, thr 0.5)"] = compute_metrics(probs, test.targets, classes, 0.5)
    run_dir = out / "cxrlens-resnet18"
    start = time.perf_counter()
    if not (run_dir / "thresholds.json").is_file():
        train(TrainConfig(model="resnet18", out=str(run_dir), epochs=args.epochs, image_size=args.size), progress=False)
    timings["cxrlens"] = time.perf_counter() - start
    results[f"cxrlens recipe ({args.epochs} ep), thr 0.51"] = evaluate_run(run_dir, threshold=0.51, progress=False)
    results[f"cxrlens recipe ({args.epochs} ep), val-tuned thr"] = evaluate_run(
        run_dir, threshold="tuned", out=run_dir / "eval-test-tuned", progress=False
    )
    table = markdown_table(results, classes)
    print(f"\nResNet18 from scratch, {args.size} px, cxr3 test split (157 images), F1:\n\n{table}")
    print(json.dumps({k: round(v) for k, v in timings.items()}), "seconds")
    (out / "recipe_comparison.md").write_text(table)


if __name__ == "__main__":
    main()
