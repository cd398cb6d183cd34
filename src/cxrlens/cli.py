"""Command line: a thin layer over the library; every command calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cxrlens.errors import CxrlensError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Train, ensemble and explain chest X-ray classifiers.",
)


@app.command()
def train(
    model: Annotated[
        str, typer.Option(help="resnet18, resnet34, inception_v3, inception_resnet_v2, densenet161")
    ] = "resnet18",
    data: Annotated[str, typer.Option(help="data folder or manifest (default: bundled data/cxr3)")] = "",
    out: Annotated[str, typer.Option(help="run folder to write")] = "runs/resnet18",
    taxonomy: Annotated[str, typer.Option(help="cxr3 or paper14")] = "cxr3",
    epochs: int = 20,
    image_size: int = 224,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    max_images: Annotated[int | None, typer.Option(help="use at most this many training images")] = None,
    seed: int = 1701,
    weights: Annotated[str | None, typer.Option(help="local pretrained weights (.safetensors or .pth)")] = None,
    precision: Annotated[str, typer.Option(help="32-true, bf16-mixed, 16-mixed")] = "32-true",
    devices: int = 1,
    accelerator: Annotated[str, typer.Option(help="auto, cpu, gpu")] = "auto",
    augment: Annotated[bool, typer.Option(help="X-ray-safe augmentation")] = True,
    schedule: Annotated[str, typer.Option(help="cosine or constant")] = "cosine",
    early_stopping: Annotated[int, typer.Option(help="patience in epochs; 0 = off")] = 0,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
) -> None:
    """Train one model and write a run folder (weights, config, history, thresholds)."""
    from cxrlens.models import get_spec
    from cxrlens.runs import TrainConfig
    from cxrlens.taxonomy import get_taxonomy
    from cxrlens.train import train as train_model

    get_spec(model)  # unknown names fail before any data is read
    get_taxonomy(taxonomy)
    if schedule not in ("cosine", "constant"):
        raise CxrlensError(f"--schedule must be cosine or constant, not '{schedule}'")
    config = TrainConfig(
        model=model,
        data=data,
        out=out,
        taxonomy=taxonomy,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        max_images=max_images,
        seed=seed,
        weights=weights,
        precision=precision,
        devices=devices,
        accelerator=accelerator,
        augment=augment,
        schedule=schedule,
        early_stopping=early_stopping,
    )
    run_dir = train_model(config, resume=resume)
    typer.echo(f"run written to {run_dir}")


@app.command()
def evaluate(
    run: Annotated[str, typer.Option(help="run folder")],
    data: Annotated[str | None, typer.Option(help="another data set (any supported manifest)")] = None,
    split: Annotated[str, typer.Option(help="split to evaluate; 'all' for every image")] = "test",
    threshold: Annotated[str, typer.Option(help="number, or 'tuned' for thresholds chosen on val")] = "0.51",
    out: Annotated[str | None, typer.Option(help="output folder (default RUN/eval-SPLIT)")] = None,
) -> None:
    """Per-class metrics of a run on a split, with plots."""
    from cxrlens.evaluate import evaluate_run

    metrics = evaluate_run(run, data, None if split == "all" else split, threshold, out)
    f1 = ", ".join(f"{c} {m['f1']:.3f}" for c, m in metrics["classes"].items())
    typer.echo(f"F1: {f1}; micro {metrics['micro']['f1']:.3f}, macro {metrics['macro']['f1']:.3f}")


@app.command()
def ensemble(
    runs: Annotated[list[str], typer.Option("--runs", help="run folders (repeat the option)")],
    vote: Annotated[str, typer.Option(help="soft, majority or both")] = "both",
    data: str | None = None,
    split: str = "test",
    threshold: str = "0.51",
    out: str = "runs/ensemble",
) -> None:
    """Evaluate the soft-vote and/or majority-vote ensemble of several runs."""
    from cxrlens.ensemble import VOTES, ensemble_runs

    votes = VOTES if vote == "both" else (vote,)
    results = ensemble_runs(runs, votes, data, None if split == "all" else split, threshold, out)
    for name, metrics in results.items():
        f1 = ", ".join(f"{c} {m['f1']:.3f}" for c, m in metrics["classes"].items())
        typer.echo(f"{name} vote F1: {f1}; written to {Path(out) / name}")


@app.command()
def split(
    data: Annotated[str, typer.Option(help="data folder or manifest")],
    out: Annotated[str, typer.Option(help="labels.csv to write (with a new split column)")],
    fractions: Annotated[str, typer.Option(help="e.g. 0.7,0.15,0.15 or 0.6,0.4")] = "0.7,0.15,0.15",
    names: Annotated[str, typer.Option(help="e.g. train,val,test or train,test")] = "train,val,test",
    seed: int = 0,
    taxonomy: str = "cxr3",
) -> None:
    """Write a manifest with a new patient-level split, stratified by class."""
    from cxrlens.data import load_manifest, patient_split, write_manifest
    from cxrlens.taxonomy import get_taxonomy

    try:
        parts = tuple(float(f) for f in fractions.split(","))
    except ValueError:
        raise CxrlensError(f"--fractions must be numbers separated by commas, not '{fractions}'") from None
    manifest = patient_split(load_manifest(data, get_taxonomy(taxonomy)), parts, tuple(names.split(",")), seed)
    write_manifest(manifest, out)
    typer.echo(f"{out}: {manifest.frame['split'].value_counts().to_dict()}")


@app.command()
def nap(
    run: Annotated[list[str], typer.Option("--run", help="run folder (repeat for several models)")],
    out: Annotated[str, typer.Option(help="output folder")],
    data: Annotated[str | None, typer.Option(help="data set (default: the first run's)")] = None,
    split: Annotated[str, typer.Option(help="split to profile; 'all' for every image")] = "test",
    layers: Annotated[str | None, typer.Option(help="comma-separated layer names (default: the study's)")] = None,
    groups: Annotated[
        str | None, typer.Option(help="'study', 'errors', or 'name=expr;name=expr' over class names (& | ~)")
    ] = None,
    gradient_weighted: Annotated[str | None, typer.Option(help="a class name: GradNAPs for that class")] = None,
    batch_size: int = 16,
) -> None:
    """Neuron Activation Profiles of one or more runs over a data set (arrays, statistics, figures)."""
    from cxrlens.data import load_manifest
    from cxrlens.nap import dead_share_lines, run_nap
    from cxrlens.runs import load_run

    runs = [load_run(r) for r in run]
    manifest = load_manifest(data or runs[0].config.data or None, runs[0].taxonomy).split(
        None if split == "all" else split
    )
    group_spec = groups if groups in (None, "study", "errors") else [g for g in groups.split(";") if g.strip()]
    result = run_nap(
        runs,
        manifest,
        out,
        layers=layers.split(",") if layers else None,
        groups=group_spec,
        batch_size=batch_size,
        gradient_weighted=gradient_weighted or False,
    )
    typer.echo("\n".join(dead_share_lines(result["stats"])))
    typer.echo(f"NAP arrays, nap_stats.json and figures written to {out}")


@app.command()
def explain(
    run: Annotated[list[str], typer.Option("--run", help="run folder (repeat for several models)")],
    out: Annotated[str, typer.Option(help="output folder")],
    image: Annotated[list[str] | None, typer.Option("--image", help="image file or folder (repeatable)")] = None,
    data: Annotated[str | None, typer.Option(help="instead of --image: a data set (manifest or folder)")] = None,
    split: Annotated[str, typer.Option(help="split of --data to explain; 'all' for every image")] = "test",
    max_images: Annotated[int, typer.Option(help="at most this many images of --data")] = 8,
    methods: Annotated[str, typer.Option(help="'all' or comma-separated names, e.g. occlusion,saliency")] = "all",
    targets: Annotated[str, typer.Option(help="all, positive (predicted by the soft vote) or class names")] = "all",
    output: Annotated[str, typer.Option(help="explain the sigmoid (the study's choice) or the logit")] = "sigmoid",
    max_batch: Annotated[int, typer.Option(help="perturbations / integration steps per forward pass")] = 16,
) -> None:
    """Attribution maps (.npy), overlays, grids and a JSON summary for images x models x methods x classes."""
    from cxrlens.explain_cli import explain_runs

    summary = explain_runs(run, out, image, data, None if split == "all" else split, max_images, methods, targets,
                           output, max_batch)
    typer.echo(f"explained {len(summary['images'])} image(s) with {len(summary['models'])} model(s); written to {out}")


@app.command()
def score(
    run: Annotated[list[str], typer.Option("--run", help="run folder (repeat for several models)")],
    out: Annotated[str, typer.Option(help="output folder")],
    masks: Annotated[str | None, typer.Option(help="folder of images + masks + masks.csv (default data/lungmasks)")] = (
        None
    ),
    methods: Annotated[str, typer.Option(help="comma-separated attribution methods")] = (
        "saliency,integrated_gradients,grad_cam"
    ),
    data: Annotated[str | None, typer.Option(help="data set for the shortcut detector (default: the runs')")] = None,
    max_images: Annotated[int | None, typer.Option(help="at most this many mask images")] = None,
) -> None:
    """Scorecard of models x methods (lung focus, faithfulness, sanity, robustness) and a shortcut detector."""
    from cxrlens.score import run_scorecard

    card = run_scorecard(run, masks, tuple(methods.split(",")), out, data=data, max_images=max_images, progress=True)
    for verdict in card.verdicts.values():
        typer.echo(verdict["summary"])
    typer.echo(f"scorecard written to {out}")


@app.command("shortcut-test")
def shortcut_test(
    out: Annotated[str, typer.Option(help="output folder (planted data, runs, tables, figures)")],
    data: Annotated[str, typer.Option(help="data folder or manifest (default: bundled data/cxr3)")] = "",
    cls: Annotated[str, typer.Option("--cls", help="the class whose images get the artifact")] = "COVID-19",
    artifact: Annotated[str, typer.Option(help="marker, patch, texture or padding")] = "marker",
    artifact_size: Annotated[float | None, typer.Option(help="share of the image's short side")] = None,
    band: Annotated[str | None, typer.Option(help="where: top, bottom, left, right, top-left, top-right, any; "
                                                   "padding: top-bottom, left-right, ...")] = None,
    contrast: Annotated[float, typer.Option(help="1 = the image's bright clip level")] = 1.0,
    text: Annotated[str, typer.Option(help="the marker's letters")] = "PORTABLE",
    rates: Annotated[str, typer.Option(help="shares of the class's train/val images planted, e.g. 0,0.5,1")] = (
        "0,0.5,1"
    ),
    other_rate: Annotated[float, typer.Option(help="share of the other images planted too")] = 0.0,
    model: Annotated[str, typer.Option(help="architecture trained per rate")] = "resnet18",
    epochs: int = 8,
    image_size: int = 128,
    batch_size: int = 16,
    max_images: Annotated[int | None, typer.Option(help="use at most this many training images")] = None,
    placement: Annotated[str, typer.Option(help="centre, or random: the image sits anywhere in the square while "
                                                "training (against the padding shortcut)")] = "centre",
    runs: Annotated[list[str] | None, typer.Option("--runs", help="existing run per rate, in order (repeat)")] = None,
    methods: Annotated[str, typer.Option(help="'all' or comma-separated attribution methods")] = "all",
    focus_images: Annotated[int, typer.Option(help="aligned test images explained")] = 24,
    detector: Annotated[bool, typer.Option(help="run the scorecard's shortcut detector on each model")] = True,
    thresholds: Annotated[str, typer.Option(help="detector calibration file (default: shipped)")] = "",
    seed: int = 0,
) -> None:
    """Plant a known shortcut, train a model per rate, and test reliance, every explanation method, NAPs
    and the shortcut detector against it."""
    from cxrlens.shortcut_test import ShortcutTestConfig, parse_rates, run_shortcut_test
    from cxrlens.shortcuts import ArtifactConfig

    config = ShortcutTestConfig(
        out=out, data=data, cls=cls, rates=parse_rates(rates), other_rate=other_rate, model=model, epochs=epochs,
        artifact=ArtifactConfig(kind=artifact, size=artifact_size, band=band, contrast=contrast, text=text),
        image_size=image_size, batch_size=batch_size, max_images=max_images, placement=placement,
        runs=tuple(runs or ()),
        methods=() if methods == "all" else tuple(m.strip() for m in methods.split(",") if m.strip()),
        focus_images=focus_images, detector=detector, thresholds=thresholds, seed=seed,
    )
    run_shortcut_test(config)
    typer.echo(f"shortcut test written to {out} (summary.md, shortcut_test.png, gallery.png)")


@app.command()
def report(
    runs: Annotated[list[str], typer.Option("--runs", help="run folders (repeat the option)")],
    out: Annotated[str, typer.Option(help="HTML file to write")] = "runs/report.html",
    data: Annotated[str | None, typer.Option(help="data set summarised (default: the runs')")] = None,
    ensemble: Annotated[str | None, typer.Option(help="folder written by `cxrlens ensemble`")] = None,
    explain: Annotated[str | None, typer.Option(help="folder written by `cxrlens explain`")] = None,
    nap: Annotated[str | None, typer.Option(help="folder written by `cxrlens nap`")] = None,
    score: Annotated[str | None, typer.Option(help="folder written by `cxrlens score`")] = None,
    shortcut: Annotated[str | None, typer.Option(help="folder written by `cxrlens shortcut-test`")] = None,
    ratings: Annotated[str | None, typer.Option(help="reader-study SQLite database of `cxrlens serve`")] = None,
    split: str = "test",
    title: str = "cxrlens report",
) -> None:
    """One self-contained HTML page with every result (images embedded, works offline)."""
    from cxrlens.report import build_report

    path = build_report(
        runs, out, data=data, ensemble_dir=ensemble, explain_dir=explain, nap_dir=nap, score_dir=score,
        ratings_db=ratings, split=split, title=title, shortcut_dir=shortcut,
    )
    typer.echo(f"report written to {path}")


@app.command()
def serve(
    runs: Annotated[list[str], typer.Option("--runs", help="run folders (repeat the option)")],
    data: Annotated[str | None, typer.Option(help="data set to browse (its test split)")] = None,
    host: Annotated[str, typer.Option(help="address to bind; loopback by default (the app has no login)")] = (
        "127.0.0.1"
    ),
    port: int = 8000,
    max_upload_mb: float = 20,
    ratings_db: Annotated[str, typer.Option(help="SQLite file for reader-study ratings")] = "runs/ratings.sqlite",
    threshold: Annotated[str, typer.Option(help="study (0.51), tuned, or a number")] = "study",
    study_methods: str = "grad_cam,integrated_gradients,guided_backprop",
    study_images: int = 24,
) -> None:
    """Web app: upload an X-ray, see every model's prediction and heat maps; browse; reader study."""
    from cxrlens.serve import serve as run_server

    run_server(
        runs, data=data, host=host, port=port, max_upload_mb=max_upload_mb, ratings_db=ratings_db,
        threshold=threshold, study_methods=tuple(study_methods.split(",")), study_images=study_images,
    )


@app.command()
def demo(
    out: str = "runs/demo",
    image_size: int = 128,
    epochs: int = 0,
    max_images: int | None = None,
    models: Annotated[str, typer.Option(help="comma-separated model names, or 'all'")] = "all",
) -> None:
    """Train all five models on the bundled data at a reduced size, evaluate, ensemble, explain."""
    from cxrlens.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=out, image_size=image_size, epochs=epochs or None, max_images=max_images, models=models))


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    try:
        app()
    except CxrlensError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except MemoryError:
        typer.echo("error: out of memory; lower --batch-size or --image-size", err=True)
        sys.exit(2)
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            typer.echo("error: out of memory on the device; lower --batch-size or --image-size", err=True)
            sys.exit(2)
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted; a training run can continue with --resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
