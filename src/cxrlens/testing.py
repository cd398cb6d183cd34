"""Models in a realistic untrained state, for tests and benchmarks.

A freshly built network is a poor stand-in for a trained one. timm initialises the last BatchNorm
weight of every residual block to zero, so an untrained ResNet's residual branches do nothing: most
input pixels get exactly zero gradient, maps of two random seeds look alike, and a broken backward
rule inside a block cannot show up in a test. Initial BatchNorm statistics (mean 0, variance 1) make
activations explode or vanish instead. :func:`trained_like` gives a model BatchNorm affine
parameters in the range trained CNNs have and running statistics measured on real images, so every
branch and every ReLU is exercised.
"""

from __future__ import annotations

import torch
from torch import nn


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``images`` (one forward pass in train
    mode, cumulative average), as training would; returns the model in eval mode."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: exactly this batch's statistics
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def trained_like(model: nn.Module, images: torch.Tensor, seed: int = 0) -> nn.Module:
    """BatchNorm weights drawn from U(0.3, 1.0) and biases from N(-0.05, 0.1) (the ranges of trained
    ResNets and DenseNets; none zero, so residual branches pass signal), then statistics calibrated on
    ``images`` (a few real X-rays, [N, 3, H, W]). Deterministic in ``seed``; returns the model in eval
    mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.7 + 0.3)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1 - 0.05)
    return calibrate_batchnorm(model, images)
