"""The planted-shortcut experiments behind RESULTS.md section 5 and the detector's calibration.

    OMP_NUM_THREADS=1 python scripts/shortcut_experiments.py [--work runs/shortcut-exp] [--results results/shortcut]

CPU-sized: 128 px, at most 300 training images, batch 8, ResNet18 8 epochs and DenseNet161 6 epochs, one
torch thread. Every step is skipped when its summary exists, so a killed run continues. Planted data and
weights stay under --work; tables, figures and JSON (no weights, no images) are copied to --results.

1. the marker on COVID-19 at p = 0, 0.5, 1 for ResNet18 and DenseNet161 (the RESULTS table);
2. ResNet18 with a patch, a texture and a padding artifact at p = 0.5 and 1 (the p = 0 model of step 1 is
   the clean one: without an artifact the planted data equal the original);
3. two more clean ResNet18 (other seeds), each evaluated on all four artifacts (more models without the
   shortcut, for the detector's false-flag rate);
4. the padding artifact at p = 1 trained with random placement (a remedy that is not one);
5. the padding artifact at p = 0 and 1 with crop to content (``fit="crop"``, the remedy), both runs trained
   with it;
6. the detector's calibration from every folder of steps 1-4, and the combined marker table and figure
   (``marker.md``, ``marker.png``). ``--summarise`` redoes only step 6 from the folders already there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from cxrlens.runs import TrainConfig, atomic_write_bytes, atomic_write_text
from cxrlens.shortcut_test import (
    ShortcutTestConfig,
    calibrate,
    focus_markdown,
    markdown_table,
    plot_results,
    reliance_markdown,
    run_shortcut_test,
)
from cxrlens.shortcuts import ArtifactConfig

ARTIFACTS = ("marker", "patch", "texture", "padding")
COMMON = {"image_size": 128, "batch_size": 8, "max_images": 300, "bootstrap": 1000, "seed": 0, "progress": False}
SETTINGS = {
    "resnet18": {"epochs": 8, "focus_images": 24, "detector_images": None},
    "densenet161": {"epochs": 6, "focus_images": 16, "detector_images": 40},
}
KEEP = (".csv", ".md", ".png", ".json")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def experiment(work: Path, results: Path, name: str, **kwargs) -> Path:
    out = work / name
    if (out / "summary.json").is_file():
        log(f"{name}: done before, kept")
    else:
        started = time.process_time()
        log(f"{name}: start")
        run_shortcut_test(ShortcutTestConfig(out=str(out), **COMMON, **kwargs))
        log(f"{name}: {time.process_time() - started:.0f} s of CPU")
    target = results / name
    target.mkdir(parents=True, exist_ok=True)
    for path in out.iterdir():
        if path.is_file() and path.suffix in KEEP:
            shutil.copy2(path, target / path.name)
    return out


def clean_seed(work: Path, seed: int) -> Path:
    from cxrlens.train import train

    out = work / "clean-seeds" / f"resnet18-s{seed}"
    if not (out / "thresholds.json").is_file():
        log(f"clean ResNet18, seed {seed}: training")
        config = TrainConfig(model="resnet18", out=str(out), epochs=SETTINGS["resnet18"]["epochs"], image_size=128,
                             batch_size=8, max_images=300, seed=seed)
        train(config, resume=(out / "resume.ckpt").is_file(), progress=False)
    return out


def calibration_folders(work: Path) -> list[Path]:
    names = [f"marker-{m}" for m in SETTINGS] + [f"{k}-resnet18" for k in ARTIFACTS[1:]]
    names += [f"clean-s{seed}/{kind}" for seed in (2, 3) for kind in ARTIFACTS]
    return [work / name for name in names if (work / name / "summary.json").is_file()]


def summarise(work: Path, results: Path) -> None:
    """Step 6: calibration, and the marker results of both architectures in one table and figure, with the
    detector's verdicts under the calibrated thresholds (in-sample and leave-one-run-out)."""
    folders = calibration_folders(work)
    source = (f"calibrated by scripts/shortcut_experiments.py on the planted runs in {results}/ "
              "(RESULTS.md section 5): ResNet18 with marker, patch, texture and padding artifacts at p = 0, 0.5, 1 "
              "plus two more clean seeds, DenseNet161 with the marker; 128 px, CPU-sized")
    evaluations = calibrate([str(f) for f in folders], results / "calibration", source)["evaluations"]
    tables: dict[str, list[pd.DataFrame]] = {"reliance": [], "focus": []}
    for model in SETTINGS:
        folder = work / f"marker-{model}"
        for name in tables:
            if (folder / f"{name}.csv").is_file():
                tables[name].append(pd.read_csv(folder / f"{name}.csv"))
    if not tables["reliance"]:
        return
    merged = {name: pd.concat(parts, ignore_index=True) for name, parts in tables.items()}
    marker = evaluations[evaluations["folder"].str.contains("/marker-")]
    verdicts = [[r["model"], f"{r['rate']:g}", "yes" if r["planted"] else "no",
                 "yes" if r["flagged"] else "no", "right" if r["flagged"] == r["planted"] else "WRONG",
                 "yes" if r["flagged_cross_validated"] else "no",
                 "right" if r["flagged_cross_validated"] == r["planted"] else "WRONG"] for _, r in marker.iterrows()]
    text = ("# Planted 'PORTABLE' marker on COVID-19: ResNet18 and DenseNet161 at 128 px\n\n## Reliance\n\n"
            + reliance_markdown(merged["reliance"]) + "\n## Artifact focus per method\n\n"
            + focus_markdown(merged["focus"]) + "\n## The detector with the calibrated thresholds\n\n"
            + markdown_table(["model", "p", "has the shortcut", "flagged", "verdict", "flagged (thresholds chosen "
                              "without this run)", "verdict"], verdicts))
    atomic_write_text(results / "marker.md", text)
    atomic_write_bytes(results / "marker.png", plot_results(merged["reliance"], merged["focus"],
                                                            "'PORTABLE' marker on COVID-19, 128 px"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/shortcut-exp")
    parser.add_argument("--results", default="results/shortcut")
    parser.add_argument("--summarise", action="store_true", help="only calibrate and combine existing folders")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work, results = Path(args.work), Path(args.results)
    if args.summarise:
        summarise(work, results)
        return
    started = time.process_time()
    for model in ("resnet18", "densenet161"):  # 1
        experiment(work, results, f"marker-{model}", model=model, artifact=ArtifactConfig("marker"),
                   rates=(0.0, 0.5, 1.0), **SETTINGS[model])
    clean = str(work / "marker-resnet18" / "runs" / "resnet18-p0")
    for kind in ARTIFACTS[1:]:  # 2
        experiment(work, results, f"{kind}-resnet18", model="resnet18", artifact=ArtifactConfig(kind),
                   rates=(0.0, 0.5, 1.0), runs=(clean, "", ""), **SETTINGS["resnet18"])
    for seed in (2, 3):  # 3
        run = str(clean_seed(work, seed))
        for kind in ARTIFACTS:
            experiment(work, results, f"clean-s{seed}/{kind}", model="resnet18", artifact=ArtifactConfig(kind),
                       rates=(0.0,), runs=(run,), gallery_images=1, **SETTINGS["resnet18"])
    padding_p1 = str(work / "padding-resnet18" / "runs" / "resnet18-p1")
    experiment(work, results, "padding-resnet18-random-placement", model="resnet18",  # 4
               artifact=ArtifactConfig("padding"), rates=(0.0, 1.0), runs=(clean, ""), placement="random",
               **SETTINGS["resnet18"])
    log(f"padding p = 1 with centred placement for comparison: {padding_p1}")
    experiment(work, results, "padding-resnet18-crop", model="resnet18", artifact=ArtifactConfig("padding"),  # 5
               rates=(0.0, 1.0), fit="crop", **SETTINGS["resnet18"])
    summarise(work, results)  # 6
    log(f"all done: {time.process_time() - started:.0f} s of CPU in this process")


if __name__ == "__main__":
    sys.exit(main())
