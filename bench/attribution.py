"""Time cxrlens.explain against Captum on the five registry CNNs, and check both give the same maps.

Models: the registry's architectures (3 classes, seeded, untrained, in a trained-looking state:
``cxrlens.testing.trained_like`` with BatchNorm statistics from four other X-rays), real chest X-rays,
3 target classes, sigmoid outputs (the study's setting). Captum is called once per target, as its API
requires, on the same model; cxrlens explains all targets in one call, as a user calls it (the model
as it is: the explainable rewrite happens on the first call and is cached, see ``first call`` below).
Both get the same batch size for perturbations, IG steps and noise samples, and both return the
convergence deltas of integrated gradients and DeepLIFT (cxrlens always does). Times are CPU seconds of
this process (robust to other jobs on a shared machine with one torch thread), best of ``--repeats``
runs that alternate between the two libraries after ``--warmup`` runs of each. The script sets the memory
allocator at start as the cxrlens CLI does (``cxrlens.runtime.keep_freed_memory``: glibc keeps freed memory),
so it measures what the CLI runs; Captum, in the same process, gets the same allocator. ``CXRLENS_MALLOC=system``
measures with glibc's defaults. The machine line says which was used.

Three modes:

    python bench/attribution.py --all-models --batch 1 --threads 1     # method x architecture table, 224 px
    python bench/attribution.py --all-models --batch 16 --threads 1 --ig-steps 2 --smoothgrad-samples 2
    python bench/attribution.py --study --threads 1                    # occlusion at the study's setting
    python bench/attribution.py --rss --threads 1                      # peak memory of 512 px sweeps

``--study``: 512 px, window 50, stride 4, 3 classes (13,456 windows per image and class). A full sweep
is too long for a CPU benchmark, so every library is timed on the same number of windows: cxrlens
(exact, approximate) and a plain brute-force loop (one sweep for all classes) on a band of
consecutive windows of the study's grid in the middle of the image (where incremental boxes are
largest: no border clips them), Captum per class on its own sweep with a larger stride that has the
same number of windows (its cost per window does not depend on where the window is). Reported:
seconds per window, ratios, the projected full sweep and the checks (exact = brute force, the
approximate mode's measured error).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _machine import cpu_name  # bench/ is on sys.path when run as a script
from torch import nn

from cxrlens.explain import attribute
from cxrlens.explain.occlusion import Approximation, Runner, occluded_copy, sweep_grid, window_starts
from cxrlens.explain.rewrite import explainable
from cxrlens.models import MODELS, create_model
from cxrlens.runtime import keep_freed_memory
from cxrlens.testing import trained_like

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = ("resnet18", "resnet34", "inception_v3", "inception_resnet_v2", "densenet161")
METHOD_NAMES = ("occlusion", "saliency", "input_x_gradient", "guided_backprop", "integrated_gradients",
                "deeplift", "grad_cam", "guided_grad_cam", "smoothgrad")
TARGETS = [0, 1, 2]
STUDY = {"size": 512, "window": 50, "stride": 4}
MALLOC = keep_freed_memory()  # before any tensor exists, as the CLI does; applies to Captum too (same process)


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


def build(name: str, size: int, batch: int) -> tuple[nn.Module, torch.Tensor]:
    """A registry model in a trained-looking state (statistics from 4 other X-rays) and ``batch`` X-rays.

    Its classifier is scaled so that its logits lie within +-2 on these X-rays and on noisy copies of the
    explained ones (SmoothGrad's inputs), as a trained classifier's would: untrained InceptionV3 gives
    logits of +-20 and more, its sigmoid outputs saturate and every gradient method's maps are ~0 (exactly
    0 under SmoothGrad's noise), which would make any two implementations look equal."""
    torch.manual_seed(0)
    images = load_xrays(size, batch + 4)
    model = trained_like(create_model(name, num_classes=3), images[batch:])
    noisy = images[:batch] + 0.15 * torch.randn(images[:batch].shape, generator=torch.Generator().manual_seed(1))
    head = model.get_classifier()
    with torch.no_grad():
        scale = float(torch.cat([model(images), model(noisy)]).abs().max()) / 2
        if scale > 1:
            head.weight /= scale
            head.bias /= scale
    return model, images[:batch]


def warm_up(model: nn.Module, x: torch.Tensor) -> None:
    """One forward and backward pass at this batch size: oneDNN builds its kernels for each new shape."""
    leaf = x.clone().requires_grad_(True)
    torch.autograd.grad(model(leaf).sum(), leaf)


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    started, started_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.process_time() - started_cpu, time.perf_counter() - started, result


def alternate(fns: dict[str, Callable[[], object]], repeats: int,
              warmup: int) -> dict[str, tuple[float, float, object]]:
    """Best CPU and wall seconds of each function and its last result, runs alternating between them."""
    best: dict[str, tuple[float, float, object]] = {}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            cpu, wall, result = timed(fn)
            if round_ >= warmup and (name not in best or cpu < best[name][0]):
                best[name] = (cpu, wall, result)
    return best


def machine() -> str:
    import captum

    return (f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch "
            f"{torch.__version__}, captum {captum.__version__}, load average {os.getloadavg()[0]:.1f} at the start; "
            f"allocator (both libraries): {MALLOC.reason}")


# --- method x architecture ---------------------------------------------------------------------------

def captum_runs(model: nn.Module, name: str, x: torch.Tensor, args: argparse.Namespace) -> dict:
    """Captum, one call per target; returns per-channel maps [B, T, C, H, W] like cxrlens."""
    import captum.attr as ca

    f = nn.Sequential(model, nn.Sigmoid()).eval()
    layer = model.get_submodule(MODELS[name].gradcam_layer)
    w, s = args.occlusion_window, args.occlusion_stride

    def per_target(call: Callable[[int], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: torch.stack([call(t).detach() for t in TARGETS], 1)

    def grad_cam(t: int) -> torch.Tensor:
        cam = ca.LayerGradCam(f, layer).attribute(x, target=t, relu_attributions=True)
        return ca.LayerAttribution.interpolate(cam, x.shape[2:])

    return {
        "occlusion": per_target(lambda t: ca.Occlusion(f).attribute(
            x, target=t, sliding_window_shapes=(3, w, w), strides=(3, s, s), baselines=0.0,
            perturbations_per_eval=args.max_batch)),
        "saliency": per_target(lambda t: ca.Saliency(f).attribute(x, target=t)),
        "input_x_gradient": per_target(lambda t: ca.InputXGradient(f).attribute(x, target=t)),
        "guided_backprop": per_target(lambda t: ca.GuidedBackprop(f).attribute(x, target=t)),
        # cxrlens returns IG's and DeepLIFT's convergence deltas: Captum is asked for them too (same outputs).
        "integrated_gradients": per_target(lambda t: ca.IntegratedGradients(f).attribute(
            x, target=t, n_steps=args.ig_steps, internal_batch_size=args.max_batch,
            return_convergence_delta=True)[0]),
        "deeplift": per_target(lambda t: ca.DeepLift(f).attribute(x, target=t, return_convergence_delta=True)[0]),
        "grad_cam": per_target(grad_cam),
        "guided_grad_cam": per_target(lambda t: ca.GuidedGradCam(f, layer).attribute(x, target=t)),
        "smoothgrad": per_target(lambda t: ca.NoiseTunnel(ca.Saliency(f)).attribute(
            x, target=t, nt_type="smoothgrad", nt_samples=args.smoothgrad_samples, stdevs=0.15,
            nt_samples_batch_size=args.max_batch)),
    }


def our_params(method: str, name: str, args: argparse.Namespace) -> dict:
    layer = MODELS[name].gradcam_layer
    return {
        "occlusion": {"window": args.occlusion_window, "stride": args.occlusion_stride},
        "integrated_gradients": {"n_steps": args.ig_steps},
        # Captum is given the layer and upsamples with "nearest": the same here, to compare maps.
        "grad_cam": {"interpolate": "nearest", "layer": layer},
        "guided_grad_cam": {"interpolate": "nearest", "layer": layer},
        "smoothgrad": {"n_samples": args.smoothgrad_samples, "stdev": 0.15},
    }.get(method, {})


def completeness(model: nn.Module, x: torch.Tensor, maps: torch.Tensor) -> float:
    """DeepLIFT's summation-to-delta: largest |sum of attributions - (f(x) - f(0))| over images and targets,
    relative to the largest |f(x) - f(0)|."""
    with torch.no_grad():
        ends = torch.sigmoid(model(torch.cat([x, torch.zeros_like(x)])))[:, TARGETS]
    expected = ends[: len(x)] - ends[len(x):]
    return float((maps.flatten(2).sum(2) - expected).abs().max() / expected.abs().max())


def check(method: str, model: nn.Module, x: torch.Tensor, ours: torch.Tensor, reference: torch.Tensor) -> str:
    difference = float((ours.expand_as(reference) - reference).abs().max() / reference.abs().max())
    if method == "smoothgrad":
        return f"{difference:.1e} (different noise draws)"
    if method == "deeplift" and difference > 1e-4:
        return (f"{difference:.1e}: Captum's max-pool rule (a ReLU feeding a max-pool, overlapping windows: "
                f"see tests); summation-to-delta error ours {completeness(model, x, ours):.0e}, Captum "
                f"{completeness(model, x, reference):.0e}")
    return f"{difference:.1e} {'ok' if difference <= 1e-4 else 'DIFFERS'}"


def method_row(name: str, method: str, model: nn.Module, x: torch.Tensor, captum: dict,
               args: argparse.Namespace) -> dict:
    params = our_params(method, name, args)
    meta: dict = {}

    def ours() -> torch.Tensor:
        result = attribute(model, x, TARGETS, method=method, per_channel=True, max_batch=args.max_batch,
                           model_name=name, **params)
        meta.update(result.meta)
        return result.channel_maps

    note = ""
    try:
        best = alternate({"captum": captum[method], "ours": ours}, args.repeats, args.warmup)
    except Exception as exc:  # noqa: BLE001 - Captum failing is a finding: time ours alone and say so
        note = f"Captum fails: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        best = alternate({"ours": ours}, args.repeats, args.warmup)
        return {"method": method, "captum": float("nan"), "ours": best["ours"][0], "check": note}
    if meta.get("occlusion_plan"):
        note = f"; {meta['occlusion_plan']}"
    return {"method": method, "captum": best["captum"][0], "ours": best["ours"][0],
            "check": check(method, model, x, best["ours"][2], best["captum"][2]) + note}


def gradient_table(args: argparse.Namespace) -> None:
    methods = [m for m in args.methods if not (m == "occlusion" and args.batch > 1)]
    print(f"machine: {machine()}")
    print(f"{args.size} px, batch {args.batch}, targets {TARGETS}, sigmoid output; best of {args.repeats} CPU times "
          f"(alternating, after {args.warmup} warm-up run(s) each); occlusion window {args.occlusion_window} stride "
          f"{args.occlusion_stride}{' (batch 1 only)' if args.batch > 1 else ''}, IG {args.ig_steps} steps "
          f"(Gauss-Legendre), SmoothGrad {args.smoothgrad_samples} samples, max batch {args.max_batch}\n", flush=True)
    rows: dict[str, list[dict]] = {}
    for name in args.models:
        model, x = build(name, args.size, args.batch)
        started = time.process_time()
        explainable(model, x[:1])  # what the first call that needs the rewrite does; later calls find it cached
        print(f"{name}: explainable rewrite {time.process_time() - started:.2f} s (paid by the first call that "
              "needs it, then cached)", flush=True)
        warm_up(model, x)
        captum = captum_runs(model, name, x, args)
        rows[name] = []
        for method in methods:
            row = method_row(name, method, model, x, captum, args)
            rows[name].append(row)
            print(f"  {method}: Captum {row['captum']:.3f} s, cxrlens {row['ours']:.3f} s, "
                  f"{row['captum'] / row['ours']:.2f}x, {row['check']}", flush=True)
    print("\n| method | " + " | ".join(args.models) + " |")
    print("|---|" + "---:|" * len(args.models))
    for i, method in enumerate(methods):
        cells = [f"{rows[n][i]['captum'] / rows[n][i]['ours']:.2f}x" for n in args.models]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print("\n| model | method | Captum (s) | cxrlens (s) | Captum / cxrlens | max rel. difference |")
    print("|---|---|---:|---:|---:|---|")
    for name in args.models:
        for row in rows[name]:
            print(f"| {name} | {row['method']} | {row['captum']:.3f} | {row['ours']:.3f} | "
                  f"{row['captum'] / row['ours']:.2f}x | {row['check']} |")


# --- occlusion at the study's setting ------------------------------------------------------------------

def band(starts: list[int], k: int) -> list[int]:
    """``k`` consecutive window positions in the middle of the grid."""
    first = (len(starts) - k) // 2
    return starts[first: first + k]


def captum_stride(size: int, window: int, k: int) -> int:
    """The smallest stride whose sweep has ``k`` windows per side (Captum needs stride <= window)."""
    stride = next(s for s in range(1, size) if len(window_starts(size, window, s)) <= k)
    if len(window_starts(size, window, stride)) != k or stride > window:
        raise SystemExit(f"no Captum sweep has {k} windows per side at window {window}; choose another --band")
    return stride


def brute_force(runner: Runner, x: torch.Tensor, windows: list[tuple[int, int]], size: tuple[int, int],
                max_batch: int) -> torch.Tensor:
    """The plain loop: occluded copies, a forward pass per batch, all classes at once."""
    base = torch.zeros_like(x[0])
    with torch.inference_mode():
        batches = [windows[i: i + max_batch] for i in range(0, len(windows), max_batch)]
        return torch.cat([runner.full(torch.stack([occluded_copy(x[0], base, w, size) for w in batch]))
                          for batch in batches])


def study_row(name: str, args: argparse.Namespace) -> dict:
    import captum.attr as ca

    size, window, stride = STUDY["size"], STUDY["window"], STUDY["stride"]
    model, x = build(name, size, 1)
    k = args.band
    captum_targets = TARGETS if name.startswith("resnet") else TARGETS[: args.captum_classes_heavy]
    ys = band(window_starts(size, window, stride), k)
    windows = [(y0, x0) for y0 in ys for x0 in ys]
    runner = Runner(model, lambda out: torch.sigmoid(out)[:, TARGETS])
    base = torch.zeros_like(x)
    f = nn.Sequential(model, nn.Sigmoid()).eval()
    step = captum_stride(size, window, k)

    def ours(approximation: Approximation | None) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return sweep_grid(runner, x, base, ys, ys, (window, window), args.max_batch,
                                  approximation=approximation)
        return run

    def captum(t: int) -> Callable[[], object]:
        return lambda: ca.Occlusion(f).attribute(x, target=t, sliding_window_shapes=(3, window, window),
                                                 strides=(3, step, step), baselines=0.0,
                                                 perturbations_per_eval=args.max_batch)

    fns = {"brute": lambda: brute_force(runner, x, windows, (window, window), args.max_batch),
           "exact": ours(None), "approximate": ours(Approximation("grid")),
           **{f"captum{t}": captum(t) for t in captum_targets}}
    best = alternate(fns, args.repeats, 0)
    exact, approximate, brute = best["exact"][2], best["approximate"][2], best["brute"][2]
    drops = exact.scores[0][:, None, None] - brute.T.reshape(3, k, k)
    error = max(e for report in approximate.errors for e in report["map_error_relative"])
    # Captum sweeps once per class, each the same work: classes not timed (heavy models) count as the mean.
    per_class = [best[f"captum{t}"][0] for t in captum_targets]
    return {"name": name, "windows": len(windows), "captum_stride": step, "captum_classes": len(captum_targets),
            "captum": sum(per_class) / len(per_class) * len(TARGETS),
            "brute": best["brute"][0], "exact": best["exact"][0], "approximate": best["approximate"][0],
            "plan_seconds": exact.plan.cpu_seconds, "plan": exact.plan.reason,
            "approximate_plan": approximate.plan.reason,
            "approximate_once": approximate.plan.cpu_seconds + approximate.check_cpu_seconds,
            "exact_error": float((exact.drops[0] - drops).abs().max()), "approximate_error": error}


def study(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    print(f"study setting: {STUDY['size']} px, window {STUDY['window']}, stride {STUDY['stride']} "
          f"({len(window_starts(512, 50, 4)) ** 2} windows per image), 3 classes, max batch {args.max_batch}; "
          f"band of {args.band}x{args.band} windows; CPU seconds, best of {args.repeats}\n", flush=True)
    full = len(window_starts(512, 50, 4)) ** 2
    rows = []
    for name in args.models:
        row = study_row(name, args)
        rows.append(row)
        n = row["windows"]
        print(f"{name}: {n} windows; Captum {row['captum']:.1f} s (3 classes, each a sweep of {n} windows at stride "
              f"{row['captum_stride']}; {row['captum_classes']} of them timed), "
              f"brute force {row['brute']:.1f} s, exact {row['exact']:.1f} s (planning {row['plan_seconds']:.1f} s), "
              f"approximate {row['approximate']:.1f} s (planning and error check {row['approximate_once']:.1f} s); "
              f"exact - brute force {row['exact_error']:.1e}; approximate "
              f"map error {row['approximate_error']:.1%} of the largest map value\n  plan: {row['plan']}\n"
              f"  approximate: {row['approximate_plan']}", flush=True)
    print("\nPer window: the sweep itself (one-off costs excluded: cxrlens's planning, approximate mode's error "
          "check). Full sweep: the projected time of all windows of the study's grid, one-off costs included.\n")
    print("| model | Captum, 3 classes (s/window) | brute force (s/window) | cxrlens exact (s/window) "
          "| approximate (s/window) | exact vs Captum | exact vs brute force | approximate vs Captum "
          "| full sweep: Captum / exact | full sweep: Captum / approximate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n = r["windows"]
        captum, brute = r["captum"] / n, r["brute"] / n
        exact = (r["exact"] - r["plan_seconds"]) / n
        approximate = (r["approximate"] - r["approximate_once"]) / n
        full_exact = r["plan_seconds"] + exact * full
        full_approximate = r["approximate_once"] + approximate * full
        print(f"| {r['name']} | {captum:.3f} | {brute:.3f} | {exact:.4f} | {approximate:.4f} | "
              f"**{captum / exact:.1f}x** | {brute / exact:.1f}x | {captum / approximate:.1f}x | "
              f"{captum * full / full_exact:.1f}x | {captum * full / full_approximate:.1f}x |")


# --- memory ------------------------------------------------------------------------------------------

def rss_probe(name: str, mode: str, max_batch: int) -> None:
    """Peak RSS (MiB) before and after one 512 px occlusion sweep (36 windows of the study's window), printed
    as one line. (BatchNorm statistics from 224 px X-rays here, so that calibrating does not set the peak.)"""
    torch.manual_seed(0)
    model = trained_like(create_model(name, num_classes=3), load_xrays(224, 5)[1:])
    x = load_xrays(STUDY["size"], 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    attribute(model, x, TARGETS, method="occlusion", window=STUDY["window"], stride=104, max_batch=max_batch,
              incremental=mode == "exact")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{before:.0f} {peak:.0f}")


def rss_table(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}\n")
    print("Peak RSS in MiB (in brackets: above the process before the sweep: Python, torch, the model)\n")
    print("| model | before the sweep | exact, max batch 16 (default) | exact, max batch 4 "
          "| brute force, max batch 16 |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models:
        cells = []
        for mode, max_batch in (("exact", 16), ("exact", 4), ("brute", 16)):
            out = subprocess.run([sys.executable, __file__, "--rss-probe", name, mode, str(max_batch), "--threads",
                                  str(args.threads or 1)], capture_output=True, text=True, check=True).stdout
            before, peak = (float(v) for v in out.split()[-2:])
            cells.append(f"{peak:.0f} (+{peak - before:.0f})")
        print(f"| {name} | {before:.0f} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all-models", action="store_true", help="method x architecture table")
    parser.add_argument("--study", action="store_true", help="occlusion at 512 px, window 50, stride 4")
    parser.add_argument("--rss", action="store_true", help="peak memory of 512 px occlusion sweeps")
    parser.add_argument("--rss-probe", nargs=3, metavar=("MODEL", "MODE", "MAX_BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=None, choices=ARCHITECTURES)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--occlusion-window", type=int, default=56)
    parser.add_argument("--occlusion-stride", type=int, default=28)
    parser.add_argument("--ig-steps", type=int, default=8)
    parser.add_argument("--smoothgrad-samples", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=16, help="perturbations / IG steps per forward pass")
    parser.add_argument("--band", type=int, default=11, help="study: band side in windows")
    parser.add_argument("--captum-classes-heavy", type=int, default=1,
                        help="study: Captum classes timed on the non-ResNets (the others count as their mean)")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Captum's notes about hooks and requires_grad
    if args.rss_probe:
        name, mode, max_batch = args.rss_probe
        return rss_probe(name, mode, int(max_batch))
    args.models = args.models or (list(ARCHITECTURES) if args.all_models or args.study or args.rss else ["resnet18"])
    if args.study:
        study(args)
    elif args.rss:
        rss_table(args)
    else:
        gradient_table(args)


if __name__ == "__main__":
    main()
