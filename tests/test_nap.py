"""Neuron Activation Profiles: closed-form checks on a hand-built network, streaming == direct on
real images, flat memory, layer-name errors and the group expression parser."""

from __future__ import annotations

import itertools
import json
import os
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cxrlens.errors import CxrlensError
from cxrlens.nap import NapConfig, compute_naps, parse_group, resolve_groups, run_nap

CLASSES = ("COVID-19", "Pneumonia", "Normal")
COVID, PNEUMONIA, NORMAL = [1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]


# --- (1) closed form ------------------------------------------------------------------------------

class Toy(nn.Module):
    """1x1 conv of the first input channel x: maps x, 2x + 1, the constant 5 and relu(-x - 1) = 0
    (for x >= 0), then a 2x2 average pool and a linear head on the global mean."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 0.0, -1.0])
            self.conv.bias.copy_(torch.tensor([0.0, 1.0, 5.0, -1.0]))
            self.head.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.pool(self.act(self.conv(x))).mean(dim=(2, 3)))


def _toy_batches(batch_size=3):
    """Image i is a_i * P (integers, so every activation is exact in float32)."""
    pattern = torch.tensor(np.arange(64).reshape(8, 8) % 4, dtype=torch.float32)  # 0..3, not constant
    scales = [1, 2, 3, 4, 2, 3, 1, 4]
    labels = [COVID, COVID, COVID, PNEUMONIA, PNEUMONIA, NORMAL, NORMAL, NORMAL]
    images = torch.stack([a * pattern for a in scales])[:, None].expand(-1, 3, -1, -1)
    targets = torch.tensor(labels)
    batches = [(images[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, 8, batch_size)]
    return batches, pattern.double().numpy(), np.array(scales, dtype=np.float64), np.array(labels, dtype=bool)


def _closed_form(pattern, scales, labels, layer, weight=None):
    """Expected group NAPs [4 groups, 4 maps, h, w] of the toy network, from the formula."""
    groups = [labels[:, 0], labels[:, 1], labels[:, 1] & ~labels[:, 0], ~labels[:, 1] & ~labels[:, 0]]
    p = pattern if layer == "act" else pattern.reshape(4, 2, 4, 2).mean(axis=(1, 3))
    naps = []
    for g in groups:
        n, s = g.sum(), scales[g].sum()
        maps = [s * p / n, (2 * s * p + n) / n, np.full_like(p, 5.0), np.zeros_like(p)]
        if weight is not None:  # d logit / d activation = head weight / number of positions
            maps = [m * w / p.size for m, w in zip(maps, weight, strict=True)]
        naps.append(np.stack(maps))
    return np.stack(naps), np.array([g.sum() for g in groups])


def test_closed_form_group_means_contrast_and_dead_maps():
    batches, pattern, scales, labels = _toy_batches()
    result = compute_naps({"toy": Toy()}, batches, CLASSES, NapConfig(layers=["act", "pool"], progress=False))["toy"]
    assert result.groups == ["COVID-19", "Pneumonia", "Pneumonia without COVID-19", "Healthy"]
    for layer in ("act", "pool"):
        expected, counts = _closed_form(pattern, scales, labels, layer)
        nap = result.layers[layer]
        np.testing.assert_array_equal(result.counts, counts)
        np.testing.assert_array_equal(nap.nap, expected)  # exact: integers summed in float64
        np.testing.assert_allclose(nap.contrastive, expected - expected.mean(axis=0), rtol=0, atol=1e-12)
        # only x and 2x + 1 vary; the constant 5 and the always-zero ReLU map are dead
        np.testing.assert_array_equal(nap.dead, [False, False, True, True])
        assert nap.dead_share == 0.5
        p = pattern if layer == "act" else pattern.reshape(4, 2, 4, 2).mean(axis=(1, 3))
        low, high = scales.min() * p.min(), scales.max() * p.max()
        np.testing.assert_array_equal(nap.act_min, [low, 2 * low + 1, 5, 0])
        np.testing.assert_array_equal(nap.act_max, [high, 2 * high + 1, 5, 0])
        assert set(nap.top_maps) == {0, 1} and nap.top_maps[0] == 1  # 2x + 1 varies twice as much
        # spatially averaged maps, their group means and the COVID-19 vs other-pneumonia separation
        np.testing.assert_allclose(nap.map_mean, expected.mean(axis=(2, 3)), rtol=1e-12)
        assert np.isnan(nap.separation[2:]).all() and np.isfinite(nap.separation[:2]).all()
    # the weighted contrast centres on the size-weighted mean of the groups
    weighted = compute_naps(
        {"toy": Toy()}, batches, CLASSES, NapConfig(layers=["act"], contrast_weighted=True, progress=False)
    )["toy"].layers["act"]
    expected, counts = _closed_form(pattern, scales, labels, "act")
    centre = np.tensordot(counts / counts.sum(), expected, axes=1)
    np.testing.assert_allclose(weighted.contrastive, expected - centre, rtol=0, atol=1e-12)
    # mean input per group
    np.testing.assert_allclose(result.input_mean[0, 0], scales[:3].mean() * pattern, rtol=1e-12)


def test_closed_form_gradient_weighted():
    batches, pattern, scales, labels = _toy_batches(batch_size=8)
    result = compute_naps(
        {"toy": Toy()}, batches, CLASSES,
        NapConfig(layers=["act", "pool"], gradient_weighted="covid-19", progress=False),
    )["toy"]
    assert result.gradient_class == "COVID-19"
    weight = Toy().head.weight[0].detach().double().numpy()
    for layer in ("act", "pool"):
        expected, _ = _closed_form(pattern, scales, labels, layer, weight)
        np.testing.assert_allclose(result.layers[layer].nap, expected, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(result.layers[layer].dead, [False, False, True, True])  # raw activations


class InPlace(Toy):
    """Overwrites the conv output in place after the hook saw it, and runs ``act`` twice."""

    def forward(self, x):
        c = self.conv(x)
        c += 100.0
        return self.head(self.act(c).mean(dim=(2, 3)))

    def twice(self, x):
        return self.head(self.act(self.act(self.conv(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("gradient", [False, True])
def test_outputs_changed_in_place_are_copied(gradient):
    batches, pattern, scales, labels = _toy_batches()
    result = compute_naps(
        {"m": InPlace()}, batches, CLASSES, NapConfig(layers=["conv"], gradient_weighted=gradient, progress=False)
    )["m"]
    expected, _ = _closed_form(pattern, scales, labels, "act")
    if not gradient:
        expected[:, 3] = -expected[:, 0] - 1  # conv output before the ReLU
        np.testing.assert_array_equal(result.layers["conv"].nap, expected)
    else:  # the gradient still reaches the copied tensor: d logit / d conv = w_c * relu'(c + 100) / positions
        weight = Toy().head.weight[0].detach().double().numpy()
        np.testing.assert_allclose(result.layers["conv"].nap[:, :3], expected[:, :3] * weight[:3, None, None] / 64)


def test_layer_running_twice_is_refused():
    model = InPlace()
    model.forward = model.twice
    batches, *_ = _toy_batches()
    with pytest.raises(CxrlensError, match="more than once"):
        compute_naps({"m": model}, batches, CLASSES, NapConfig(layers=["act"], progress=False))


# --- (2) streaming == direct on real images --------------------------------------------------------

@pytest.fixture(scope="module")
def small_manifest(cxr3_manifest):
    """12 real test images, 4 per class."""
    test = cxr3_manifest.split("test")
    picks = []
    for cls in ("covid", "pneumonia", "normal"):
        picks += list(test.frame.index[test.frame["cls"] == cls][:4])
    return test.select(test.frame.index.isin(picks))


def _direct(model, loader, layers, groups, gradient_class=None):
    """Reference: keep every activation of every image, then average (what streaming avoids)."""
    store = {n: [] for n in layers}
    current = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: current.__setitem__(n, o)) for n in layers]
    labels, preds = [], []
    try:
        for images, targets in loader:
            x = images.clone().requires_grad_(gradient_class is not None)
            with torch.set_grad_enabled(gradient_class is not None):
                logits = model(x)
            grads = (
                torch.autograd.grad(logits[:, gradient_class].sum(), [current[n] for n in layers])
                if gradient_class is not None else [None] * len(layers)
            )
            for n, g in zip(layers, grads, strict=True):
                act = current[n].detach()
                store[n].append(((act * g) if g is not None else act, act))
            labels.append(targets.numpy() > 0.5)
            preds.append(torch.sigmoid(logits.detach()).numpy() >= 0.5)
    finally:
        for h in handles:
            h.remove()
    labels, preds = np.concatenate(labels), np.concatenate(preds)
    masks = np.stack([g.evaluate(labels, preds) for _, g in groups], axis=1)
    valid = masks.sum(axis=0) > 0  # empty groups have no NAP and do not enter the contrast
    out = {}
    for n in layers:
        profiled = torch.cat([p for p, _ in store[n]]).double().numpy()
        raw = torch.cat([a for _, a in store[n]]).numpy()
        nap = np.stack([profiled[m].mean(axis=0) if m.any() else np.full(profiled.shape[1:], np.nan) for m in masks.T])
        spatial = profiled.mean(axis=(2, 3))
        out[n] = {
            "nap": nap,
            "contrastive": nap - nap[valid].mean(axis=0),
            "dead": (raw.max(axis=(0, 2, 3)) == raw.min(axis=(0, 2, 3))),
            "map_mean": nap.mean(axis=(2, 3)),
            "map_std": np.stack([spatial[m].std(axis=0, ddof=1) if m.sum() > 1 else spatial[0] * np.nan
                                 for m in masks.T]),
        }
    return out, masks.sum(axis=0)


@pytest.mark.numerics
@pytest.mark.parametrize("groups, gradient", [(None, False), ("errors", "COVID-19")])
def test_streaming_equals_direct_on_real_images(small_manifest, tmp_path, groups, gradient):
    from cxrlens.data import XrayDataset
    from cxrlens.models import MODELS, create_model

    torch.manual_seed(0)
    model = create_model("resnet18", 3).eval()
    layers = list(MODELS["resnet18"].nap_layers)
    out = run_nap(
        {"resnet18": model}, small_manifest, tmp_path,
        NapConfig(groups=groups, batch_size=5, image_size=64, gradient_weighted=gradient, progress=False,
                  figures=groups is None),
    )
    result = out["results"]["resnet18"]
    assert result.images == 12
    loader = DataLoader(XrayDataset(small_manifest, 64, cache=False), batch_size=5)  # the same batches
    named = resolve_groups(groups, CLASSES)
    expected, counts = _direct(model, loader, layers, named, 0 if gradient else None)
    np.testing.assert_array_equal(result.counts, counts)
    for n in layers:
        got, want = result.layers[n], expected[n]
        np.testing.assert_allclose(got.nap, want["nap"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.contrastive, want["contrastive"], rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(got.dead, want["dead"])
        np.testing.assert_allclose(got.map_mean, want["map_mean"], rtol=1e-9, atol=1e-12)
        # Streamed variance is E[x^2] - E[x]^2 in float64: cancellation costs log10(mean^2 / var) of float64's
        # 16 digits (at most 10 here), so 1e-6; the cosine distance 1 - cos likewise.
        np.testing.assert_allclose(got.map_std, want["map_std"], rtol=1e-6, atol=1e-9)
        live = want["nap"][:, ~want["dead"]].reshape(len(counts), -1)
        distance = np.linalg.norm(live[0] - live[-1])
        np.testing.assert_allclose(got.distances["euclidean"][0, -1], distance, rtol=1e-9)
        np.testing.assert_allclose(got.distances["euclidean"].diagonal()[counts > 0], 0, atol=1e-12)
        cosine = 1 - live[0] @ live[-1] / np.linalg.norm(live[0]) / np.linalg.norm(live[-1])
        np.testing.assert_allclose(got.distances["cosine"][0, -1], cosine, rtol=1e-6, atol=1e-12)
    # files: npz holds the same NAPs (float32), stats JSON is strict and consistent
    names = {os.path.basename(f) for f in out["files"]}
    assert {"nap_resnet18.npz", "nap_stats.json"} <= names
    if groups is None:
        assert {"nap_resnet18_layer4.png", "nap_resnet18_inputs.png", "nap_dead_maps.png"} <= names
    with np.load(tmp_path / "nap_resnet18.npz") as z:
        # stored as float32: one rounding (u = 6e-8) of each value, so 16 u relative
        np.testing.assert_allclose(z["layer3/nap"], result.layers["layer3"].nap, rtol=1e-6, atol=1e-7)
        assert list(z["groups"]) == result.groups
    stats = json.loads((tmp_path / "nap_stats.json").read_text())["models"]["resnet18"]
    assert [g["images"] for g in stats["groups"]] == list(counts)
    assert stats["layers"]["layer2"]["dead_maps"] == int(expected["layer2"]["dead"].sum())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_run_nap_with_loaded_runs(small_manifest, tmp_path):
    from cxrlens.models import create_model
    from cxrlens.runs import TrainConfig, load_run, save_model_weights

    for name in ("a", "b"):  # two runs: their names pick the output files
        run_dir = tmp_path / name / "run"
        TrainConfig(model="resnet18", image_size=48, out=str(run_dir)).save(run_dir)
        save_model_weights(create_model("resnet18", 3), run_dir / "best.safetensors")
    runs = [load_run(tmp_path / n / "run") for n in ("a", "b")]
    out = run_nap(runs, small_manifest, tmp_path / "nap",
                  NapConfig(layers=["layer3"], groups=["Normal", "~Normal"], progress=False, figures=False))
    assert sorted(out["results"]) == ["run", "run-2"]
    assert (tmp_path / "nap" / "nap_run.npz").is_file() and (tmp_path / "nap" / "nap_run-2.npz").is_file()
    stats = out["stats"]["models"]["run"]
    assert stats["image_size"] == 48 and stats["architecture"] == "resnet18"
    assert [g["images"] for g in stats["groups"]] == [4, 8]
    assert stats["layers"]["layer3"]["shape"] == [256, 3, 3]
    saved = json.loads((tmp_path / "nap" / "config.json").read_text())  # what re-runs it
    assert saved["runs"] == [str(tmp_path / n / "run") for n in ("a", "b")] and saved["layers"] == ["layer3"]
    assert saved["groups"] == ["Normal", "~Normal"] and saved["images"] == len(small_manifest)
    from cxrlens.taxonomy import PAPER14

    other = small_manifest.__class__(small_manifest.frame, np.zeros((12, 14), np.float32), PAPER14, tmp_path)
    with pytest.raises(CxrlensError, match="taxonomy"):
        run_nap(runs, other, tmp_path / "x", NapConfig(progress=False))


# --- (3) memory stays flat ----------------------------------------------------------------------

class Generated(Dataset):
    """Images made on demand from their index (nothing stored), labels cycling through the classes."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, 64, 64, generator=g), torch.tensor((COVID, PNEUMONIA, NORMAL)[i % 3])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _profile_memory(model, n):
    """Peak Python-side (tracemalloc: numpy accumulators, lists, dicts) and peak RSS during the pass."""
    rss = []

    def batches():
        for batch in DataLoader(Generated(n), batch_size=25):
            rss.append(_rss_bytes())
            yield batch

    tracemalloc.start()
    try:
        config = NapConfig(layers=["0", "2"], progress=False)
        result = compute_naps({"small": model}, batches(), CLASSES, config)["small"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss.append(_rss_bytes())
    return result, peak, max(rss)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc for RSS")
def test_memory_does_not_grow_with_images():
    torch.manual_seed(0)
    # 16 x 64 x 64 floats per image at layer "0": keeping them all would take 256 kB per image
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    _profile_memory(model, 50)  # warm-up: first-call allocations of torch and numpy
    small, peak_small, rss_small = _profile_memory(model, 50)
    large, peak_large, rss_large = _profile_memory(model, 500)
    assert small.images == 50 and large.images == 500
    assert large.accumulator_bytes == small.accumulator_bytes > 0
    assert peak_large <= peak_small * 1.05 + 64_000, (peak_small, peak_large)
    # storing 450 more images' activations would add > 100 MB; allow allocator noise only
    assert rss_large - rss_small < 30e6, (rss_small, rss_large)


# --- (4) layer names ------------------------------------------------------------------------------

def test_unknown_layer_names_the_valid_ones(small_manifest, tmp_path):
    from cxrlens.models import create_model

    model = create_model("resnet18", 3)
    with pytest.raises(CxrlensError) as err:
        run_nap({"resnet18": model}, small_manifest, tmp_path,
                NapConfig(layers=["layer9"], image_size=64, progress=False))
    message = str(err.value)
    assert "'layer9'" in message and "layer4" in message and "maxpool" in message and "\n" not in message
    assert not list(tmp_path.iterdir())  # checked before any image is read or file written
    with pytest.raises(CxrlensError, match="no default NAP layers"):
        compute_naps({"toy": Toy()}, [], CLASSES, NapConfig(progress=False))
    with pytest.raises(CxrlensError, match="top-level modules: conv, act, pool, head"):
        compute_naps({"toy": Toy()}, [], CLASSES, NapConfig(layers=["relu"], progress=False))


# --- (5) group expressions ------------------------------------------------------------------------

ALL_LABELS = np.array(list(itertools.product([False, True], repeat=3)))  # every label combination


@pytest.mark.parametrize(
    "text, expected",
    [
        ("COVID-19", lambda c, p, n: c),
        ("Pneumonia & ~COVID-19", lambda c, p, n: p and not c),
        ("~Pneumonia", lambda c, p, n: not p),
        ("COVID-19 | Pneumonia & Normal", lambda c, p, n: c or (p and n)),  # & binds tighter than |
        ("(COVID-19 | Pneumonia) & Normal", lambda c, p, n: (c or p) and n),
        ("~COVID-19 & Pneumonia", lambda c, p, n: (not c) and p),  # ~ binds tightest
        ("~(COVID-19 | Pneumonia)", lambda c, p, n: not (c or p)),
        ("~~Normal", lambda c, p, n: n),
        ("  covid_19&PNEUMONIA  ", lambda c, p, n: c and p),  # case, spacing and - / _ are free
        ("((normal))", lambda c, p, n: n),
    ],
)
def test_group_expressions(text, expected):
    group = parse_group(text, CLASSES)
    assert not group.uses_predictions
    want = [expected(*row) for row in ALL_LABELS.tolist()]
    np.testing.assert_array_equal(group.evaluate(ALL_LABELS), want)
    np.testing.assert_array_equal(group.evaluate(torch.from_numpy(ALL_LABELS)).numpy(), want)  # torch too


def test_prediction_atoms_and_group_specs():
    group = parse_group("COVID-19 & ~pred:COVID-19", CLASSES)  # missed COVID-19
    assert group.uses_predictions
    preds = ~ALL_LABELS
    np.testing.assert_array_equal(group.evaluate(ALL_LABELS, preds), ALL_LABELS[:, 0])
    with pytest.raises(CxrlensError, match="uses predictions"):
        group.evaluate(ALL_LABELS)
    errors = dict(resolve_groups("errors", CLASSES))
    assert list(errors) == [f"{c} {k}" for c in CLASSES for k in ("correct", "incorrect")]
    correct = errors["Normal correct"].evaluate(ALL_LABELS, ALL_LABELS)
    assert correct.all() and not errors["Normal incorrect"].evaluate(ALL_LABELS, ALL_LABELS).any()
    named = resolve_groups(["sick=Pneumonia", "Normal"], CLASSES)
    assert [n for n, _ in named] == ["sick", "Normal"]
    assert [n for n, _ in resolve_groups({"a": "Normal"}, CLASSES)] == ["a"]
    with pytest.raises(CxrlensError, match="given twice"):
        resolve_groups(["x=Normal", "x=Pneumonia"], CLASSES)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "empty"),
        ("COVID-19 &", "ends where"),
        ("(COVID-19 | Normal", "never closed"),
        ("COVID-19)", "unexpected ')'"),
        ("& Normal", "unexpected '&'"),
        ("Flu", "unknown class 'Flu'"),
        ("Normal &\n", "ends where"),  # the message stays one line
        ("pred:Flu", "unknown class 'Flu'"),
        ("__import__('os').system('true')", "unknown class"),
        ("Normal Pneumonia", "unknown class 'Normal Pneumonia'"),
        ("(" * 60 + "Normal" + ")" * 60, "nested deeper"),
        ("~" * 501, "characters long"),
    ],
)
def test_bad_group_expressions(text, problem):
    with pytest.raises(CxrlensError, match=problem.replace("(", r"\(").replace(")", r"\)")) as err:
        parse_group(text, CLASSES)
    assert "\n" not in str(err.value)
    if "long" not in problem:  # the message says how to write an expression
        assert "COVID-19, Pneumonia, Normal" in str(err.value) and "Pneumonia & ~COVID-19" in str(err.value)
