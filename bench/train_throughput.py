"""Images/s of a cxrlens training step against a plain PyTorch loop on the same timm model, batch and
image size, measured in one run, alternating so both see the same machine load. Prints the ratio.

Usage: python bench/train_throughput.py [--model resnet18] [--size 128] [--batch 16] [--steps 30]
"""

from __future__ import annotations

import argparse
import platform
import time

import lightning as L
import timm
import torch
import torch.nn.functional as F
from _machine import cpu_name  # bench/ is on sys.path when run as a script
from torch.utils.data import DataLoader, TensorDataset

from cxrlens.data import XrayDataset, load_manifest
from cxrlens.runs import TrainConfig
from cxrlens.train import Classifier


def real_images(size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = XrayDataset(load_manifest().split("train").head(n), size)
    images, targets = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images).contiguous(), torch.stack(targets)


def plain_loop(model_name: str, loader: DataLoader, epochs: int) -> float:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    seen, start = 0, None
    for epoch in range(epochs + 1):
        if epoch == 1:  # the first epoch warms up (allocator, kernels), as for Lightning below
            seen, start = 0, time.perf_counter()
        for images, targets in loader:
            loss = F.binary_cross_entropy_with_logits(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(images)
    return seen / (time.perf_counter() - start)


class Throughput(L.Callback):
    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == 1:
            self.seen, self.start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.current_epoch >= 1:
            self.seen += len(batch[0])

    def on_train_end(self, trainer, module):
        self.rate = self.seen / (time.perf_counter() - self.start)


def cxrlens_loop(model_name: str, loader: DataLoader, epochs: int) -> float:
    torch.manual_seed(0)
    config = TrainConfig(model=model_name, epochs=epochs + 1, schedule="constant")
    meter = Throughput()
    trainer = L.Trainer(
        max_epochs=epochs + 1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[meter],
        limit_val_batches=0,
    )
    trainer.fit(Classifier(config, steps_per_epoch=len(loader)), loader)
    return meter.rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, targets = real_images(args.size, args.images)
    loader = DataLoader(TensorDataset(images, targets), batch_size=args.batch, shuffle=True, drop_last=True)
    plain, ours = [], []
    for _ in range(args.rounds):  # interleaved so drifting machine load hits both equally
        plain.append(plain_loop(args.model, loader, args.epochs))
        ours.append(cxrlens_loop(args.model, loader, args.epochs))
    print(f"machine: {platform.machine()} {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.model}, {args.size} px, batch {args.batch}, {args.images} real images x {args.epochs} epochs")
    print(f"plain PyTorch loop: {max(plain):.1f} img/s (runs: {', '.join(f'{p:.1f}' for p in plain)})")
    print(f"cxrlens (Lightning): {max(ours):.1f} img/s (runs: {', '.join(f'{p:.1f}' for p in ours)})")
    print(f"ratio cxrlens / plain: {max(ours) / max(plain):.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
