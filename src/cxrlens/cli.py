"""Command line: a thin layer over the library; every command calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cxrlens.errors import CxrlensError
from cxrlens.runs import TrainConfig

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Train, ensemble and explain chest X-ray classifiers.",
)


# Defaults of `train` live in TrainConfig: every option is None unless given, so `--resume` knows what was given.
_TRAIN = TrainConfig()


def _default(name: str) -> str:
    value = getattr(_TRAIN, name)
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None or value == "" else str(value)


@app.command()
def train(
    model: Annotated[
        str | None,
        typer.Option(
            help="a registered architecture (list them with `cxrlens models`)", show_default=_default("model")
        ),
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="data folder or manifest (default: bundled data/cxr3)", show_default=False)
    ] = None,
    out: Annotated[str | None, typer.Option(help="run folder to write", show_default=_default("out"))] = None,
    taxonomy: Annotated[str | None, typer.Option(help="cxr3 or paper14", show_default=_default("taxonomy"))] = None,
    epochs: Annotated[int | None, typer.Option(show_default=_default("epochs"))] = None,
    image_size: Annotated[int | None, typer.Option(show_default=_default("image_size"))] = None,
    batch_size: Annotated[int | None, typer.Option(show_default=_default("batch_size"))] = None,
    lr: Annotated[float | None, typer.Option(show_default=_default("lr"))] = None,
    weight_decay: Annotated[float | None, typer.Option(show_default=_default("weight_decay"))] = None,
    max_images: Annotated[int | None, typer.Option(help="use at most this many training images")] = None,
    seed: Annotated[int | None, typer.Option(show_default=_default("seed"))] = None,
    weights: Annotated[str | None, typer.Option(help="local pretrained weights (.safetensors or .pth)")] = None,
    precision: Annotated[
        str | None, typer.Option(help="32-true, bf16-mixed, 16-mixed", show_default=_default("precision"))
    ] = None,
    devices: Annotated[int | None, typer.Option(show_default=_default("devices"))] = None,
    accelerator: Annotated[str | None, typer.Option(help="auto, cpu, gpu", show_default=_default("accelerator"))] = (
        None
    ),
    augment: Annotated[bool | None, typer.Option(help="X-ray-safe augmentation", show_default=_default("augment"))] = (
        None
    ),
    schedule: Annotated[str | None, typer.Option(help="cosine or constant", show_default=_default("schedule"))] = None,
    early_stopping: Annotated[
        int | None, typer.Option(help="patience in epochs; 0 = off", show_default=_default("early_stopping"))
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(help="also save resume.ckpt every N steps; 0 = at epoch ends", show_default=_default(
            "checkpoint_every")),
    ] = None,
    allow_leaks: Annotated[
        bool | None, typer.Option("--allow-leaks", help="train although splits share images or patients (recorded)")
    ] = None,
    skip_missing: Annotated[
        bool | None, typer.Option("--skip-missing", help="train without rows whose image is missing (recorded)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out with its saved settings")] = False,
) -> None:
    """Train one model and write a run folder (weights, config, history, thresholds, resume.ckpt)."""
    from cxrlens.train import resume_config
    from cxrlens.train import train as train_model

    given = {k: v for k, v in locals().items() if k in _TRAIN.__dict__ and v is not None}
    if resume:
        config = resume_config(given.get("out", _TRAIN.out), given)
    else:
        config = TrainConfig.validate({**_TRAIN.__dict__, **given}, options=True)
    run_dir = train_model(config, resume=resume)
    typer.echo(f"run written to {run_dir}")


@app.command()
def evaluate(
    run: Annotated[str, typer.Option(help="run folder")],
    data: Annotated[str | None, typer.Option(help="another data set (any supported manifest)")] = None,
    split: Annotated[str, typer.Option(help="split to evaluate; 'all' for every image")] = "test",
    threshold: Annotated[str, typer.Option(help="number, or 'tuned' for thresholds chosen on val")] = "0.51",
    out: Annotated[str | None, typer.Option(help="output folder (default RUN/eval-SPLIT)")] = None,
    allow_leaks: Annotated[
        bool, typer.Option("--allow-leaks", help="evaluate although the images overlap the training data")
    ] = False,
) -> None:
    """Per-class metrics of a run on a split, with plots."""
    from cxrlens.evaluate import evaluate_run

    metrics = evaluate_run(run, data, None if split == "all" else split, threshold, out, allow_leaks=allow_leaks)
    f1 = ", ".join(f"{c} {m['f1']:.3f}" for c, m in metrics["classes"].items())
    typer.echo(f"F1: {f1}; micro {metrics['micro']['f1']:.3f}, macro {metrics['macro']['f1']:.3f}")


@app.command("check-data")
def check_data(
    data: Annotated[str | None, typer.Option(help="data folder or manifest (default: bundled data/cxr3)")] = None,
    out: Annotated[str | None, typer.Option(help="folder for audit.json and audit.md")] = None,
    taxonomy: str = "cxr3",
) -> None:
    """Audit a data set: counts per split and class, missing/unreadable files, duplicates, leaks, image sizes."""
    from cxrlens.audit import audit_data, audit_summary, write_audit

    audit = audit_data(data, taxonomy)
    typer.echo(audit_summary(audit))
    if out:
        typer.echo(f"audit written to {write_audit(audit, out)}")


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
    skip_missing: Annotated[bool, typer.Option("--skip-missing", help="leave out rows whose image is missing")] = (
        False
    ),
) -> None:
    """Write a manifest with a new patient-level split, stratified by class."""
    from cxrlens.data import load_manifest, patient_split, write_manifest
    from cxrlens.taxonomy import get_taxonomy

    try:
        parts = tuple(float(f) for f in fractions.split(","))
    except ValueError:
        raise CxrlensError(f"--fractions must be numbers separated by commas, not '{fractions}'") from None
    manifest = load_manifest(data, get_taxonomy(taxonomy), missing="skip" if skip_missing else "error")
    left_out = f"; {len(manifest.missing)} rows with a missing image left out" if manifest.missing else ""
    manifest = patient_split(manifest, parts, tuple(names.split(",")), seed)
    write_manifest(manifest, out)
    typer.echo(f"{out}: {manifest.frame['split'].value_counts().to_dict()}{left_out}")


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
    from cxrlens.nap import NapConfig, dead_share_lines, run_nap
    from cxrlens.runs import load_run

    runs = [load_run(r) for r in run]
    manifest = load_manifest(data or runs[0].config.data or None, runs[0].taxonomy).split(
        None if split == "all" else split
    )
    config = NapConfig(
        layers=layers.split(",") if layers else None,
        groups=groups if groups in (None, "study", "errors") else [g for g in groups.split(";") if g.strip()],
        batch_size=batch_size,
        gradient_weighted=gradient_weighted or False,
    )
    result = run_nap(runs, manifest, out, config)
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
    approximate: Annotated[bool, typer.Option(
        "--approximate", help="occlusion: sweep one window position in 2 per axis and interpolate the others "
        "(about 4x faster); its error, measured against exact outputs, is in the JSON summary")] = False,
) -> None:
    """Attribution maps (.npy), overlays, grids, a JSON summary and config.json for images x models x methods x
    classes."""
    from cxrlens.explain.config import ExplainConfig, ExplainSettings, parse_methods
    from cxrlens.explain_cli import explain_runs

    chosen = parse_methods(methods)
    if approximate:
        if "occlusion" not in chosen:
            raise CxrlensError("--approximate applies to occlusion; add occlusion to --methods or drop --approximate")
        chosen["occlusion"]["approximate"] = True
    config = ExplainConfig(
        runs=run, out=out, images=image or [], data=data, split=None if split == "all" else split,
        max_images=max_images, methods=chosen, targets=targets,
        settings=ExplainSettings(output=output, max_batch=max_batch),
    )
    summary = explain_runs(config)
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
    from cxrlens.score import ScoreConfig, run_scorecard

    config = ScoreConfig(masks=masks, methods=methods.split(","), data=data, max_images=max_images, progress=True)
    card = run_scorecard(run, out, config)
    for verdict in card.verdicts.values():
        typer.echo(verdict["summary"])
    typer.echo(f"scorecard written to {out}")


@app.command()
def report(
    runs: Annotated[list[str], typer.Option("--runs", help="run folders (repeat the option)")],
    out: Annotated[str, typer.Option(help="HTML file to write")] = "runs/report.html",
    data: Annotated[str | None, typer.Option(help="data set summarised (default: the runs')")] = None,
    ensemble: Annotated[str | None, typer.Option(help="folder written by `cxrlens ensemble`")] = None,
    explain: Annotated[str | None, typer.Option(help="folder written by `cxrlens explain`")] = None,
    nap: Annotated[str | None, typer.Option(help="folder written by `cxrlens nap`")] = None,
    score: Annotated[str | None, typer.Option(help="folder written by `cxrlens score`")] = None,
    ratings: Annotated[str | None, typer.Option(help="reader-study SQLite database of `cxrlens serve`")] = None,
    split: str = "test",
    title: str = "cxrlens report",
) -> None:
    """One self-contained HTML page with every result (images embedded, works offline)."""
    from cxrlens.report import build_report

    path = build_report(
        runs, out, data=data, ensemble_dir=ensemble, explain_dir=explain, nap_dir=nap, score_dir=score,
        ratings_db=ratings, split=split, title=title,
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
    allowed_host: Annotated[list[str] | None, typer.Option(
        "--allowed-host", help="a host name clients use besides the loopback names (repeat the option)")] = None,
) -> None:
    """Web app: upload an X-ray, see every model's prediction and heat maps; browse; reader study."""
    from cxrlens.serve import serve as run_server

    run_server(
        runs, data=data, host=host, port=port, max_upload_mb=max_upload_mb, ratings_db=ratings_db,
        threshold=threshold, study_methods=tuple(study_methods.split(",")), study_images=study_images,
        allowed_hosts=tuple(allowed_host or ()),
    )


@app.command()
def demo(
    out: str = "runs/demo",
    image_size: int = 128,
    epochs: int = 0,
    max_images: int | None = None,
    models: Annotated[str, typer.Option(help="comma-separated names (see `cxrlens models`), or 'all'")] = "all",
) -> None:
    """Train every registered model on the bundled data at a reduced size, evaluate, ensemble, explain."""
    from cxrlens.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=out, image_size=image_size, epochs=epochs or None, max_images=max_images, models=models))


@app.command("models")
def list_models() -> None:
    """The registered architectures, one name per line (what --model and the Makefile accept)."""
    from cxrlens.models import model_names

    typer.echo("\n".join(model_names()))


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
