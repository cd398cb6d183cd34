"""The main job: train the five CNNs on the bundled data at a reduced size, evaluate each, evaluate
both ensembles, and print where every output lies. Re-running skips models already trained."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cxrlens.evaluate import markdown_table
from cxrlens.io import write_json
from cxrlens.models import get_spec, model_names
from cxrlens.runs import TrainConfig, atomic_write_text


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    image_size: int = 128
    epochs: int | None = None  # None: each model's demo_epochs (models.MODELS)
    max_images: int | None = None
    batch_size: int = 16
    models: str = "all"
    threshold: str = "tuned"  # per-class thresholds chosen on the validation split
    shortcut: bool = True  # a small planted-shortcut test (ResNet18, marker on COVID-19, p = 0 and 1)


def run_demo(config: DemoConfig) -> dict:
    from cxrlens.ensemble import ensemble_runs
    from cxrlens.evaluate import evaluate_run
    from cxrlens.train import train

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo_config.json", asdict(config))
    names = model_names() if config.models == "all" else config.models.split(",")
    for name in names:
        get_spec(name)  # an unknown name fails before any training
    started = time.perf_counter()
    results, run_dirs = {}, []
    for name in names:
        run_dir = out / name
        train_config = TrainConfig(
            model=name,
            out=str(run_dir),
            epochs=config.epochs or get_spec(name).demo_epochs,
            image_size=config.image_size,
            batch_size=config.batch_size,
            max_images=config.max_images,
        )
        if not (run_dir / "thresholds.json").is_file():  # finished runs are kept, so a re-run resumes the demo
            print(f"\n== training {name} ({train_config.epochs} epochs at {config.image_size} px)", flush=True)
            train(train_config, resume=(run_dir / "resume.ckpt").is_file())
        results[name] = evaluate_run(run_dir, threshold=config.threshold, progress=False)
        run_dirs.append(run_dir)
    if len(run_dirs) >= 2:
        for vote, metrics in ensemble_runs(
            run_dirs, threshold=config.threshold, out=out / "ensemble", progress=False
        ).items():
            results[f"ensemble ({vote} vote)"] = metrics
    classes = list(next(iter(results.values()))["classes"])
    table = markdown_table(results, classes)
    atomic_write_text(out / "f1_table.md", table)
    print(f"\nF1 on the cxr3 test split ({config.image_size} px, thresholds: {config.threshold}):\n\n{table}")
    nap_dead_shares(run_dirs, out / "nap")
    explain_examples(run_dirs, out / "explain", config.image_size)
    scorecard(run_dirs, out / "scorecard")
    shortcut_dir = shortcut_test(out / "shortcut", config.image_size) if config.shortcut else None
    from cxrlens.report import ReportConfig, build_report

    report = build_report(ReportConfig(
        runs=run_dirs, out=out / "report.html", ensemble=out / "ensemble", explain=out / "explain",
        nap=out / "nap", score=out / "scorecard", shortcut=shortcut_dir, title="cxrlens demo: five CNNs on cxr3",
    ))
    print(f"outputs under {out}/: one run folder per model (weights, config.json, history.csv, eval-test/ with")
    print("metrics.json, metrics.md, confusion.png, roc.png), ensemble/soft and ensemble/majority, f1_table.md,")
    print("nap/ (Neuron Activation Profiles of the test split: nap_*.npz, nap_stats.json, figures),")
    print("explain/ (maps .npy, overlays, models x methods grids, summary.json), scorecard/ (lung focus,")
    print("faithfulness, sanity, verdicts), shortcut/ (a planted marker: reliance, which methods find it,")
    print(f"the detector's verdicts) and the whole story in one page: {report}")
    print(f"demo took {time.perf_counter() - started:.0f} s")
    return results


def nap_dead_shares(run_dirs: list[Path], out: Path) -> None:
    """NAPs of the test split for every model, in one pass per image size; prints dead-map shares."""
    from cxrlens.data import load_manifest
    from cxrlens.nap import NapConfig, dead_share_lines, run_nap
    from cxrlens.runs import load_run

    print("\n== Neuron Activation Profiles of the test split", flush=True)
    runs = [load_run(r) for r in run_dirs]
    result = run_nap(runs, load_manifest(None, runs[0].taxonomy).split("test"), out, NapConfig(progress=False))
    print("\n".join(dead_share_lines(result["stats"])))


def explain_examples(run_dirs: list[Path], out: Path, image_size: int) -> None:
    """All nine attribution methods, every model, every class, for one test image of each class."""
    import pandas as pd

    from cxrlens.data import DEFAULT_DATA
    from cxrlens.explain import METHODS
    from cxrlens.explain.config import ExplainConfig
    from cxrlens.explain.job import explain_runs

    print("\n== explanations of one test image per class", flush=True)
    labels = pd.read_csv(DEFAULT_DATA / "labels.csv")
    test = labels[labels["split"] == "test"]
    images = [str(DEFAULT_DATA / test.loc[test["cls"] == c, "path"].iloc[0]) for c in ("covid", "pneumonia", "normal")]
    # the study's occlusion window (50 px of 512) scaled to the demo size; non-overlapping windows keep it quick
    window = max(8, round(50 * image_size / 512))
    methods: dict[str, dict] = {name: {} for name in METHODS}
    methods["occlusion"] = {"window": window, "stride": window}
    explain_runs(ExplainConfig(runs=[str(r) for r in run_dirs], out=str(out), images=images, methods=methods))


def scorecard(run_dirs: list[Path], out: Path) -> None:
    """Lung focus, faithfulness, sanity and the shortcut verdicts on the radiologists' lung masks."""
    from cxrlens.score import ScoreConfig, run_scorecard

    print("\n== scorecard on data/lungmasks", flush=True)
    config = ScoreConfig(methods=["saliency", "grad_cam"], max_images=12, steps=10, sanity_images=4,
                         robustness_images=4, bootstrap=500, progress=True)
    card = run_scorecard(run_dirs, out, config)
    for verdict in card.verdicts.values():
        print(verdict["summary"])


def shortcut_test(out: Path, image_size: int) -> Path:
    """A small planted-shortcut test: a 'PORTABLE' marker on every (p = 1) or no (p = 0) COVID-19 training
    image, one ResNet18 each (300 training images, 8 epochs), all nine methods on 12 aligned test images,
    the detector on 24 planted lung-mask images. A few minutes on 2 CPU cores."""
    from cxrlens.shortcut_test import ShortcutTestConfig, run_shortcut_test
    from cxrlens.shortcuts import ArtifactConfig

    print("\n== planted shortcut: a 'PORTABLE' marker on COVID-19 images", flush=True)
    summary = run_shortcut_test(ShortcutTestConfig(
        out=str(out), artifact=ArtifactConfig("marker"), rates=(0.0, 1.0), model="resnet18", epochs=8,
        image_size=image_size, batch_size=8, max_images=300, focus_images=12, detector_images=24, bootstrap=500,
    ))
    for row in summary["tables"]["reliance"]:
        print(f"p = {row['rate']:g}: COVID-19 F1 aligned {row['aligned_f1']:.2f}, swapped {row['swapped_f1']:.2f}")
    # more than chance on a bright marker is common even without reliance: the comparison with the clean model counts
    found = [f"{r['method']} ({r['auroc_vs_clean']:.2f})" for r in summary["tables"]["focus"]
             if r["rate"] == 1.0 and (r["auroc_vs_clean"] or 0) >= 0.9]
    print(f"methods whose share on the marker tells the p = 1 model from the clean one (AUROC >= 0.9): "
          f"{', '.join(found) or 'none'}")
    return out
