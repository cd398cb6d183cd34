"""One self-contained HTML report of a study: data, training, metrics beside the paper's, ensembles,
explanations, NAPs, the scorecard with shortcut verdicts and the reader study.

``build_report(ReportConfig(runs, out, ...))`` reads the files the other commands leave in run folders and
output folders; it computes nothing expensive (no inference). Every image is embedded as a base64
PNG and the small table-sorting script is inline, so the file opens offline and can be mailed. A
section whose files are missing says which command makes them.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlens.errors import CxrlensError
from cxrlens.io import figure_png, unique_names
from cxrlens.runs import TrainConfig, atomic_write_text

# The study's test-set F1 scores (Chatterjee et al., arXiv 2006.02570, fold 0), as read from its code
# and result figures: /work/shared/docs/paper.md, "Results (test set, F1)".
STUDY_F1_COLUMNS = ("COVID-19", "Pneumonia", "No Finding", "Viral", "Bacterial", "micro-F1 (14)")
STUDY_F1_FOLD0: dict[str, tuple[float, ...]] = {
    "DenseNet161": (0.857, 0.961, 0.943, 0.790, 0.594, 0.860),
    "InceptionResNetV2": (0.867, 0.945, 0.923, 0.774, 0.629, 0.845),
    "InceptionV3": (0.866, 0.858, 0.844, 0.726, 0.684, 0.797),
    "ResNet18": (0.875, 0.936, 0.891, 0.737, 0.452, 0.817),
    "ResNet34": (0.841, 0.931, 0.916, 0.760, 0.574, 0.832),
    "Ensemble": (0.895, 0.966, 0.952, 0.803, 0.610, 0.874),
}
STUDY_COVID_F1_MEAN_OVER_FOLDS = {
    "DenseNet161": 0.861, "InceptionResNetV2": 0.819, "InceptionV3": 0.817, "ResNet18": 0.872, "ResNet34": 0.844,
    "Ensemble": 0.888,
}
STUDY_NOTE = (
    "Chatterjee et al. (arXiv 2006.02570): Cohen's COVID-19 collection plus 1,000 Kermany pediatric images, "
    "60/40 patient split, fold 0 test set, 14 sigmoid outputs, threshold 0.51, last-epoch models, 512 px; "
    "the ensemble averages the five sigmoid outputs (soft vote). Different data and taxonomy from ours: "
    "compare orders of magnitude, not decimals."
)
# our class names -> the study's column of the same finding
STUDY_COLUMN_OF = {"COVID-19": "COVID-19", "Pneumonia": "Pneumonia", "Normal": "No Finding",
                   "No Finding": "No Finding", "Viral Pneumonia": "Viral", "Bacterial Pneumonia": "Bacterial"}
MAX_FIGURES = 24  # per section: keeps the report mailable when an output folder holds hundreds

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.title = 'click to sort';
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.dataset.order !== 'asc';
      table.querySelectorAll('th').forEach(function (h) { delete h.dataset.order; });
      th.dataset.order = asc ? 'asc' : 'desc';
      var key = function (row) {
        var text = row.cells[col] ? row.cells[col].textContent.trim() : '';
        var number = parseFloat(text.replace(/^[^0-9+\\-.]+/, ''));
        return isNaN(number) ? text.toLowerCase() : number;
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; color: #1d2330; margin: 0;
       background: #f6f7f9; }
main { max-width: 1200px; margin: 0 auto; padding: 1rem 1.5rem 4rem; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 2px solid #16233b; padding-bottom: .2rem; margin-top: 2.2rem; }
h3 { margin-top: 1.4rem; }
.note, figcaption, caption { color: #5b6474; font-size: .9rem; }
caption { caption-side: bottom; text-align: left; padding-top: .3rem; }
.warning { background: #fff4e5; border: 1px solid #f0c36d; padding: .5rem .8rem; border-radius: 4px; }
table { border-collapse: collapse; background: #fff; margin: .6rem 0; font-size: .9rem; }
th, td { border: 1px solid #d8dce3; padding: .2rem .5rem; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
th { background: #eef1f5; } table.sortable th { cursor: pointer; }
th[data-order=asc]::after { content: ' \\25B2'; } th[data-order=desc]::after { content: ' \\25BC'; }
.side { display: flex; gap: 1.5rem; flex-wrap: wrap; align-items: flex-start; }
figure { background: #fff; border: 1px solid #d8dce3; border-radius: 4px; padding: .5rem; margin: .6rem 0; }
figure img { max-width: 100%; display: block; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; } .figures figure { max-width: 560px; }
.figures.wide figure { max-width: 100%; } nav.toc a { margin-right: 1rem; } .missing { color: #8a5a00; }
.verdict { background: #fff; border-left: 4px solid #1f5fbf; padding: .4rem .8rem; margin: .6rem 0; }
"""


# --- small HTML helpers --------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "", sortable: bool = True,
           table_id: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text_cls = ' class="text"' if i > 0 and isinstance(v, str) and not re.match(r"^[-+0-9.na/ ]+$", v) else ""
            cells.append(f"<td{text_cls}>{_esc(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attrs = (' class="sortable"' if sortable else "") + (f' id="{_esc(table_id)}"' if table_id else "")
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return f"<table{attrs}>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _figure(png: bytes, caption: str) -> str:
    return f"<figure>{_img_tag(png, caption)}<figcaption>{_esc(caption)}</figcaption></figure>"


def _figure_file(path: Path, caption: str) -> str:
    return _figure(path.read_bytes(), caption)


def _missing(text: str) -> str:
    return f'<p class="missing">{_esc(text)}</p>'


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CxrlensError(f"cannot read {path}: {exc}; re-run the command that wrote it") from None


# --- sections ------------------------------------------------------------------------------------


def _data_section(manifest: Any) -> str:
    frame = manifest.frame.assign(**{c: manifest.targets[:, i] for i, c in enumerate(manifest.taxonomy.classes)})
    split = frame["split"].replace("", "(none)")
    splits = sorted(set(split))
    rows = []
    for c in manifest.taxonomy.classes:
        counts = [int(frame.loc[split == s, c].sum()) for s in splits]
        rows.append([c, *counts, sum(counts)])
    rows.append(["images", *[int((split == s).sum()) for s in splits], len(frame)])
    rows.append(["patients", *[frame.loc[split == s, "patient_group"].nunique() for s in splits],
                 frame["patient_group"].nunique()])
    by_class = _table(["class", *splits, "all"], rows, table_id="data-classes",
                      caption="Images whose multi-label target includes the class, per split (a COVID-19 image "
                              "also counts as Pneumonia), and distinct patients per split.")
    sources = sorted(set(frame["source"]))
    label = frame["finding"].astype(str) if "cls" not in frame else frame["cls"].astype(str)
    labels = sorted(set(label))
    source_rows = []
    for src in sources:
        in_src = frame["source"] == src
        source_rows.append([src, *[int((in_src & (split == s)).sum()) for s in splits],
                            *[int((in_src & (label == lab)).sum()) for lab in labels], int(in_src.sum())])
    by_source = _table(["source", *splits, *labels, "all"], source_rows, table_id="data-sources",
                       caption="Images per source, split and label. A class that comes mostly from one source "
                               "lets a model learn the source instead of the disease (DeGrave et al. 2021).")
    leaks = frame.groupby("patient_group")["split"].nunique()
    leak_note = (f"{int((leaks > 1).sum())} patients appear in more than one split."
                 if manifest.has_split else "The data set has no split column.")
    return (f"<p>{len(frame)} images from {_esc(manifest.origin)}. {_esc(leak_note)}</p>"
            f'<div class="side">{by_class}{by_source}</div>')


def _audit_section(manifest: Any, configs: dict[str, TrainConfig]) -> str:
    """What `cxrlens check-data` finds in the data (leaks, conflicting labels, duplicates, near-duplicates)
    and what each run let through with --allow-leaks or left out with --skip-missing."""
    from cxrlens.audit import audit_manifest

    audit = audit_manifest(manifest, progress=False)
    findings = [("leaks between splits", audit.leaks), ("images with conflicting labels", audit.conflicts),
                ("duplicate images", audit.duplicates), ("near-duplicate pairs", audit.near_duplicates),
                ("unreadable files", audit.unreadable)]
    rows = [[what, len(found), "; ".join(found[:3]) + (" ..." if len(found) > 3 else "")] for what, found in findings]
    table = _table(["finding", "count", "first rows"], rows, table_id="data-audit",
                   caption="The data audit (`cxrlens check-data`): leaks and conflicts are refused by train and "
                           "evaluate unless --allow-leaks; near-duplicates (difference hash) are only reported.")
    allowed = [[name, len(c.leaks), "; ".join(c.leaks[:3]), len(c.skipped)] for name, c in configs.items()
               if c.leaks or c.skipped]
    if allowed:
        table += _table(["run", "leaks allowed", "first of them", "rows skipped"], allowed, table_id="run-leaks",
                        caption="Runs trained with --allow-leaks or --skip-missing (from their config.json): "
                                "their numbers may be inflated by these images.")
    return table


def _curves_figure(histories: dict[str, pd.DataFrame]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    loss_ax, f1_ax = fig.subplots(1, 2)
    for i, (name, h) in enumerate(histories.items()):
        colour = f"C{i % 10}"
        x = h["epoch"] + 1 if "epoch" in h else np.arange(1, len(h) + 1)
        if "train_loss" in h:
            loss_ax.plot(x, h["train_loss"], color=colour, ls="--", marker=".", label=f"{name} train")
        if "val_loss" in h:
            loss_ax.plot(x, h["val_loss"], color=colour, marker="o", ms=3, label=f"{name} val")
        f1_cols = [c for c in h.columns if c.startswith("val_f1/")]
        if f1_cols:
            f1_ax.plot(x, h[f1_cols].mean(axis=1), color=colour, marker="o", ms=3, label=name)
    loss_ax.set(xlabel="epoch", ylabel="BCE loss", title="loss (dashed: train, solid: validation)")
    f1_ax.set(xlabel="epoch", ylabel="macro F1", title="validation F1, mean over classes", ylim=(0, 1))
    for ax in (loss_ax, f1_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def _metrics_rows(name: str, metrics: dict) -> list[list[Any]]:
    rows = []
    for cls, m in metrics["classes"].items():
        rows.append([name, cls, m["precision"], m["recall"], m["specificity"], m["f1"], m["auroc"], m["support"],
                     m["threshold"]])
    for avg in ("micro", "macro"):
        m = metrics[avg]
        rows.append([name, avg, m["precision"], m["recall"], m["specificity"], m["f1"], m.get("auroc"), None, None])
    return rows


def _f1_beside_study(results: dict[str, dict], classes: Sequence[str]) -> str:
    ours = _table(
        ["model", *classes, "micro-F1", "macro-F1"],
        [[name, *[m["classes"][c]["f1"] for c in classes], m["micro"]["f1"], m["macro"]["f1"]]
         for name, m in results.items()],
        caption="Ours: F1 on the test split at each run's threshold.", table_id="f1-ours",
    )
    shown = [c for c in STUDY_F1_COLUMNS if c in {STUDY_COLUMN_OF.get(k) for k in classes} or c.startswith("micro")]
    index = {c: i for i, c in enumerate(STUDY_F1_COLUMNS)}
    study = _table(
        ["study model", *shown, "COVID-19 F1, mean of 5 folds"],
        [[name, *[values[index[c]] for c in shown], STUDY_COVID_F1_MEAN_OVER_FOLDS[name]]
         for name, values in STUDY_F1_FOLD0.items()],
        caption="The study's F1, fold 0 (its 'No Finding' is our 'Normal'). " + STUDY_NOTE, table_id="f1-study",
    )
    return f'<div class="side">{ours}{study}</div>'


def _eval_figures(folder: Path, title: str, metrics: dict) -> str:
    threshold = {round(m["threshold"], 3) for m in metrics["classes"].values()}
    at = f"threshold {threshold.pop()}" if len(threshold) == 1 else "per-class tuned thresholds"
    parts = []
    if (folder / "confusion.png").is_file():
        parts.append(_figure_file(folder / "confusion.png",
                                  f"{title}: confusion counts per class (one-vs-rest, {at}) on "
                                  f"{metrics['n_images']} test images; rows true, columns predicted."))
    if (folder / "roc.png").is_file():
        parts.append(_figure_file(folder / "roc.png",
                                  f"{title}: ROC curve per class from the sigmoid outputs on {metrics['n_images']} "
                                  "test images; AUROC in the legend (classes without both outcomes are left out)."))
    return f'<div class="figures">{"".join(parts)}</div>'


def _explain_section(explain_dir: Path) -> str:
    summary_path = explain_dir / "summary.json"
    grids = sorted((explain_dir / "grids").glob("*__models_x_methods.png"))
    if not grids:
        grids = sorted((explain_dir / "grids").glob("*.png"))
    if not grids:
        return _missing(f"{explain_dir} has no grids/*.png; run `cxrlens explain` to make them.")
    summary = _read_json(summary_path) if summary_path.is_file() else {}
    methods: dict[str, Any] = {}
    for model in summary.get("models", {}).values():
        for method, record in model.get("methods", {}).items():
            if "params" in record:
                methods.setdefault(method, record["params"])
    described = "; ".join(f"{m} ({', '.join(f'{k}={v}' for k, v in p.items() if v is not None)})"
                          for m, p in methods.items()) or "see summary.json"
    output = summary.get("output", "sigmoid")
    size = summary.get("image_size")
    parts = []
    for path in grids[:MAX_FIGURES]:
        image, cls, *_ = (path.stem.split("__") + ["", ""])
        parts.append(_figure_file(
            path, f"Image {image}, class {cls}: rows are models, columns attribution methods, each explaining the "
                  f"{output} output of the class at {size[0] if size else '?'} px. Methods: {described}. "
                  "Magma: |attribution|; blue-red: signed attribution; outliers clipped at the 99th percentile."))
    more = f"<p class='note'>{len(grids) - MAX_FIGURES} more grids in {_esc(explain_dir)}.</p>" \
        if len(grids) > MAX_FIGURES else ""
    return f'<div class="figures">{"".join(parts)}</div>{more}'


def _nap_section(nap_dir: Path) -> str:
    stats_path = nap_dir / "nap_stats.json"
    pngs = sorted(nap_dir.glob("nap_*.png"))
    if not stats_path.is_file() and not pngs:
        return _missing(f"{nap_dir} has no nap_stats.json; run `cxrlens nap` to make it.")
    parts = []
    if stats_path.is_file():
        stats = _read_json(stats_path)
        rows, group_text = [], ""
        for model, s in stats.get("models", {}).items():
            for layer, entry in s.get("layers", {}).items():
                rows.append([model, layer, "x".join(str(v) for v in entry.get("shape", [])),
                             entry.get("dead_maps"), entry.get("dead_share")])
            groups = s.get("groups", [])
            group_text = ", ".join(f"{g['name']} ({g['images']} images)" for g in groups)
        parts.append(_table(["model", "layer", "shape", "dead maps", "dead share"], rows, table_id="nap-dead",
                            caption="Feature maps constant over every image and position ('dead') per layer; "
                                    f"they are left out of the NAP figures. Groups: {group_text}."))
    figures = []
    for path in pngs[:MAX_FIGURES]:
        stem = path.stem
        if stem == "nap_dead_maps":
            text = "Share of dead feature maps per layer and model."
        elif stem.endswith("_inputs"):
            text = f"{stem[4:-7]}: mean input image of each group (what the groups look like on average)."
        else:
            text = (f"{stem[4:]}: contrastive NAPs (group mean feature map minus the unweighted mean of the group "
                    "NAPs) of the 10 feature maps with the largest mean |contrastive NAP|; rows are groups; "
                    "blue-white-red with symmetric limits.")
        figures.append(_figure_file(path, text))
    return "".join(parts) + f'<div class="figures wide">{"".join(figures)}</div>'


def _score_section(score_dir: Path) -> str:
    parts = []
    verdicts_path = score_dir / "verdicts.json"
    if verdicts_path.is_file():
        verdicts = _read_json(verdicts_path)
        for model, v in (verdicts.items() if isinstance(verdicts, dict) else []):
            if not isinstance(v, dict):
                continue
            statements = "".join(f"<li>{_esc(s)}</li>" for s in v.get("statements", []))
            parts.append(f'<div class="verdict"><strong>{_esc(v.get("summary", model))}</strong>'
                         f"<ul>{statements}</ul></div>")
    csv_path = score_dir / "scorecard.csv"
    if csv_path.is_file():
        header, rows = _compact_scorecard(pd.read_csv(csv_path))
        parts.append(_table(header, rows, table_id="scorecard-table",
                            caption="Scorecard: one row per model x method x class; each metric is the mean over "
                                    "the images of the mask set with its 95 % bootstrap interval in brackets. Click "
                                    "a column to sort (by the mean). See cxrlens.score for each metric's definition."))
    for name, text in (("scorecard.png", "The scorecard as a heat map: colour is the rank within each column "
                                         "(green = better)."),
                       ("worst_offenders.png", "Per model, the images, methods and classes whose evidence lies "
                                               "least inside the lungs, with the radiologists' lung masks.")):
        if (score_dir / name).is_file():
            parts.append(_figure_file(score_dir / name, text))
    if not parts:
        return _missing(f"{score_dir} has no scorecard.csv or verdicts.json; run `cxrlens score` to make them.")
    return "".join(parts)


def _with_ci(record: dict, column: str) -> str:
    value, low, high = record.get(column), record.get(f"{column}_low"), record.get(f"{column}_high")
    if value is None:
        return "n/a"
    return f"{_fmt(value, 2)} [{_fmt(low, 2)}, {_fmt(high, 2)}]" if low is not None and high is not None \
        else _fmt(value, 2)


def _shortcut_section(shortcut_dir: Path) -> str:
    """The planted-shortcut test (``cxrlens shortcut-test``): reliance, artifact focus per method, the
    detector's verdicts and the figures."""
    summary_path = shortcut_dir / "summary.json"
    if not summary_path.is_file():
        return _missing(f"{shortcut_dir} has no summary.json; run `cxrlens shortcut-test` to make it.")
    summary = _read_json(summary_path)
    tables, config = summary.get("tables", {}), summary.get("config", {})
    parts = [f"<p>A {_esc(summary.get('artifact', 'planted artifact'))} was planted on a share p of the "
             f"{_esc(summary.get('class', '?'))} training and validation images; one {_esc(config.get('model', '?'))} "
             f"was trained per rate at {_esc(config.get('image_size', '?'))} px. The aligned test set carries the "
             "artifact on the class only, the swapped one on the other classes only: the drop from aligned to "
             "swapped is how much a model relies on it.</p>"]
    parts.append(_table(
        ["model", "p", "F1 clean", "F1 aligned", "F1 swapped", "AUROC aligned - swapped"],
        [[r["model"], r["rate"], _with_ci(r, "clean_f1"), _with_ci(r, "aligned_f1"), _with_ci(r, "swapped_f1"),
          _with_ci(r, "reliance_auroc")] for r in tables.get("reliance", [])],
        table_id="shortcut-reliance", caption="Reliance on the planted artifact, 95 % bootstrap intervals."))
    parts.append(_table(
        ["model", "p", "method", "share on artifact / area share", "points at artifact", "AUROC vs clean model",
         "above chance"],
        [[r["model"], r["rate"], r["method"], _with_ci(r, "ratio"), _with_ci(r, "hit"), _with_ci(r, "auroc_vs_clean"),
          "yes" if r.get("above_chance") else "no"] for r in tables.get("focus", [])],
        table_id="shortcut-focus", caption="Which explanation finds the artifact, on the aligned test images that "
        "carry it: positive attribution inside the artifact's mask divided by the mask's area share (1 = chance), "
        "how often the map's maximum lies on it, and how well that share tells the model from the clean one."))
    if tables.get("detector"):
        parts.append(_table(
            ["model", "p", "has the shortcut", "risk", "location/padding flag", "verdict right"],
            [[r["model"], r["rate"], r.get("planted"), r["risk"], r["attribution_flagged"], r.get("correct")]
             for r in tables["detector"]], table_id="shortcut-detector",
            caption=f"The shortcut detector, unchanged, on each model; thresholds from: "
                    f"{summary.get('thresholds_source') or 'n/a'}."))
    for name, text in (("shortcut_test.png", "Reliance and artifact focus per method against the planting rate."),
                       ("gallery.png", "Maps of the most planted and the clean model, artifact outlined in cyan.")):
        if (shortcut_dir / name).is_file():
            parts.append(_figure_file(shortcut_dir / name, text))
    return "".join(parts)


def _compact_scorecard(table: pd.DataFrame) -> tuple[list[str], list[list[Any]]]:
    """scorecard.csv has metric, metric_low, metric_high, metric_n columns: show 'mean [low, high]'."""
    metrics = [c for c in table.columns if f"{c}_low" in table.columns and f"{c}_high" in table.columns]
    hidden = {f"{m}_{s}" for m in metrics for s in ("low", "high", "n")}
    header = [c for c in table.columns if c not in hidden]
    rows = []
    for record in table.to_dict("records"):
        row = []
        for c in header:
            value = record[c]
            if c in metrics:
                low, high = record[f"{c}_low"], record[f"{c}_high"]
                value = f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]" if pd.notna(low) else _fmt(value)
            row.append(value)
        rows.append(row)
    return header, rows


def _ratings_section(ratings_db: Path) -> str:
    from cxrlens.serve.ratings import RatingsStore

    if not ratings_db.is_file():
        return _missing(f"{ratings_db} does not exist; run the reader study in `cxrlens serve`.")
    s = RatingsStore(ratings_db).summary()
    if not s["n_ratings"]:
        return _missing(f"{ratings_db} holds no ratings yet.")
    kappa = _fmt(s["fleiss_kappa"])
    intro = (f"<p>{s['n_ratings']} ratings by {len(s['raters'])} raters of {s['n_images']} images "
             f"({s['n_maps']} maps). Fleiss' kappa over the {s['n_maps_multi_rated']} maps rated by two or more "
             f"raters: <strong>{kappa}</strong> (1 = perfect agreement, 0 = chance).</p>")
    tables = []
    for key, title in (("by_model", "model"), ("by_method", "method"), ("by_model_method", "model / method")):
        tables.append(_table(
            [title, "mean score", "sd", "ratings"],
            [[name, v["mean"], v["sd"], v["n"]] for name, v in s[key].items()], table_id=f"ratings-{key}",
            caption=f"Mean reader score per {title}: 1 = the map looks elsewhere, 5 = it looks at the pathology; "
                    "raters saw the maps anonymised and shuffled."))
    return intro + f'<div class="side">{"".join(tables)}</div>'


# --- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportConfig:
    """What ``cxrlens report`` puts on the page: run folders, and optionally the data set and the output
    folders of the other commands (each one adds its section)."""

    runs: Sequence[str | Path]
    out: str | Path = "runs/report.html"
    data: str | Path | None = None  # default: the first run's data set
    ensemble: str | Path | None = None  # `cxrlens ensemble`
    explain: str | Path | None = None  # `cxrlens explain`
    nap: str | Path | None = None  # `cxrlens nap`
    score: str | Path | None = None  # `cxrlens score`
    shortcut: str | Path | None = None  # `cxrlens shortcut-test`
    ratings: str | Path | None = None  # the reader-study database of `cxrlens serve`
    split: str = "test"
    title: str = "cxrlens report"


@dataclass
class _Inputs:
    """The runs as read once, shared by every section."""

    config: ReportConfig
    runs: list[Path] = field(init=False)
    names: list[str] = field(init=False)
    configs: list[TrainConfig] = field(init=False)

    def __post_init__(self) -> None:
        if not self.config.runs:
            raise CxrlensError("give at least one run folder")
        self.runs = [Path(r) for r in self.config.runs]
        self.configs = [TrainConfig.load(r) for r in self.runs]
        self.names = unique_names(r.name for r in self.runs)

    def eval_dir(self, run: Path) -> Path:
        """Where ``cxrlens evaluate`` left the run's metrics and figures for the report's split."""
        return run / f"eval-{self.config.split}"

    @cached_property
    def results(self) -> dict[str, dict]:
        """metrics.json of each evaluated run, then of each ensemble vote: name -> metrics."""
        results = {name: _read_json(self.eval_dir(run) / "metrics.json")
                   for name, run in zip(self.names, self.runs, strict=True)
                   if (self.eval_dir(run) / "metrics.json").is_file()}
        for vote, folder in self.ensemble_votes.items():
            results[vote] = _read_json(folder / "metrics.json")
        return results

    @cached_property
    def ensemble_votes(self) -> dict[str, Path]:
        ensemble = Path(self.config.ensemble) if self.config.ensemble is not None else None
        return {f"{vote} vote": ensemble / vote for vote in ("soft", "majority")
                if ensemble is not None and (ensemble / vote / "metrics.json").is_file()}


def _runs_section(inputs: _Inputs) -> str:
    rows = [[name, c.model, c.image_size, c.fit, c.epochs, c.batch_size, c.lr, c.taxonomy, c.data or "data/cxr3"]
            for name, c in zip(inputs.names, inputs.configs, strict=True)]
    return _table(["run", "architecture", "image size", "fit", "epochs", "batch", "learning rate", "taxonomy", "data"],
                  rows, table_id="run-settings", caption="Training settings of each run (config.json).")


def _data_and_audit_section(inputs: _Inputs) -> str:
    from cxrlens.data import load_manifest

    first, data = inputs.configs[0], inputs.config.data
    try:
        manifest = load_manifest(data or first.data or None, first.tax, options=None if data else first.read_options)
    except CxrlensError as exc:
        return _missing(str(exc))
    return _data_section(manifest) + _audit_section(manifest, dict(zip(inputs.names, inputs.configs, strict=True)))


def _training_section(inputs: _Inputs) -> str:
    histories = {name: pd.read_csv(run / "history.csv") for name, run in zip(inputs.names, inputs.runs, strict=True)
                 if (run / "history.csv").is_file()}
    if not histories:
        return _missing("no history.csv in the run folders; train with `cxrlens train`.")
    epochs = ", ".join(f"{n}: {len(h)}" for n, h in histories.items())
    return _figure(_curves_figure(histories),
                   f"Training curves from history.csv (epochs per run: {epochs}): BCE loss on the training split "
                   "(dashed, mean over the epoch's batches) and the validation split (solid), and validation F1 "
                   "averaged over classes at threshold 0.5.")


def _metrics_section(inputs: _Inputs) -> str:
    split, results = inputs.config.split, inputs.results
    html_parts = []
    if results:
        html_parts.append(_f1_beside_study(results, list(inputs.configs[0].tax.classes)))
        rows = [row for name, m in results.items() for row in _metrics_rows(name, m)]
        html_parts.append(_table(
            ["model", "class", "precision", "recall", "specificity", "F1", "AUROC", "support", "threshold"], rows,
            table_id="class-metrics", caption=f"Per-class metrics on the {split} split (one-vs-rest; micro: pooled "
                                              "counts, macro: mean over classes). Click a column to sort."))
    missing = [f"`cxrlens evaluate --run {run}`" for name, run in zip(inputs.names, inputs.runs, strict=True)
               if name not in results]
    if missing:
        html_parts.append(_missing("Not evaluated yet: " + ", ".join(missing) + "."))
    return "".join(html_parts)


def _evaluation_figures_section(inputs: _Inputs) -> str:
    figures = [f"<h3>{_esc(name)}</h3>" + _eval_figures(inputs.eval_dir(run), name, inputs.results[name])
               for name, run in zip(inputs.names, inputs.runs, strict=True) if name in inputs.results]
    return "".join(figures) or _missing("none yet")


def _ensemble_section(inputs: _Inputs) -> str:
    note = ("<p class='note'>Soft vote: mean of the models' sigmoid outputs, thresholded at the mean threshold "
            "(what the study's code does). Majority vote: a class is positive when more than half the models say "
            "so (what its abstract says); its score is the share of votes.</p>")
    if not inputs.ensemble_votes:
        return note + _missing(f"{inputs.config.ensemble} has no soft/ or majority/ metrics; run `cxrlens ensemble`.")
    return note + "".join(f"<h3>{_esc(vote)}</h3>" + _eval_figures(folder, vote, inputs.results[vote])
                          for vote, folder in inputs.ensemble_votes.items())


def _from_folder(attribute: str, make: Callable[[Path], str]) -> Callable[[_Inputs], str]:
    """A section made from one output folder (or file) named in the config."""
    return lambda inputs: make(Path(getattr(inputs.config, attribute)))


# Every section in page order: (id, heading, the config field that must be set for it or None, maker).
SECTIONS: tuple[tuple[str, str, str | None, Callable[[_Inputs], str]], ...] = (
    ("runs", "Runs", None, _runs_section),
    ("data", "Data", None, _data_and_audit_section),
    ("training", "Training", None, _training_section),
    ("metrics", "Metrics beside the study", None, _metrics_section),
    ("curves", "Confusion matrices and ROC curves", None, _evaluation_figures_section),
    ("ensemble", "Ensembles", "ensemble", _ensemble_section),
    ("explain", "Explanations: models x methods", "explain", _from_folder("explain", _explain_section)),
    ("nap", "Neuron Activation Profiles", "nap", _from_folder("nap", _nap_section)),
    ("scorecard", "Scorecard and shortcut verdicts", "score", _from_folder("score", _score_section)),
    ("shortcut-test", "Planted shortcut: who finds it", "shortcut", _from_folder("shortcut", _shortcut_section)),
    ("readers", "Reader study", "ratings", _from_folder("ratings", _ratings_section)),
)


def build_report(config: ReportConfig) -> Path:
    """Write one self-contained HTML report of ``config.runs`` (and, when given, the ensemble, explain, NAP,
    scorecard and shortcut-test output folders and the reader-study database) to ``config.out``; returns
    its path.

    Metrics come from ``RUN/eval-<split>/metrics.json`` (``cxrlens evaluate``) and
    ``ENSEMBLE/{soft,majority}/metrics.json`` (``cxrlens ensemble``); nothing is recomputed.
    """
    inputs = _Inputs(config)
    sections = [(key, heading, make(inputs)) for key, heading, needs, make in SECTIONS
                if needs is None or getattr(config, needs) is not None]
    toc = " ".join(f'<a href="#{key}">{_esc(heading)}</a>' for key, heading, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{_esc(heading)}</h2>{content}</section>'
                   for key, heading, content in sections)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = config.title
    document = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_esc(title)}</title>'
        f"<style>{_CSS}</style></head><body><main><h1>{_esc(title)}</h1>"
        f'<p class="note">Generated {generated} by cxrlens from {len(inputs.runs)} run(s).</p>'
        '<p class="warning">Research results, not a diagnostic device. The images come from public collections '
        "whose sources correlate with the labels; read the scorecard's shortcut verdicts before trusting a "
        "number.</p>"
        f'<nav class="toc">{toc}</nav>{body}</main><script>{_SORT_JS}</script></body></html>'
    )
    out = Path(config.out)
    atomic_write_text(out, document)
    return out
