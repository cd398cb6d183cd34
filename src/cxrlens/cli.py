"""Command line: a thin layer over the library; every command calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cxrlens.errors import CxrlensError
from cxrlens.runs import TrainConfig
from cxrlens.runtime import keep_freed_memory

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Train, ensemble and explain chest X-ray classifiers.",
)


# Defaults of `train` live in TrainConfig: every option is None unless given, so `--resume` knows what was given.
_TRAIN = TrainConfig()

# How a data set is read (cxrlens.datasets.ReadOptions), shared by the commands that read one.
FormatOption = Annotated[str, typer.Option(
    "--format", help="data set layout: auto (detected), labels, cohen, folders, nih, chexpert, mimic, rsna, vindr, "
    "covidx")]
ViewsOption = Annotated[str, typer.Option(help="frontal, lateral, all, or view codes such as PA,AP")]
UncertainOption = Annotated[str, typer.Option(help="CheXpert/MIMIC uncertain labels: ignore, zeros or ones")]
RatersOption = Annotated[str, typer.Option(help="VinDr-CXR radiologists: majority or any")]
TAXONOMY_HELP = "cxr3, paper14, nih14, chexpert14 or vindr"


def _read_options(data_format: str, views: str, uncertain: str, raters: str):
    from cxrlens.datasets import ReadOptions

    return ReadOptions(data_format, views, uncertain, raters)


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
    taxonomy: Annotated[str | None, typer.Option(help=TAXONOMY_HELP, show_default=_default("taxonomy"))] = None,
    data_format: Annotated[str | None, typer.Option(
        "--format", help="data set layout (auto: detected; see `cxrlens formats`)", show_default=_default(
            "data_format"))] = None,
    views: Annotated[str | None, typer.Option(help="frontal, lateral, all, or view codes such as PA,AP",
                                              show_default=_default("views"))] = None,
    uncertain: Annotated[str | None, typer.Option(help="CheXpert/MIMIC uncertain labels: ignore, zeros, ones",
                                                  show_default=_default("uncertain"))] = None,
    raters: Annotated[str | None, typer.Option(help="VinDr-CXR radiologists: majority or any",
                                               show_default=_default("raters"))] = None,
    cache: Annotated[str | None, typer.Option(
        help="folder of a preprocessed image cache (uint8, memory-mapped), built on first use")] = None,
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
    fit: Annotated[str | None, typer.Option(
        help="pad (the study's: long side resized, zero-padded to a square) or crop (crop to content: black bars "
             "trimmed, centre-cropped to a square; removes the padding shortcut)",
        show_default=_default("fit"))] = None,
    placement: Annotated[str | None, typer.Option(
        help="centre, or random: the image sits anywhere in the square while training",
        show_default=_default("placement"))] = None,
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
    data_format: FormatOption = "auto",
    views: ViewsOption = "frontal",
    uncertain: UncertainOption = "ignore",
    raters: RatersOption = "majority",
) -> None:
    """Per-class metrics of a run on a split, with plots; --data OTHER validates it on another data set."""
    from cxrlens.evaluate import evaluate_run, f1_line

    options = _read_options(data_format, views, uncertain, raters)
    metrics = evaluate_run(run, data, None if split == "all" else split, threshold, out, allow_leaks=allow_leaks,
                           options=options)
    typer.echo(f1_line(metrics))


@app.command("check-data")
def check_data(
    data: Annotated[str | None, typer.Option(help="data folder or manifest (default: bundled data/cxr3)")] = None,
    out: Annotated[str | None, typer.Option(help="folder for audit.json and audit.md")] = None,
    taxonomy: Annotated[str, typer.Option(help=TAXONOMY_HELP)] = "cxr3",
    data_format: FormatOption = "auto",
    views: ViewsOption = "frontal",
    uncertain: UncertainOption = "ignore",
    raters: RatersOption = "majority",
) -> None:
    """Audit a data set: counts per split and class, missing/unreadable files, duplicates, leaks, image sizes."""
    from cxrlens.audit import audit_data, audit_summary, write_audit

    audit = audit_data(data, taxonomy, options=_read_options(data_format, views, uncertain, raters))
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
    allow_leaks: Annotated[
        bool, typer.Option("--allow-leaks", help="evaluate although the images overlap a run's training data")
    ] = False,
) -> None:
    """Evaluate the soft-vote and/or majority-vote ensemble of several runs."""
    from cxrlens.ensemble import VOTES, ensemble_runs
    from cxrlens.evaluate import f1_line

    votes = VOTES if vote == "both" else (vote,)
    results = ensemble_runs(runs, votes, data, None if split == "all" else split, threshold, out,
                            allow_leaks=allow_leaks)
    for name, metrics in results.items():
        typer.echo(f"{name} vote {f1_line(metrics)}; written to {Path(out) / name}")


@app.command()
def split(
    data: Annotated[str, typer.Option(help="data folder or manifest")],
    out: Annotated[str, typer.Option(help="labels.csv to write (with a new split column)")],
    fractions: Annotated[str, typer.Option(help="e.g. 0.7,0.15,0.15 or 0.6,0.4")] = "0.7,0.15,0.15",
    names: Annotated[str, typer.Option(help="e.g. train,val,test or train,test")] = "train,val,test",
    seed: int = 0,
    taxonomy: Annotated[str, typer.Option(help=TAXONOMY_HELP)] = "cxr3",
    skip_missing: Annotated[bool, typer.Option("--skip-missing", help="leave out rows whose image is missing")] = (
        False
    ),
    data_format: FormatOption = "auto",
    views: ViewsOption = "frontal",
    uncertain: UncertainOption = "ignore",
    raters: RatersOption = "majority",
) -> None:
    """Write a manifest (our labels.csv, from any layout) with a new patient-level split, stratified by class."""
    from cxrlens.data import load_manifest, patient_split, write_manifest
    from cxrlens.taxonomy import get_taxonomy

    try:
        parts = tuple(float(f) for f in fractions.split(","))
    except ValueError:
        raise CxrlensError(f"--fractions must be numbers separated by commas, not '{fractions}'") from None
    manifest = load_manifest(data, get_taxonomy(taxonomy), missing="skip" if skip_missing else "error",
                             options=_read_options(data_format, views, uncertain, raters))
    left_out = f"; {len(manifest.missing)} rows with a missing image left out" if manifest.missing else ""
    manifest = patient_split(manifest, parts, tuple(names.split(",")), seed)
    write_manifest(manifest, out)
    typer.echo(f"{out}: {manifest.frame['split'].value_counts().to_dict()}{left_out}")


DevicesOption = Annotated[int, typer.Option(help="processes per machine (one GPU each on GPUs); images are shared out")]
NodesOption = Annotated[int, typer.Option(
    help="machines (each runs the command with MASTER_ADDR, MASTER_PORT, NODE_RANK set, or under torchrun)")]
AcceleratorOption = Annotated[str, typer.Option(help="auto, cpu (gloo) or gpu (NCCL)")]


def _launch(devices: int, num_nodes: int, accelerator: str):
    from cxrlens.distributed import Launch

    return Launch(devices=devices, num_nodes=num_nodes, accelerator=accelerator)


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
    devices: DevicesOption = 1,
    num_nodes: NodesOption = 1,
    accelerator: AcceleratorOption = "auto",
) -> None:
    """Neuron Activation Profiles of one or more runs over a data set (arrays, statistics, figures)."""
    from cxrlens.distributed import launch
    from cxrlens.nap import NapConfig, NapJob, dead_share_lines, run_nap_job

    config = NapConfig(
        layers=layers.split(",") if layers else None,
        groups=groups if groups in (None, "study", "errors") else [g for g in groups.split(";") if g.strip()],
        batch_size=batch_size,
        gradient_weighted=gradient_weighted or False,
    )
    job = NapJob(runs=run, out=out, data=data, split=None if split == "all" else split, config=config)
    result = launch(run_nap_job, job, launch=_launch(devices, num_nodes, accelerator))
    if result is None:  # not process 0
        return
    typer.echo("\n".join(dead_share_lines(result["stats"])))
    typer.echo(f"NAP arrays, nap_stats.json and figures written to {out}")


@app.command()
def explain(
    run: Annotated[list[str], typer.Option("--run", help="run folder (repeat for several models)")],
    out: Annotated[str, typer.Option(help="output folder")],
    image: Annotated[list[str] | None, typer.Option("--image", help="image file or folder (repeatable)")] = None,
    data: Annotated[str | None, typer.Option(help="instead of --image: a data set (manifest or folder)")] = None,
    split: Annotated[str, typer.Option(help="split of --data to explain; 'all' for every image")] = "test",
    max_images: Annotated[int, typer.Option(help="at most this many images of --data; 0 = all")] = 8,
    methods: Annotated[str, typer.Option(help="'all' or comma-separated names, e.g. occlusion,saliency")] = "all",
    targets: Annotated[str, typer.Option(
        help="all, positive (predicted by the soft vote), true (labels; --store) or class names")] = "all",
    output: Annotated[str, typer.Option(help="explain the sigmoid (the study's choice) or the logit")] = "sigmoid",
    max_batch: Annotated[int, typer.Option(help="perturbations / integration steps per forward pass")] = 16,
    approximate: Annotated[bool, typer.Option(
        "--approximate", help="occlusion: sweep one window position in 2 per axis and interpolate the others "
        "(a quarter of the windows swept); its error, measured against exact outputs, is in the JSON summary")] = False,
    store: Annotated[bool, typer.Option(
        "--store", help="data-set scale: float16 maps in chunks with an index, no figures (resumable)")] = False,
    chunk_size: Annotated[int, typer.Option(help="images per chunk of --store")] = 32,
    metrics_only: Annotated[bool, typer.Option(
        "--metrics-only", help="keep no maps: scorecard metrics per image and class, computed on the fly")] = False,
    masks: Annotated[str | None, typer.Option(help="--metrics-only: mask folder scored against (default: none)")] = (
        None),
    resume: Annotated[bool, typer.Option("--resume", help="continue the store in --out; chunks done are skipped")] = (
        False),
    devices: DevicesOption = 1,
    num_nodes: NodesOption = 1,
    accelerator: AcceleratorOption = "auto",
) -> None:
    """Attribution maps (.npy), overlays, grids, a JSON summary and config.json for images x models x methods x
    classes; or, with --store / --metrics-only, a whole data set on one or more processes."""
    from cxrlens.distributed import launch
    from cxrlens.explain.config import ExplainConfig, ExplainSettings, parse_methods
    from cxrlens.explain.job import explain_runs
    from cxrlens.explain.report import explain_failures

    chosen = parse_methods(methods)
    if approximate:
        if "occlusion" not in chosen:
            raise CxrlensError("--approximate applies to occlusion; add occlusion to --methods or drop --approximate")
        chosen["occlusion"]["approximate"] = True
    config = ExplainConfig(
        runs=run, out=out, images=image or [], data=data, split=None if split == "all" else split,
        max_images=max_images or None, methods=chosen, targets=targets,
        settings=ExplainSettings(output=output, max_batch=max_batch), store=store or resume, chunk_size=chunk_size,
        metrics_only=metrics_only, masks=masks,
    )
    summary = launch(explain_runs, config, launch=_launch(devices, num_nodes, accelerator), resume=resume)
    if summary is None:  # not process 0
        return
    if not config.store:
        failures = explain_failures(summary)
        if failures:  # the other maps are written; the command still fails
            raise CxrlensError(f"{len(failures)} method run(s) failed, first {failures[0]}; the rest is in {out}")
        typer.echo(f"explained {len(summary['images'])} image(s) with {len(summary['models'])} model(s); "
                   f"written to {out}")
    elif not summary["complete"]:
        typer.echo(f"{summary['chunks_done']} of {summary['chunks']} chunks done in {out}; run again with --resume")
    else:
        what = "metrics of" if config.metrics_only else "maps of"
        typer.echo(f"{what} {summary['images']} image(s) x {len(summary['models'])} model(s) x "
                   f"{len(config.methods)} method(s): {summary['rows']} rows, written to {out}")


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
    devices: DevicesOption = 1,
    num_nodes: NodesOption = 1,
    accelerator: AcceleratorOption = "auto",
) -> None:
    """Scorecard of models x methods (lung focus, faithfulness, sanity, robustness) and a shortcut detector."""
    from cxrlens.distributed import launch
    from cxrlens.score import ScoreConfig, run_scorecard

    config = ScoreConfig(masks=masks, methods=methods.split(","), data=data, max_images=max_images, progress=True)
    card = launch(run_scorecard, run, out, config, launch=_launch(devices, num_nodes, accelerator))
    if card is None:  # not process 0
        return
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
                                                "training")] = "centre",
    fit: Annotated[str, typer.Option(help="pad (the study's) or crop (crop to content: no padding; removes the "
                                          "padding shortcut)")] = "pad",
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
        fit=fit, runs=tuple(runs or ()),
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
    from cxrlens.report import ReportConfig, build_report

    path = build_report(ReportConfig(
        runs=runs, out=out, data=data, ensemble=ensemble, explain=explain, nap=nap, score=score,
        shortcut=shortcut, ratings=ratings, split=split, title=title,
    ))
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


@app.command("formats")
def list_formats() -> None:
    """The data set layouts `--format` accepts, one per line with what detection looks for."""
    from cxrlens.datasets import FORMATS

    typer.echo("\n".join(f"{f.name}: {f.looks_for}" for f in FORMATS.values()))


@app.command("box-masks")
def box_masks(
    data: Annotated[str, typer.Option(help="a data set with boxes: NIH, RSNA or VinDr-CXR")],
    out: Annotated[str, typer.Option(help="mask folder to write (masks.csv + masks/*.png)")],
    findings: Annotated[str | None, typer.Option(help="comma-separated box findings (default: all)")] = None,
    split: Annotated[str, typer.Option(help="split whose images to take; 'all' for every image")] = "all",
    taxonomy: Annotated[str, typer.Option(help=TAXONOMY_HELP)] = "nih14",
    data_format: FormatOption = "auto",
    raters: RatersOption = "majority",
) -> None:
    """Localisation ground truth from a data set's boxes as a mask folder for `cxrlens score --masks`."""
    from cxrlens.data import load_manifest
    from cxrlens.datasets import box_mask_set
    from cxrlens.taxonomy import get_taxonomy

    manifest = load_manifest(data, get_taxonomy(taxonomy), missing="skip",
                             options=_read_options(data_format, "frontal", "ignore", raters))
    manifest = manifest.split(None if split == "all" else split)
    folder = box_mask_set(manifest, out, findings.split(",") if findings else None)
    typer.echo(f"box masks written to {folder}")


@app.command("models")
def list_models() -> None:
    """The registered architectures, one name per line (what --model and the Makefile accept)."""
    from cxrlens.models import model_names

    typer.echo("\n".join(model_names()))


def main() -> None:
    """Entry point: user errors (ours and the command line's) become one line on stderr and exit status 2."""
    try:
        from typer._click import exceptions as click_errors  # typer vendors click since 0.2x
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as click_errors

    try:
        keep_freed_memory()  # glibc keeps freed memory: big models' gradients 1.2-1.5x faster (BENCHMARKS.md)
        status = app(prog_name="cxrlens", standalone_mode=False)  # not "python -m ..." in messages
        if isinstance(status, int) and status:  # a command's typer.Exit(code)
            sys.exit(status)
    except click_errors.NoArgsIsHelpError as exc:  # `cxrlens` alone: the help, as before
        typer.echo(exc.ctx.get_help() if exc.ctx else "see cxrlens --help")
    except click_errors.UsageError as exc:  # a wrong option or value: one line instead of click's box
        command = exc.ctx.command_path if exc.ctx else "cxrlens"
        typer.echo(f"error: {exc.format_message().splitlines()[0].rstrip('.')}; see `{command} --help`", err=True)
        sys.exit(2)
    except typer.Abort:  # click turns Ctrl-C into Abort outside its standalone mode
        typer.echo("interrupted; a training run can continue with --resume", err=True)
        sys.exit(130)
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
