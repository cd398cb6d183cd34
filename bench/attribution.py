"""Time cxrlens.explain against Captum, method by method, and check both give the same maps.

ResNet18 from the registry (3 classes, seeded, untrained, BatchNorm statistics set from four other
X-rays so that activations look like a trained network's), one real chest X-ray (224 px by default),
3 target classes, batch 1, sigmoid outputs (the study's setting). Captum is run once per target, as
its users must, on the same model; cxrlens explains all targets in one call, on the model rewritten
once by ``make_explainable``. Both get the same batch size for perturbations, IG steps and noise
samples. Each timing is the best of ``--repeats`` runs after one warm-up run, both as wall-clock
time and as CPU time of this process (the latter is robust to other jobs on a shared machine when
``--threads 1``).

    .venv/bin/python bench/attribution.py --size 224 --repeats 2

Prints a markdown table: seconds per method for each library, the speed-ups (Captum / cxrlens) and
the largest difference between the two maps relative to the largest Captum value.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _machine import cpu_name  # bench/ is on sys.path when run as a script
from torch import nn

from cxrlens.explain import attribute, make_explainable
from cxrlens.models import create_model
from cxrlens.testing import trained_like

ROOT = Path(__file__).resolve().parents[1]
METHOD_NAMES = ("occlusion", "saliency", "input_x_gradient", "guided_backprop", "integrated_gradients",
                "deeplift", "grad_cam", "guided_grad_cam", "smoothgrad")


def load_xrays(size: int, n: int) -> torch.Tensor:
    """The first ``n`` bundled X-rays, resized, grey repeated to 3 channels, in [0, 1]: [n, 3, size, size]."""
    from PIL import Image

    for folder in (ROOT / "data" / "cxr3" / "images", Path("/work/shared/data/cxr3/images")):
        paths = sorted(folder.glob("*.jpg"))[:n] if folder.is_dir() else []
        if len(paths) == n:
            arrays = [np.asarray(Image.open(p).convert("L").resize((size, size), Image.BICUBIC), dtype=np.float32)
                      for p in paths]
            return torch.from_numpy(np.stack(arrays) / 255.0)[:, None].repeat(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=generator)


def best_time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, float, torch.Tensor]:
    """Best wall-clock and best CPU seconds over ``repeats`` runs, and the last result."""
    result = fn()  # warm-up: oneDNN builds its kernels for each new shape on first use
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return min(wall), min(cpu), result


def captum_runs(model: nn.Module, x: torch.Tensor, targets: list[int], args: argparse.Namespace) -> dict:
    """Captum, one call per target; returns per-channel maps [B, T, C, H, W] like cxrlens."""
    import captum.attr as ca

    f = nn.Sequential(model, nn.Sigmoid()).eval()
    w, s = args.occlusion_window, args.occlusion_stride

    def per_target(call: Callable[[int], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: torch.stack([call(t).detach() for t in targets], 1)

    def grad_cam(t: int) -> torch.Tensor:
        cam = ca.LayerGradCam(f, model.layer4).attribute(x, target=t, relu_attributions=True)
        return ca.LayerAttribution.interpolate(cam, x.shape[2:])

    return {
        "occlusion": per_target(lambda t: ca.Occlusion(f).attribute(
            x, target=t, sliding_window_shapes=(3, w, w), strides=(3, s, s), baselines=0.0,
            perturbations_per_eval=args.max_batch)),
        "saliency": per_target(lambda t: ca.Saliency(f).attribute(x, target=t)),
        "input_x_gradient": per_target(lambda t: ca.InputXGradient(f).attribute(x, target=t)),
        "guided_backprop": per_target(lambda t: ca.GuidedBackprop(f).attribute(x, target=t)),
        "integrated_gradients": per_target(lambda t: ca.IntegratedGradients(f).attribute(
            x, target=t, n_steps=args.ig_steps, internal_batch_size=args.max_batch)),
        "deeplift": per_target(lambda t: ca.DeepLift(f).attribute(x, target=t)),
        "grad_cam": per_target(grad_cam),
        "guided_grad_cam": per_target(lambda t: ca.GuidedGradCam(f, model.layer4).attribute(x, target=t)),
        "smoothgrad": per_target(lambda t: ca.NoiseTunnel(ca.Saliency(f)).attribute(
            x, target=t, nt_type="smoothgrad", nt_samples=args.smoothgrad_samples, stdevs=0.15,
            nt_samples_batch_size=args.max_batch)),
    }


def our_params(method: str, args: argparse.Namespace) -> dict:
    return {
        "occlusion": {"window": args.occlusion_window, "stride": args.occlusion_stride},
        "integrated_gradients": {"n_steps": args.ig_steps},
        # Captum is given the layer and upsamples with "nearest": the same here, to compare maps.
        "grad_cam": {"interpolate": "nearest", "layer": "layer4"},
        "guided_grad_cam": {"interpolate": "nearest", "layer": "layer4"},
        "smoothgrad": {"n_samples": args.smoothgrad_samples, "stdev": 0.15},
    }.get(method, {})


def machine() -> str:
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--occlusion-window", type=int, default=32)
    parser.add_argument("--occlusion-stride", type=int, default=16)
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--smoothgrad-samples", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16, help="perturbations / IG steps per forward pass")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Captum's notes about hooks and requires_grad

    torch.manual_seed(0)
    images = load_xrays(args.size, 5)
    model = trained_like(create_model("resnet18", num_classes=3), images[1:])
    x = images[:1]
    targets = [0, 1, 2]
    started = time.perf_counter()
    explainable = make_explainable(model, x)
    rewrite_seconds = time.perf_counter() - started
    captum = captum_runs(model, x, targets, args)
    captum_on_rewritten = captum_runs(explainable, x, targets, args)

    print(f"machine: {machine()}")
    print(f"ResNet18, {args.size} px, batch 1, targets {targets}, sigmoid output, best of {args.repeats}; "
          f"occlusion window {args.occlusion_window} stride {args.occlusion_stride}, IG {args.ig_steps} steps "
          f"(Gauss-Legendre), SmoothGrad {args.smoothgrad_samples} samples, max batch {args.max_batch}; "
          f"make_explainable once: {rewrite_seconds:.2f} s\n")
    print("| method | Captum wall (s) | cxrlens wall (s) | speed-up wall | Captum CPU (s) | cxrlens CPU (s) "
          "| speed-up CPU | max rel. difference |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for method in args.methods:
        meta: dict = {}

        def ours_call(m: str = method, meta: dict = meta) -> torch.Tensor:
            result = attribute(explainable, x, targets, method=m, per_channel=True, max_batch=args.max_batch,
                               **our_params(m, args))
            meta.update(result.meta)
            return result.channel_maps

        ours_wall, ours_cpu, ours = best_time(ours_call, args.repeats)
        note = ""
        if meta.get("incremental_layer"):
            note = f" (incremental, cut at {meta['incremental_layer']})"
        try:
            captum_wall, captum_cpu, reference = best_time(captum[method], args.repeats)
        except Exception as exc:  # e.g. hooks on the original model: use the rewritten one
            note += f" (Captum needed the rewritten model: {type(exc).__name__})"
            captum_wall, captum_cpu, reference = best_time(captum_on_rewritten[method], args.repeats)
        difference = float((ours.expand_as(reference) - reference).abs().max() / reference.abs().max())
        if method == "smoothgrad":
            check = f"{difference:.1e} (different noise draws)"
        elif method == "deeplift" and difference > 1e-4:
            check = f"{difference:.1e} (Captum's ReLU-to-max-pool and max-pool rules; see tests)"
        else:
            check = f"{difference:.1e} {'ok' if difference <= 1e-4 else 'DIFFERS'}"
        print(f"| {method} | {captum_wall:.3f} | {ours_wall:.3f} | {captum_wall / ours_wall:.2f}x "
              f"| {captum_cpu:.3f} | {ours_cpu:.3f} | {captum_cpu / ours_cpu:.2f}x | {check}{note} |", flush=True)


if __name__ == "__main__":
    main()
