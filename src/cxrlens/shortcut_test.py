"""The shortcut test: plant a known shortcut, train on it, and check who finds it.

:func:`run_shortcut_test` (what ``cxrlens shortcut-test`` calls) plants an artifact (see
:mod:`cxrlens.shortcuts`) on a share p of one class's training and validation images, for every p in
``rates``, trains one model per rate (or takes existing runs), and then measures, for each model:

1. **reliance**: F1 and AUROC of the class on the clean, aligned (artifact on the class only) and
   swapped (artifact on the other images only) test sets; aligned minus swapped is how much the model
   relies on the artifact;
2. **which explanation finds it**: for every attribution method (and a second Grad-CAM layer), on the
   aligned test images that carry the artifact: the share of positive attribution inside the artifact's
   mask, that share divided by the mask's area share (1 = chance), the pointing-game hit rate, and the
   AUROC with which that share separates this model from the clean (p = 0) model on the same images;
3. **NAPs**: the feature maps that separate the same test images with and without the artifact
   (|difference of means| / pooled standard deviation, :mod:`cxrlens.nap`), and whether such maps
   exist in the clean model too;
4. **the shortcut detector**, run unchanged (the scorecard on the lung-mask images with the artifact
   planted on the class, and the probe on the aligned test set): does it flag the planted models and
   not the clean one?

Every number comes with a 95 % bootstrap interval over test images (``scipy.stats.bootstrap``,
percentile method; paired where two quantities share images). Outputs in ``out``: ``reliance.csv``,
``focus.csv`` (+ ``focus_images.csv``), ``nap.csv``, ``detector.csv`` / ``detector.json``,
``summary.md``, ``summary.json``, ``shortcut_test.png`` (reliance and artifact focus against p) and
``gallery.png`` (maps with the artifact outlined); planted data sets under ``data/``, runs under
``runs/``. :func:`calibrate` chooses the detector's thresholds from several such folders.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrlens.data import Preprocess
from cxrlens.errors import CxrlensError
from cxrlens.io import figure_png, progress_bar, save_figure, write_json
from cxrlens.runs import LoadedRun, atomic_write_bytes, atomic_write_text
from cxrlens.shortcuts import ArtifactConfig, PlantConfig, PlantedDataset

DEFAULT_MASKS = Path(__file__).resolve().parents[2] / "data" / "lungmasks"
# a second, earlier Grad-CAM layer per architecture (the default one is the last stage)
EARLY_GRADCAM_LAYER = {"resnet18": "layer3", "resnet34": "layer3", "densenet161": "features.denseblock3",
                       "inception_v3": "Mixed_6e", "inception_resnet_v2": "mixed_6a"}
PLANTED_RATE = 0.5  # a model trained with p >= this has the shortcut (for judging the detector) ...
LEARNED_RELIANCE = 0.10  # ... when its AUROC drops by at least this from the aligned to the swapped test set
SEPARATING_EFFECT = 1.0  # a feature map "separates" artifact from no artifact at |d| >= 1 (a large effect)
SIGNIFICANCE = 0.05  # family-wise level of "above chance", Holm-corrected over the methods of one model


@dataclass
class ShortcutTestConfig:
    """Everything :func:`run_shortcut_test` needs; saved as ``config.json`` in ``out``.

    runs: existing run folders, one per rate ('' = train that one); max_images caps training images;
    methods: attribution methods for the focus table (default all nine; Grad-CAM also at an earlier
    layer); method_params: their settings (default :func:`focus_params`, sized for a CPU);
    focus_images: aligned test images explained; detector_images: lung-mask images scored (None = all);
    detector_methods: the scorecard's methods for the detector; thresholds: a detector calibration file
    ('' = the one shipped with cxrlens)."""

    out: str = "runs/shortcut"
    data: str = ""
    cls: str = "COVID-19"
    artifact: ArtifactConfig = field(default_factory=ArtifactConfig)
    rates: tuple[float, ...] = (0.0, 0.5, 1.0)
    other_rate: float = 0.0
    model: str = "resnet18"
    epochs: int = 8
    image_size: int = 128
    batch_size: int = 16
    max_images: int | None = None
    train_seed: int = 1701
    placement: str = "centre"  # "random": the image anywhere in the square in training (cxrlens.data.RandomPlacement)
    fit: str = "pad"  # "crop": crop to content, the remedy for the padding shortcut (cxrlens.data.Preprocess)
    runs: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    method_params: dict = field(default_factory=dict)
    focus_images: int = 24
    gallery_images: int = 3
    detector: bool = True
    detector_methods: tuple[str, ...] = ("saliency", "integrated_gradients", "grad_cam")
    detector_images: int | None = None
    mask_dir: str = ""
    thresholds: str = ""
    bootstrap: int = 1000
    seed: int = 0
    progress: bool = True

    def validate(self) -> ShortcutTestConfig:
        """Every check that needs no data, so bad input fails before anything is written."""
        from cxrlens.explain import get_method
        from cxrlens.models import get_spec

        self.artifact.validate()
        if not self.rates:
            raise CxrlensError("give at least one rate, e.g. --rates 0,0.5,1")
        for rate in (*self.rates, self.other_rate):
            if not (0 <= rate <= 1) or not math.isfinite(rate):
                raise CxrlensError(f"rate {rate} is outside [0, 1]; a rate is the share of images given the artifact")
        if len(set(self.rates)) != len(self.rates):
            raise CxrlensError(f"rates {list(self.rates)} repeat a value; give each rate once")
        spec = get_spec(self.model)
        if self.image_size < spec.min_size:
            raise CxrlensError(f"{self.model} needs --image-size of at least {spec.min_size} px, not {self.image_size}")
        for method in (*self.methods, *self.detector_methods):
            get_method(method)
        if self.runs and len(self.runs) != len(self.rates):
            raise CxrlensError(f"give one --runs per rate ({len(self.rates)}), or none; got {len(self.runs)}")
        for run in self.runs:
            if run and not (Path(run) / "config.json").is_file():
                raise CxrlensError(f"{run} is not a run folder (no config.json); train one with `cxrlens train`")
        from cxrlens.data import FITS, PLACEMENTS

        if self.placement not in PLACEMENTS:
            raise CxrlensError(f"unknown placement '{self.placement}'; choose one of: {', '.join(PLACEMENTS)}")
        if self.fit not in FITS:
            raise CxrlensError(f"unknown fit '{self.fit}'; choose one of: {', '.join(FITS)}")
        if self.focus_images < 1:
            raise CxrlensError("--focus-images must be at least 1")
        return self

    @property
    def method_list(self) -> tuple[str, ...]:
        from cxrlens.explain import METHODS

        return self.methods or tuple(METHODS)


def parse_rates(text: str) -> tuple[float, ...]:
    """'0,0.5,1' -> (0.0, 0.5, 1.0); an error line for anything else."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise CxrlensError(f"--rates must be numbers in [0, 1] separated by commas (0,0.5,1), not '{text}'") from None


def focus_params(image_size: int) -> dict[str, dict]:
    """Method settings for the focus table, sized so every method runs on a CPU: occlusion with
    non-overlapping windows of 1/8 of the side, 16 integrated-gradient steps, 8 SmoothGrad samples."""
    window = max(4, image_size // 8)
    return {
        "occlusion": {"window": window, "stride": window},
        "integrated_gradients": {"n_steps": 16},
        "smoothgrad": {"n_samples": 8},
    }


def _rate_name(rate: float) -> str:
    return f"p{rate:g}"


def _train_or_reuse(config: ShortcutTestConfig, planted: PlantedDataset, rate: float, given: str) -> Path:
    """The run of one rate: ``given``, a finished run in ``out/runs`` (a re-run resumes), or a new one."""
    from cxrlens.runs import TrainConfig
    from cxrlens.train import train

    if given:
        return Path(given)
    run_dir = Path(config.out) / "runs" / f"{config.model}-{_rate_name(rate)}"
    if (run_dir / "thresholds.json").is_file():
        return run_dir
    train_config = TrainConfig(
        model=config.model, data=str(planted.labels), out=str(run_dir), epochs=config.epochs,
        image_size=config.image_size, batch_size=config.batch_size, max_images=config.max_images,
        seed=config.train_seed, placement=config.placement, fit=config.fit,
    )
    if config.progress:
        print(f"\n== training {config.model} with the artifact on {rate:g} of {planted.cls} "
              f"({config.epochs} epochs at {config.image_size} px)", flush=True)
    return train(train_config, resume=(run_dir / "resume.ckpt").is_file(), progress=config.progress)


# --- statistics ----------------------------------------------------------------------------------


def bootstrap_interval(statistic: Callable[..., float], samples: Sequence[np.ndarray], n_resamples: int = 1000,
                       seed: int = 0) -> tuple[float, float, float]:
    """(value, low, high): ``statistic`` of the samples and its 95 % percentile bootstrap interval from
    ``scipy.stats.bootstrap``, resampling the samples' rows together (paired). NaN bounds when there are
    fewer than two rows or no resamples."""
    from scipy.stats import bootstrap

    arrays = tuple(np.asarray(s) for s in samples)
    value = float(statistic(*arrays))
    if n_resamples < 1 or len(arrays[0]) < 2 or not math.isfinite(value):
        return value, float("nan"), float("nan")
    with warnings.catch_warnings():  # constant resamples make scipy warn; the interval is still right
        warnings.simplefilter("ignore")
        result = bootstrap(arrays, statistic, paired=True, vectorized=False, n_resamples=n_resamples,
                           method="percentile", rng=np.random.default_rng(seed))
    return value, float(result.confidence_interval.low), float(result.confidence_interval.high)


def f1_at(probs: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    """F1 of one class (predicted when the probability exceeds ``threshold``, as cxrlens.evaluate)."""
    from cxrlens.evaluate import f1_scores

    return float(f1_scores(probs[:, None], truth[:, None], threshold)[0])


def auroc(probs: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one outcome occurs."""
    truth = np.asarray(truth) > 0.5
    if truth.all() or not truth.any():
        return float("nan")
    return separation_auroc(np.asarray(probs)[truth], np.asarray(probs)[~truth])


def separation_auroc(higher: np.ndarray, lower: np.ndarray) -> float:
    """P(a value of ``higher`` exceeds one of ``lower``), ties counted half (the Mann-Whitney AUROC)."""
    a, b = np.asarray(higher, dtype=np.float64)[:, None], np.asarray(lower, dtype=np.float64)[None, :]
    return float(((a > b) + 0.5 * (a == b)).mean())


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def _with_interval(record: dict, name: str, interval: tuple[float, float, float]) -> None:
    record[name], record[f"{name}_low"], record[f"{name}_high"] = interval


# --- 1. reliance ---------------------------------------------------------------------------------


def reliance_table(runs: dict[float, LoadedRun], tests: dict[str, Any], index: int, config: ShortcutTestConfig
                   ) -> pd.DataFrame:
    """Per rate: the class's F1 (at the run's threshold chosen on its planted validation split) and
    AUROC on the clean, aligned and swapped test sets, and aligned minus swapped (paired intervals)."""
    from cxrlens.evaluate import predict_manifest

    records = []
    truth = tests["clean"].targets[:, index]
    for rate, run in runs.items():
        threshold = float(run.thresholds[index]) if run.thresholds is not None else 0.5
        probs = {v: predict_manifest(run, m, progress=False)[:, index] for v, m in tests.items()}
        record: dict[str, Any] = {"model": run.config.model, "rate": rate, "run": str(run.run_dir),
                                  "threshold": threshold, "n_images": len(truth)}
        for version, p in probs.items():
            _with_interval(record, f"{version}_f1", bootstrap_interval(
                lambda q, t, th=threshold: f1_at(q, t, th), (p, truth), config.bootstrap, config.seed))
            _with_interval(record, f"{version}_auroc", bootstrap_interval(auroc, (p, truth), config.bootstrap,
                                                                          config.seed))
        pair = (probs["aligned"], probs["swapped"], truth)
        _with_interval(record, "reliance_f1", bootstrap_interval(
            lambda a, s, t, th=threshold: f1_at(a, t, th) - f1_at(s, t, th), pair, config.bootstrap, config.seed))
        _with_interval(record, "reliance_auroc", bootstrap_interval(
            lambda a, s, t: auroc(a, t) - auroc(s, t), pair, config.bootstrap, config.seed))
        records.append(record)
    return pd.DataFrame(records)


# --- 2. which explanation finds it ---------------------------------------------------------------


def method_specs(config: ShortcutTestConfig, architecture: str) -> list[tuple[str, str, dict]]:
    """(label, method, parameters) for the focus table; Grad-CAM twice, at the last stage and an
    earlier one (``grad_cam@layer3``)."""
    defaults = focus_params(config.image_size)
    specs = []
    for method in config.method_list:
        params = {**defaults.get(method, {}), **config.method_params.get(method, {})}
        specs.append((method, method, params))
        if method == "grad_cam" and architecture in EARLY_GRADCAM_LAYER and "layer" not in params:
            layer = EARLY_GRADCAM_LAYER[architecture]
            specs.append((f"grad_cam@{layer}", method, {**params, "layer": layer}))
    return specs


@dataclass
class FocusResult:
    """Per-image artifact focus rows and the maps kept for the gallery."""

    images: pd.DataFrame  # rate, model, method, image, share, area, ratio, hit
    gallery: dict[float, dict[str, torch.Tensor]]  # rate -> method -> maps [G, H, W] of the gallery images
    gallery_inputs: torch.Tensor  # [G, 3, H, W]
    gallery_masks: torch.Tensor  # [G, H, W]


def artifact_focus(runs: dict[float, LoadedRun], mask_csv: Path, index: int, config: ShortcutTestConfig
                   ) -> FocusResult:
    """Explain the class on the aligned test images that carry the artifact, with every method, for
    every run; measure the attribution inside the artifact's mask."""
    from cxrlens.explain import attribute, get_method, make_explainable
    from cxrlens.score import metrics as M
    from cxrlens.score.masks import load_mask_set

    masks = load_mask_set(mask_csv, next(iter(runs.values())).config.preprocess, mask_columns=["artifact"])
    order = np.random.default_rng(config.seed).permutation(len(masks))[: config.focus_images]
    masks = masks.select(np.sort(order))
    images, artifact = masks.images, masks.masks["artifact"]
    names = [Path(p).name for p in masks.frame["image"]]
    rows, gallery = [], {}
    keep = min(config.gallery_images, len(masks))
    for rate, run in runs.items():
        specs = method_specs(config, run.config.model)
        model = run.model.eval()
        if any(get_method(method).needs_rewrite(params) for _, method, params in specs):
            model = make_explainable(model, images[:1])
        gallery[rate] = {}
        for label, method, params in progress_bar(specs, desc=f"focus {run.name}", enabled=config.progress,
                                                  leave=False):
            maps = attribute(model, images, [index], method=method, model_name=run.config.model, **params).maps[:, 0]
            # a map without positive values (e.g. a saturated sigmoid) shows nothing: nothing on the artifact,
            # and its maximum points nowhere
            empty = (maps.flatten(1).amax(1) <= 0).numpy()
            share = torch.nan_to_num(M.mass_share(maps, artifact), nan=0.0).numpy()
            area = M.mask_share(artifact).numpy()
            hit = np.where(empty, 0.0, M.pointing_game(maps, artifact).numpy())
            # no ratio where the artifact never reaches the input (e.g. black bars under --fit crop)
            ratio = np.divide(share, area, out=np.full_like(share, np.nan), where=area > 0)
            rows.append(pd.DataFrame({"rate": rate, "model": run.config.model, "run": run.name, "method": label,
                                      "image": names, "share": share, "area": area, "ratio": ratio,
                                      "hit": hit, "empty": empty}))
            gallery[rate][label] = maps[:keep].detach().clone()
    return FocusResult(pd.concat(rows, ignore_index=True), gallery, images[:keep], artifact[:keep])


def focus_table(focus: pd.DataFrame, config: ShortcutTestConfig) -> pd.DataFrame:
    """Per rate x method: mean share, share / area (1 = chance) and pointing-game hit rate with
    intervals; a one-sided Wilcoxon signed-rank test of share > area per image, Holm-corrected over the
    methods of a model ("above chance" at :data:`SIGNIFICANCE`); and the AUROC with which the share
    separates this model from the clean (lowest-rate) model on the same images (paired interval)."""
    from scipy.stats import wilcoxon

    clean_rate = min(focus["rate"])
    records = []
    for (rate, method), rows in focus.groupby(["rate", "method"], sort=False):
        rows = rows.sort_values("image")
        record: dict[str, Any] = {"model": rows["model"].iat[0], "rate": rate, "method": method,
                                  "n_images": len(rows), "empty_maps": int(rows["empty"].sum()),
                                  "area": float(rows["area"].mean())}
        for column in ("share", "ratio", "hit"):
            _with_interval(record, column, bootstrap_interval(np.mean, (rows[column].to_numpy(),), config.bootstrap,
                                                              config.seed))
        difference = rows["share"].to_numpy() - rows["area"].to_numpy()
        record["wilcoxon_p"] = float(wilcoxon(difference, alternative="greater").pvalue) if np.any(difference) else 1.0
        clean = focus[(focus["rate"] == clean_rate) & (focus["method"] == method)].sort_values("image")
        if rate != clean_rate and len(clean) == len(rows):
            _with_interval(record, "auroc_vs_clean", bootstrap_interval(
                separation_auroc, (rows["share"].to_numpy(), clean["share"].to_numpy()), config.bootstrap,
                config.seed))
        else:
            _with_interval(record, "auroc_vs_clean", (float("nan"),) * 3)
        records.append(record)
    table = pd.DataFrame(records)
    table["wilcoxon_p_holm"] = table.groupby("rate")["wilcoxon_p"].transform(lambda p: holm(p.to_numpy()))
    table["above_chance"] = table["wilcoxon_p_holm"] < SIGNIFICANCE
    return table


# --- 3. NAPs -------------------------------------------------------------------------------------


def _paired_batches(clean: Any, planted: Any, preprocess: Preprocess, batch_size: int = 16):
    """The same images without and with the artifact, labelled by a single 'artifact' column."""
    from cxrlens.data import XrayDataset

    for manifest, flag in ((clean, 0.0), (planted, 1.0)):
        dataset = XrayDataset(manifest, preprocess, cache=False)
        for start in range(0, len(dataset), batch_size):
            images = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
            yield images, torch.full((len(images), 1), flag)


def artifact_naps(runs: dict[float, LoadedRun], clean: Any, planted: Any, config: ShortcutTestConfig
                  ) -> tuple[pd.DataFrame, dict]:
    """Per run and NAP layer: how many feature maps separate the test images with the artifact from
    the same images without it (|d| >= :data:`SEPARATING_EFFECT`), and the strongest of them."""
    from cxrlens.nap import NapConfig, compute_naps

    preprocess = next(iter(runs.values())).config.preprocess
    names = {rate: f"{run.config.model}-{_rate_name(rate)}" for rate, run in runs.items()}
    nap_config = NapConfig(groups={"artifact": "artifact", "no artifact": "~artifact"},
                           separate=("artifact", "no artifact"), progress=config.progress, image_size=preprocess.size)
    results = compute_naps(
        {names[r]: run.model for r, run in runs.items()}, _paired_batches(clean, planted, preprocess), ("artifact",),
        nap_config, architectures={names[r]: run.config.model for r, run in runs.items()},
        total=len(clean) + len(planted),
    )
    records = []
    for rate in runs:
        for layer, nap in results[names[rate]].layers.items():
            live = nap.separation[~nap.dead] if nap.separation is not None else np.zeros(0)
            live = live[np.isfinite(live)]
            top = [int(i) for i in nap.separation_order[:5]] if nap.separation_order is not None else []
            records.append({
                "model": runs[rate].config.model, "rate": rate, "layer": layer, "live_maps": int(live.size),
                "separating_maps": int((live >= SEPARATING_EFFECT).sum()),
                "separating_share": float((live >= SEPARATING_EFFECT).mean()) if live.size else float("nan"),
                "max_separation": float(live.max()) if live.size else float("nan"),
                "top_maps": " ".join(map(str, top)),
            })
    return pd.DataFrame(records), {rate: results[names[rate]] for rate in runs}


# --- 4. the shortcut detector, unchanged ---------------------------------------------------------


def run_detector(run_dirs: dict[float, Path], planted: PlantedDataset, config: ShortcutTestConfig,
                 reliance: dict[float, float]) -> tuple[pd.DataFrame, dict]:
    """The scorecard and shortcut detector on every run, as a user would run them: on the lung-mask
    images with the artifact on the class (aligned), and the probe on the aligned test set. Returns
    one row per run (risk, flags, right or wrong) and the verdicts with their signals. ``reliance``: each
    rate's AUROC drop from aligned to swapped; whether a run has the shortcut is judged as in the
    calibration (:func:`_has_shortcut`: planted at p >= 0.5 *and* learned)."""
    from cxrlens.score import ScoreConfig, run_scorecard
    from cxrlens.score import shortcut as S
    from cxrlens.shortcuts import plant_mask_set

    out = Path(config.out)
    mask_csv = plant_mask_set(config.mask_dir or DEFAULT_MASKS, out / "data" / "lungmasks-planted", config.cls,
                              config.artifact, config.seed)
    params = {"integrated_gradients": {"n_steps": 16}} if "integrated_gradients" in config.detector_methods else {}
    score_config = ScoreConfig(
        masks=str(mask_csv.parent), methods=list(config.detector_methods), method_params=params,
        data=str(planted.test_set("aligned")), split="test", max_images=config.detector_images, steps=2,
        sanity_images=0, robustness_images=0, bootstrap=200, seed=config.seed, progress=config.progress,
    )
    card = run_scorecard(list(run_dirs.values()), out / "detector", score_config)
    thresholds = S.DetectorThresholds.load(config.thresholds or None)
    records, verdicts = [], {}
    for (rate, run_dir), name in zip(run_dirs.items(), card.verdicts, strict=True):
        shortcut = card.shortcut.get(name, {})
        rows = card.images[card.images["model"] == name]
        verdict = S.model_verdict(name, rows, probe=shortcut.get("probe"), performance=shortcut.get("performance"),
                                  sanity=card.sanity.get(name), thresholds=thresholds)
        signals = S.detector_signals(rows, shortcut.get("probe"), shortcut.get("performance"))
        verdicts[name] = {**verdict, "rate": rate, "run": str(run_dir), "signals": signals}
        truth = _has_shortcut(rate, reliance[rate])
        records.append({
            "model": config.model, "rate": rate, "run": name, "planted": truth, "risk": verdict["risk"],
            "attribution_flagged": verdict["attribution_flagged"],
            "correct": None if truth is None else verdict["attribution_flagged"] == truth,
            **{k: v for k, v in signals.items() if k != "by_class"}, "flags": "; ".join(verdict["flags"]),
        })
    return pd.DataFrame(records), {"thresholds": thresholds.to_json(), "artifact": asdict(config.artifact),
                                   "cls": config.cls, "verdicts": verdicts}


# --- figures -------------------------------------------------------------------------------------


def _errorbar(ax: Any, x: np.ndarray, frame: pd.DataFrame, column: str, **style: Any) -> None:
    low = np.nan_to_num(frame[column] - frame[f"{column}_low"], nan=0.0).clip(min=0)
    high = np.nan_to_num(frame[f"{column}_high"] - frame[column], nan=0.0).clip(min=0)
    ax.errorbar(x, frame[column], yerr=[low, high], capsize=2, marker="o", ms=3, **style)


def plot_results(reliance: pd.DataFrame, focus: pd.DataFrame, title: str = "") -> bytes:
    """Reliance (AUROC of the class on the three test sets) and artifact focus per method (share /
    area, log scale, 1 = chance) against the planting rate; one focus panel per architecture."""
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(reliance["model"]))
    fig = Figure(figsize=(5 + 5.5 * len(models), 4.2))
    axes = fig.subplots(1, 1 + len(models), squeeze=False)[0]
    for i, model in enumerate(models):
        rows = reliance[reliance["model"] == model].sort_values("rate")
        for version, ls in (("aligned", "-"), ("swapped", "--"), ("clean", ":")):
            _errorbar(axes[0], rows["rate"].to_numpy() + 0.01 * i, rows, f"{version}_auroc", color=f"C{i}", ls=ls,
                      label=f"{model}, {version}")
    axes[0].set(xlabel="planting rate p", ylabel="AUROC of the planted class", ylim=(0, 1.02),
                title="reliance: aligned (solid) vs swapped (dashed)")
    axes[0].axhline(0.5, color="grey", lw=0.6)
    axes[0].legend(fontsize=6)
    for ax, model in zip(axes[1:], models, strict=True):
        rows = focus[focus["model"] == model]
        for j, (method, part) in enumerate(rows.groupby("method", sort=False)):
            part = part.sort_values("rate")
            _errorbar(ax, part["rate"].to_numpy() + 0.008 * (j - 5), part, "ratio", color=f"C{j % 10}",
                      ls="-" if j < 10 else "--", label=method)
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set(xlabel="planting rate p", ylabel="attribution share on the artifact / its area share",
               title=f"{model}: artifact focus (1 = chance)")
        ax.legend(fontsize=6, ncol=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return figure_png(fig, dpi=90)


def plot_gallery(focus: FocusResult, rates: Sequence[float], cls: str) -> bytes:
    """Rows: methods; columns: each gallery image explained by the most planted model and by the clean
    model; positive attribution (magma) with the artifact's mask outlined (cyan)."""
    from matplotlib.figure import Figure

    high, low = max(rates), min(rates)
    methods = list(focus.gallery[high])
    n = len(focus.gallery_inputs)
    fig = Figure(figsize=(1.6 * 2 * n, 1.6 * len(methods) + 0.6))
    axes = fig.subplots(len(methods), 2 * n, squeeze=False)
    for r, method in enumerate(methods):
        for k in range(n):
            for c, rate in enumerate((high, low)):
                ax = axes[r, 2 * k + c]
                ax.axis("off")
                heat = focus.gallery[rate][method][k].clamp(min=0).numpy()
                top = np.percentile(heat, 99.5) if heat.max() > 0 else 1.0
                ax.imshow(focus.gallery_inputs[k, 0].numpy(), cmap="gray", vmin=0, vmax=1)
                ax.imshow(np.clip(heat / max(top, 1e-12), 0, 1), cmap="magma", alpha=0.55, vmin=0, vmax=1)
                ax.contour(focus.gallery_masks[k].numpy().astype(float), levels=[0.5], colors="cyan", linewidths=0.6)
                if r == 0:
                    ax.set_title(f"image {k + 1}, p = {rate:g}", fontsize=6)
                if 2 * k + c == 0:
                    ax.text(-0.05, 0.5, method, transform=ax.transAxes, ha="right", va="center", fontsize=6)
    fig.suptitle(f"evidence for {cls}: model trained with the artifact on p = {high:g} vs p = {low:g} of the "
                 "class; artifact outlined in cyan", fontsize=8)
    fig.tight_layout()
    return figure_png(fig, dpi=90)


# --- tables as markdown --------------------------------------------------------------------------


def _cell(record: Any, column: str, digits: int = 2) -> str:
    value = record[column]
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    text = f"{value:.{digits}f}"
    low, high = record.get(f"{column}_low"), record.get(f"{column}_high")
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def reliance_markdown(reliance: pd.DataFrame) -> str:
    rows = [[r["model"], f"{r['rate']:g}", f"{r['threshold']:.2f}", *(_cell(r, f"{v}_f1") for v in
             ("clean", "aligned", "swapped", "reliance")), *(_cell(r, f"{v}_auroc") for v in
             ("clean", "aligned", "swapped", "reliance"))] for r in reliance.to_dict("records")]
    return markdown_table(["model", "p", "threshold", "F1 clean", "F1 aligned", "F1 swapped", "F1 aligned − swapped",
                      "AUROC clean", "AUROC aligned", "AUROC swapped", "AUROC aligned − swapped"], rows)


def focus_markdown(table: pd.DataFrame) -> str:
    rows = [[r["model"], f"{r['rate']:g}", r["method"], r["n_images"], r.get("empty_maps", "–"), _cell(r, "share"),
             _cell(r, "ratio"), _cell(r, "hit"), f"{r['area']:.3f}", _cell(r, "auroc_vs_clean"),
             "yes" if r["above_chance"] else "no"] for r in table.to_dict("records")]
    return markdown_table(["model", "p", "method", "n", "empty maps", "share on artifact", "share / area (1 = chance)",
                      "points at artifact", "area share", "AUROC vs clean model", "above chance"], rows)


def nap_markdown(table: pd.DataFrame) -> str:
    rows = [[r["model"], f"{r['rate']:g}", r["layer"], f"{r['separating_maps']} of {r['live_maps']}",
             f"{r['max_separation']:.2f}", r["top_maps"]] for r in table.to_dict("records")]
    return markdown_table(["model", "p", "layer", f"maps with |d| >= {SEPARATING_EFFECT:g}", "largest |d|", "top maps"],
                     rows)


def detector_markdown(table: pd.DataFrame) -> str:
    def verdict_word(r: dict) -> str:
        return "–" if r["correct"] is None or pd.isna(r["correct"]) else "right" if r["correct"] else "WRONG"

    rows = [[r["model"], f"{r['rate']:g}", "–" if pd.isna(r["planted"]) else "yes" if r["planted"] else "no",
             r["risk"], "yes" if r["attribution_flagged"] else "no", verdict_word(r),
             *(f"{r[k]:.2f}" if pd.notna(r[k]) else "–" for k in
               ("lung_focus_ratio", "outside_body_ratio", "padding_ratio", "probe_margin", "source_spread"))]
            for r in table.to_dict("records")]
    return markdown_table(["model", "p", "has the shortcut", "risk", "location/padding flag", "verdict",
                      "lung focus / area", "outside thorax / area", "padding / area", "probe margin",
                      "source spread"], rows)


FIT_WORDS = {"pad": "zero-padded to a square, the study's", "crop": "cropped to content"}


def summary_markdown(config: ShortcutTestConfig, tables: dict[str, pd.DataFrame], thresholds_source: str) -> str:
    text = (f"# Shortcut test: {config.artifact.describe()} on {config.cls}\n\n"
            f"{config.model} at {config.image_size} px ({FIT_WORDS[config.fit]}), {config.epochs} epochs, planting "
            f"rates {', '.join(f'{r:g}' for r in config.rates)} (other classes {config.other_rate:g}); 95 % bootstrap "
            "intervals over test images in brackets.\n\n")
    if len(tables["focus"]) and (tables["focus"]["area"] == 0).all():
        text += ("**The artifact never reaches the model's input** (its area share is 0 on every image): the "
                 "preprocessing removes it, so there is nothing to learn or to explain.\n\n")
    text += ("## 1. Reliance\n\nF1 at the run's threshold (chosen on its "
            "planted validation split) and AUROC of the class on the clean, aligned (artifact on the class only) "
            "and swapped (artifact on the other classes only) test sets.\n\n" + reliance_markdown(tables["reliance"]))
    text += ("\n## 2. Which explanation finds the artifact\n\nOn the aligned test images that carry it: positive "
             "attribution inside the artifact's mask, the same divided by the mask's area share, how often the "
             "map's maximum lies on it, and how well that share tells this model from the clean one (AUROC; "
             "0.5 = not at all); 'empty maps': maps without a positive value (they count as nothing on the artifact). "
             "'above chance': share > area share per image by a one-sided Wilcoxon signed-rank "
             f"test, Holm-corrected over the methods of the model, at {SIGNIFICANCE:g}.\n\n"
             + focus_markdown(tables["focus"]))
    text += ("\n## 3. NAPs: feature maps that see the artifact\n\nThe same test images with and without the "
             "artifact; |d| = |difference of the groups' mean map activation| / pooled standard deviation.\n\n"
             + nap_markdown(tables["nap"]))
    if len(tables.get("detector", [])):
        text += ("\n## 4. The shortcut detector, unchanged\n\nScorecard on the lung-mask images with the artifact "
                 "on the class, probe on the aligned test set. Right = a location or padding flag for a model "
                 f"trained with p >= {PLANTED_RATE:g} that learned the artifact (AUROC drop >= {LEARNED_RELIANCE:g}), "
                 f"none for p = 0; '–': planted but not learned, not judged. Thresholds from: {thresholds_source}.\n\n"
                 + detector_markdown(tables["detector"]))
    return text


# --- entry point ---------------------------------------------------------------------------------


def _check_plantable(manifest: Any, artifact: ArtifactConfig, seed: int) -> None:
    """Plant the artifact on the data set's smallest image in memory: an artifact that cannot be
    planted fails here, before anything is written."""
    from cxrlens.data import read_image
    from cxrlens.shortcuts import plant

    frame = manifest.frame
    if {"width", "height"} <= set(frame.columns):
        area = pd.to_numeric(frame["width"], errors="coerce") * pd.to_numeric(frame["height"], errors="coerce")
        row = int(np.nanargmin(area.to_numpy())) if area.notna().any() else 0
    else:
        row = 0
    plant(read_image(frame["path"].iat[row]), artifact, seed)


def _load_runs(run_dirs: dict[float, Path], config: ShortcutTestConfig, num_classes: int) -> dict[float, LoadedRun]:
    from cxrlens.runs import load_run

    runs = {rate: load_run(path) for rate, path in run_dirs.items()}
    for run in runs.values():
        if run.config.image_size != config.image_size:
            raise CxrlensError(f"{run.run_dir} was trained at {run.config.image_size} px; pass --image-size "
                               f"{run.config.image_size} (every run of a shortcut test shares one size)")
        if run.config.fit != config.fit:
            raise CxrlensError(f"{run.run_dir} was trained with --fit {run.config.fit}; pass --fit {run.config.fit} "
                               "(every run of a shortcut test shares one preprocessing)")
        if run.taxonomy.num_classes != num_classes:
            raise CxrlensError(f"{run.run_dir} has {run.taxonomy.num_classes} outputs, the data {num_classes} classes")
    return runs


def run_shortcut_test(config: ShortcutTestConfig) -> dict:
    """Plant, train, measure and write everything (see the module docstring); returns the summary."""
    from cxrlens.data import load_manifest
    from cxrlens.shortcuts import TEST_VERSIONS, class_index, plant_dataset

    config.validate()
    manifest = load_manifest(config.data or None)
    index = class_index(manifest, config.cls)
    cls = manifest.taxonomy.classes[index]
    _check_plantable(manifest, config.artifact, config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(config))
    planted = {
        rate: plant_dataset(PlantConfig(out=str(out / "data" / _rate_name(rate)), data=config.data, cls=cls,
                                        artifact=config.artifact, rate=rate, other_rate=config.other_rate,
                                        seed=config.seed), progress=config.progress)
        for rate in config.rates
    }
    given = config.runs or ("",) * len(config.rates)
    run_dirs = {rate: _train_or_reuse(config, planted[rate], rate, g) for rate, g in zip(config.rates, given,
                                                                                          strict=True)}
    runs = _load_runs(run_dirs, config, manifest.taxonomy.num_classes)
    first = planted[config.rates[0]]
    tests = {v: load_manifest(first.test_set(v), manifest.taxonomy) for v in TEST_VERSIONS}
    _say(config, "reliance on the clean, aligned and swapped test sets")
    tables = {"reliance": reliance_table(runs, tests, index, config)}
    _say(config, f"artifact focus of {len(config.method_list)} attribution methods")
    focus = artifact_focus(runs, first.aligned_masks, index, config)
    tables["focus"] = focus_table(focus.images, config)
    _say(config, "NAPs of the test images with and without the artifact")
    tables["nap"], naps = artifact_naps(runs, tests["clean"], load_manifest(first.out / "test_planted.csv"), config)
    detector_json: dict = {}
    if config.detector:
        _say(config, "the shortcut detector on the planted lung-mask images")
        reliance = tables["reliance"].set_index("rate")["reliance_auroc"].to_dict()
        tables["detector"], detector_json = run_detector(run_dirs, first, config, reliance)
    summary = _write_outputs(out, config, tables, focus, naps, detector_json)
    return summary


def _say(config: ShortcutTestConfig, text: str) -> None:
    if config.progress:
        print(f"\n== {text}", flush=True)


def _write_outputs(out: Path, config: ShortcutTestConfig, tables: dict[str, pd.DataFrame], focus: FocusResult,
                   naps: dict, detector_json: dict) -> dict:
    from cxrlens.nap import plot_layer_grid

    files = {}
    for name, table in tables.items():
        files[f"{name}.csv"] = str(out / f"{name}.csv")
        atomic_write_text(out / f"{name}.csv", table.to_csv(index=False, float_format="%.5g"))
    atomic_write_text(out / "focus_images.csv", focus.images.to_csv(index=False, float_format="%.5g"))
    title = f"{config.artifact.describe()} on {config.cls}, {config.model} at {config.image_size} px"
    atomic_write_bytes(out / "shortcut_test.png", plot_results(tables["reliance"], tables["focus"], title))
    atomic_write_bytes(out / "gallery.png", plot_gallery(focus, config.rates, config.cls))
    for rate in (min(config.rates), max(config.rates)):
        result = naps[rate]
        layer = list(result.layers)[-1]
        save_figure(plot_layer_grid(result, layer), out / f"nap_{_rate_name(rate)}.png")
    source = detector_json.get("thresholds", {}).get("source", "")
    if detector_json:
        write_json(out / "detector.json", detector_json)
    atomic_write_text(out / "summary.md", summary_markdown(config, tables, source))
    files.update({name: str(out / name) for name in ("focus_images.csv", "shortcut_test.png", "gallery.png",
                                                     "summary.md", "summary.json")})
    summary = {"config": asdict(config), "class": config.cls, "artifact": config.artifact.describe(),
               "tables": {name: table.to_dict("records") for name, table in tables.items()},
               "thresholds_source": source, "files": files}
    write_json(out / "summary.json", summary)
    return summary


# --- calibrating the detector --------------------------------------------------------------------

LOCATION_KINDS = {"location", "padding"}
USED_AUROC = 0.75  # a signal counts towards the verdict when it separates planted from clean models this well


def _has_shortcut(rate: float, reliance: float) -> bool | None:
    """True: trained with p >= 0.5 and relies on the artifact (AUROC aligned - swapped >= 0.10); False:
    p = 0; None (left out): other rates, and planted models that did not learn the artifact."""
    if rate == 0:
        return False
    if rate >= PLANTED_RATE and np.isfinite(reliance) and reliance >= LEARNED_RELIANCE:
        return True
    return None


def detector_evaluations(result_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per model x shortcut test folder: architecture, artifact, rate, its reliance on the
    artifact (AUROC aligned - swapped, from ``reliance.csv``), whether it has the shortcut
    (:func:`_has_shortcut`), the run (a model evaluated in several folders is one run) and the
    detector's signals."""
    records = []
    for folder in result_dirs:
        path = Path(folder) / "detector.json"
        if not path.is_file():
            raise CxrlensError(f"{folder} has no detector.json; run `cxrlens shortcut-test` (with the detector) there")
        detector = json.loads(path.read_text())
        reliance_path = Path(folder) / "reliance.csv"
        reliance = pd.read_csv(reliance_path).set_index("rate")["reliance_auroc"].to_dict() \
            if reliance_path.is_file() else {}
        for name, verdict in detector["verdicts"].items():
            rate = float(verdict["rate"])
            relies = float(reliance.get(rate, np.nan))
            records.append({
                "folder": str(folder), "model": name, "run": str(Path(verdict["run"]).resolve()),
                "architecture": name.rsplit("-p", 1)[0], "artifact": detector["artifact"]["kind"], "rate": rate,
                "reliance_auroc": relies, "planted": _has_shortcut(rate, relies),
                **{k: np.nan if v is None else v for k, v in verdict["signals"].items() if k != "by_class"},
            })
    from cxrlens.score.shortcut import UNCALIBRATED

    return pd.DataFrame(records).reindex(columns=[*records[0], *(n for n in UNCALIBRATED if n not in records[0])]) \
        if records else pd.DataFrame()


def choose_threshold(values: np.ndarray, planted: np.ndarray, direction: str) -> float:
    """The threshold with the best balanced accuracy (Youden's J) between the values of models with
    and without the shortcut; among equally good ones, the middle one (the widest margin)."""
    finite = np.isfinite(values)
    values, planted = values[finite], planted[finite]
    if not planted.any() or planted.all():
        return float("nan")
    points = np.unique(values)
    candidates = np.concatenate([[points[0] - 1e-9], (points[:-1] + points[1:]) / 2, [points[-1] + 1e-9]])
    flagged = values[None, :] < candidates[:, None] if direction == "below" else values[None, :] >= candidates[:, None]
    youden = flagged[:, planted].mean(1) - flagged[:, ~planted].mean(1)
    if youden.max() <= 0:  # no threshold beats flagging nothing: flag nothing
        return float(candidates[0] if direction == "below" else candidates[-1])
    best = np.nonzero(youden >= youden.max() - 1e-12)[0]
    return float(candidates[best[len(best) // 2]])


def _calibrate_signals(frame: pd.DataFrame) -> dict:
    from cxrlens.score.shortcut import UNCALIBRATED, Signal

    planted = frame["planted"].astype(bool).to_numpy()
    signals = {}
    for name, default in UNCALIBRATED.items():
        values = frame[name].to_numpy(dtype=np.float64)
        finite = np.isfinite(values)
        oriented = -values if default.direction == "below" else values
        score = separation_auroc(oriented[finite & planted], oriented[finite & ~planted]) \
            if (finite & planted).any() and (finite & ~planted).any() else float("nan")
        threshold = choose_threshold(values, planted, default.direction)
        if default.kind in LOCATION_KINDS and not math.isfinite(threshold):
            signals[name] = Signal(default.threshold, default.direction, default.kind, False,
                                   "no evaluation measured it; hand-chosen, not counted")
        elif default.kind in LOCATION_KINDS:
            used = bool(score >= USED_AUROC)
            note = f"AUROC planted vs clean {score:.2f} over {int(finite.sum())} evaluations"
            signals[name] = Signal(threshold, default.direction, default.kind, used, note)
        else:  # the source signals: planting does not change the sources, so it cannot calibrate them
            note = (f"hand-chosen; AUROC planted vs clean {score:.2f}: planting does not change where images come "
                    "from, so it cannot test a source signal")
            signals[name] = Signal(default.threshold, default.direction, default.kind, default.used, note)
    return signals


def _detector_errors(frame: pd.DataFrame, signals: dict) -> dict:
    """False flags on clean models and misses at p >= 0.5 of the location/padding flag."""
    used = [n for n, s in signals.items() if s.used and s.kind in LOCATION_KINDS]
    flagged = np.zeros(len(frame), dtype=bool)
    for name in used:
        flagged |= np.array([signals[name].flags(v) for v in frame[name]])
    planted = frame["planted"].astype(bool).to_numpy()
    return {
        "signals": used,
        "clean": int((~planted).sum()), "false_flags": int((flagged & ~planted).sum()),
        "planted": int(planted.sum()), "misses": int((~flagged & planted).sum()),
        "false_flag_rate": float((flagged & ~planted).sum() / max((~planted).sum(), 1)),
        "miss_rate": float((~flagged & planted).sum() / max(planted.sum(), 1)),
        "flagged": flagged.tolist(),
    }


def _cross_validated(frame: pd.DataFrame) -> tuple[np.ndarray, int]:
    """The location/padding flag of each evaluation with thresholds chosen without its run, and how
    many evaluations kept their in-sample flag (their run was the only one with or without the shortcut)."""
    flagged = frame["flagged"].to_numpy().copy()
    kept = 0
    for run in frame["run"].unique():
        held = (frame["run"] == run).to_numpy()
        rest = frame[~held]
        if rest["planted"].nunique() < 2:
            kept += int(held.sum())
            continue
        signals = _calibrate_signals(rest)
        flagged[held] = _detector_errors(frame[held], signals)["flagged"]
    return flagged, kept


def calibrate(result_dirs: Sequence[str | Path], out: str | Path, source: str = "") -> dict:
    """Choose the detector's location and padding thresholds from shortcut-test folders (models trained
    with p >= 0.5 that rely on the artifact have the shortcut, p = 0 models do not; other rates and
    planted models that did not learn the artifact are left out and counted) and measure its error
    rates, in-sample and leave-one-run-out. Writes ``calibration.json`` (a file
    :meth:`~cxrlens.score.shortcut.DetectorThresholds.load` reads; copy it over
    ``score/shortcut_calibration.json`` to make it the default), ``calibration.csv`` and ``calibration.md``."""
    from cxrlens.score.shortcut import DetectorThresholds

    everything = detector_evaluations(result_dirs)
    frame = everything[everything["planted"].notna()].reset_index(drop=True)
    not_learned = everything[(everything["rate"] >= PLANTED_RATE) & everything["planted"].isna()]
    if frame["planted"].nunique() < 2:
        raise CxrlensError("calibration needs models with (p >= 0.5) and without (p = 0) the shortcut")
    signals = _calibrate_signals(frame)
    errors = _detector_errors(frame, signals)
    frame["flagged"] = errors.pop("flagged")
    frame["flagged_cross_validated"], kept = _cross_validated(frame)
    planted = frame["planted"].astype(bool)
    cross = {"false_flags": int((frame["flagged_cross_validated"] & ~planted).sum()),
             "misses": int((~frame["flagged_cross_validated"] & planted).sum()), "in_sample_only": kept}
    cross["false_flag_rate"] = cross["false_flags"] / max(int((~planted).sum()), 1)
    cross["miss_rate"] = cross["misses"] / max(int(planted.sum()), 1)
    runs = frame["run"].nunique()
    described = (f"{len(frame)} evaluations of {runs} runs ({', '.join(sorted(frame['architecture'].unique()))}; "
                 f"artifacts {', '.join(sorted(frame['artifact'].unique()))}; rates "
                 f"{', '.join(f'{r:g}' for r in sorted(frame['rate'].unique()))})")
    left_out = {"planted_not_learned": [f"{r['model']} ({r['artifact']}, AUROC drop {r['reliance_auroc']:.2f})"
                                        for _, r in not_learned.iterrows()]}
    thresholds = DetectorThresholds(signals, source or f"calibrated by cxrlens.shortcut_test.calibrate on {described}",
                                    {"in_sample": errors, "leave_one_run_out": cross, **left_out})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "calibration.json", thresholds.to_json())
    atomic_write_text(out / "calibration.csv", frame.to_csv(index=False, float_format="%.5g"))
    atomic_write_text(out / "calibration.md", _calibration_markdown(thresholds))
    return {"thresholds": thresholds.to_json(), "evaluations": frame}


def _calibration_markdown(thresholds: Any) -> str:
    from cxrlens.score.shortcut import SIGNAL_TEXT

    rows = [[name, SIGNAL_TEXT[name], s.rule(name), "yes" if s.used else "no", s.note]
            for name, s in thresholds.signals.items()]
    inside, cross = thresholds.error_rates["in_sample"], thresholds.error_rates["leave_one_run_out"]

    def rates(e: dict) -> str:
        return (f"{e['false_flags']} false flags on {inside['clean']} clean evaluations "
                f"({100 * e['false_flag_rate']:.0f} %), {e['misses']} misses on {inside['planted']} planted ones "
                f"({100 * e['miss_rate']:.0f} %)")

    return (f"# Shortcut-detector calibration\n\n{thresholds.source}.\n\n"
            + markdown_table(["signal", "meaning", "flag", "counted", "evidence"], rows)
            + f"\nThe location/padding flag, in-sample: {rates(inside)}; leave-one-run-out: {rates(cross)}"
            + (f" ({cross['in_sample_only']} evaluations whose run could not be left out keep their in-sample flag)"
               if cross.get("in_sample_only") else "") + ".\n"
            + (f"\nLeft out: planted models that did not learn the artifact (AUROC drop from aligned to swapped "
               f"< {LEARNED_RELIANCE:g}): {', '.join(thresholds.error_rates['planted_not_learned'])}.\n"
               if thresholds.error_rates.get("planted_not_learned") else ""))
