"""Scorecard metrics on hand-made maps with known answers, equality with Quantus, the mask loader on
the vendored lung masks, the shortcut probe and verdicts, and one small end-to-end scorecard."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxrlens.data import Preprocess
from cxrlens.errors import CxrlensError
from cxrlens.score import masks as K
from cxrlens.score import metrics as M
from cxrlens.score import shortcut as S

ROOT = Path(__file__).resolve().parents[1]
LUNGMASKS = ROOT / "data" / "lungmasks"


def _quantus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("quantus")


def tiny_cnn(in_channels: int = 3, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes),
    ).eval()


def gradient_explainer(targets: list[int]):
    """Absolute input gradient of each target, summed over channels: [B, T, H, W]."""

    def explain(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().clone().requires_grad_(True)
        out = model(x)
        grads = [torch.autograd.grad(out[:, t].sum(), x, retain_graph=True)[0].abs().sum(1) for t in targets]
        return torch.stack(grads, 1)

    return explain


def sobel_explainer(n_targets: int = 1):
    """Edge magnitude of the input: ignores the model entirely, so it must fail the randomisation check."""
    kx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])

    def explain(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        grey = images.mean(1, keepdim=True)
        gx = F.conv2d(grey, kx.view(1, 1, 3, 3), padding=1)
        gy = F.conv2d(grey, kx.T.reshape(1, 1, 3, 3), padding=1)
        return (gx**2 + gy**2).sqrt().expand(-1, n_targets, -1, -1)

    return explain


# --- localisation: known answers -----------------------------------------------------------------


def test_mass_share_known_answers():
    mask = torch.zeros(4, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 8:24] = True
    maps = torch.zeros(4, 1, 32, 32)
    maps[0, 0, 10:20, 10:20] = 1.0  # entirely inside
    maps[1, 0, :, :16] = 1.0  # half of it inside: 16*16/2 of 32*16 pixels
    maps[2, 0] = -1.0  # only negative evidence: undefined
    maps[2, 0, 0, 0] = 2.0  # ... plus one positive pixel outside
    maps[3, 0, 10:20, 10:20] = 1.0
    maps[3, 0, :2, :] = -5.0  # negative attribution outside is ignored
    share = M.mass_share(maps, mask)[:, 0]
    assert share[0] == 1.0 and share[3] == 1.0
    assert share[1] == pytest.approx(128 / 512)
    assert share[2] == 0.0
    empty = torch.zeros_like(mask)
    assert torch.isnan(M.mass_share(maps, empty)).all()
    assert torch.isnan(M.mass_share(torch.zeros(1, 1, 32, 32), mask[:1])).all()  # no positive mass


def test_random_map_scores_its_mask_area():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(8, 64, 64, generator=generator) < 0.3
    mask[:, :20] = True  # a block too, area about 0.5
    maps = torch.rand(8, 2, 64, 64, generator=generator)
    area = M.mask_share(mask)
    assert (M.mass_share(maps, mask) - area[:, None]).abs().max() < 0.02
    assert (M.relevance_rank_accuracy(maps, mask) - area[:, None]).abs().max() < 0.03


def test_rank_accuracy_and_pointing_game_known_answers():
    mask = torch.zeros(3, 40, 40, dtype=torch.bool)
    mask[:, 10:20, 10:30] = True
    noise = torch.rand(3, 1, 40, 40, generator=torch.Generator().manual_seed(1)) * 0.1
    inside = mask[:, None].float() + noise  # every mask pixel outranks every other pixel
    assert (M.relevance_rank_accuracy(inside, mask) == 1).all()
    assert (M.pointing_game(inside, mask) == 1).all()
    outside = noise.clone()
    outside[:, 0, 25, 20] = 5.0  # the maximum lies 5 px below the mask's lower edge (row 19)
    assert (M.pointing_game(outside, mask) == 0).all()
    assert (M.pointing_game(outside, mask, tolerance=4) == 0).all()
    assert (M.pointing_game(outside, mask, tolerance=6) == 1).all()
    flipped = 1 - mask[:, None].float()  # all relevance outside the mask
    assert (M.relevance_rank_accuracy(flipped, mask) == 0).all()
    assert torch.isnan(M.pointing_game(inside, torch.zeros_like(mask))).all()


def test_localisation_equals_quantus():
    quantus = _quantus()
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(6, 1, 24, 24))
    masks = rng.random((6, 1, 24, 24)) < rng.uniform(0.1, 0.6, size=(6, 1, 1, 1))
    masks[:, :, 5:9, 5:9] = True  # never empty (Quantus scores an empty mask as a hit)
    x, y = np.zeros((6, 1, 24, 24)), np.zeros(6, dtype=int)
    kwargs = dict(model=None, x_batch=x, y_batch=y, s_batch=masks.astype(float))
    a, m = torch.from_numpy(maps), torch.from_numpy(masks[:, 0])
    ours = {
        # our relevance mass counts positive attribution only: equal on non-negative maps
        "mass": M.mass_share(a.clamp(min=0), m)[:, 0].numpy(),
        "mass_signed": M.mass_share(a, m)[:, 0].numpy(),
        "rank": M.relevance_rank_accuracy(a, m)[:, 0].numpy(),
        "pointing": M.pointing_game(a, m)[:, 0].numpy(),
    }
    theirs = {
        "mass": quantus.RelevanceMassAccuracy(disable_warnings=True)(a_batch=np.clip(maps, 0, None), **kwargs),
        "rank": quantus.RelevanceRankAccuracy(disable_warnings=True)(a_batch=maps, **kwargs),
        "pointing": quantus.PointingGame(disable_warnings=True)(a_batch=maps, **kwargs),
    }
    np.testing.assert_allclose(ours["mass"], theirs["mass"], rtol=1e-12)
    np.testing.assert_allclose(ours["mass_signed"], theirs["mass"], rtol=1e-12)  # negatives are dropped
    np.testing.assert_allclose(ours["rank"], theirs["rank"], rtol=1e-12)
    np.testing.assert_array_equal(ours["pointing"], np.asarray(theirs["pointing"], dtype=float))


# --- similarity ----------------------------------------------------------------------------------


def test_spearman_and_ssim_match_scipy_and_skimage():
    scipy_stats = pytest.importorskip("scipy.stats")
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(2)
    a = rng.integers(0, 6, size=(3, 12, 12)).astype(float)  # many ties
    b = a + rng.normal(size=a.shape)
    rho = M.spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    expected = [scipy_stats.spearmanr(a[i].ravel(), b[i].ravel())[0] for i in range(3)]
    np.testing.assert_allclose(rho, expected, rtol=1e-10)
    c, d = rng.random((2, 30, 40)), rng.random((2, 30, 40))
    d = 0.7 * c + 0.3 * d
    ours = M.ssim(torch.from_numpy(c), torch.from_numpy(d)).numpy()
    for i in range(2):
        data_range = max(c[i].max(), d[i].max()) - min(c[i].min(), d[i].min())
        ref = skimage_metrics.structural_similarity(c[i], d[i], data_range=data_range)
        assert ours[i] == pytest.approx(ref, abs=1e-10)
    assert M.ssim(torch.from_numpy(c), torch.from_numpy(c)).numpy() == pytest.approx([1.0, 1.0])


# --- faithfulness --------------------------------------------------------------------------------


class RegionMean(nn.Module):
    """Logit 0 = 10 x the mean of the image over a region: a model whose evidence is known."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = (x.mean(1) * self.region).sum((1, 2)) / self.region.sum()
        return torch.stack([self.scale * value - 5, -self.scale * value], 1)


def test_deletion_on_constant_model_is_flat():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    images = torch.rand(3, 3, 16, 16)
    maps = torch.rand(3, 2, 16, 16)
    for mode in ("deletion", "insertion"):
        curves = M.perturbation_curves(model, images, maps, [0, 1], mode=mode, steps=8, baseline="mean")
        assert curves.shape == (3, 2, 9)
        assert torch.allclose(curves, torch.full_like(curves, 0.5))
    result = M.faithfulness(model, images, maps, [0, 1], steps=8)
    assert torch.allclose(result["deletion_auc"], torch.full((3, 2), 0.5, dtype=torch.float64))
    assert result["deletion_gap"].abs().max() < 1e-12 and result["insertion_gap"].abs().max() < 1e-12


def test_deletion_and_insertion_reward_the_true_evidence():
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[4:12, 20:28] = True
    model = RegionMean(region)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.5
    truth = region.float().expand(4, 1, 32, 32) + torch.rand(4, 1, 32, 32) * 0.01
    result = M.faithfulness(model, images, truth, [0], steps=16, baseline=0.0, output="logit")
    # the region is 1/16 of the image: deleting it first kills the logit within the first step
    assert (result["deletion_curve"][:, 0, 1:] == -5).all()
    assert (result["deletion_gap"] > 1).all() and (result["insertion_gap"] > 1).all()
    wrong = 1 - truth  # the region last
    bad = M.faithfulness(model, images, wrong, [0], steps=16, baseline=0.0, output="logit")
    assert (bad["deletion_gap"] < 0).all() and (bad["insertion_gap"] < 0).all()


def test_blur_baseline_keeps_constant_images():
    images = torch.full((2, 3, 20, 24), 0.3)
    assert torch.allclose(M.make_baseline(images, "blur"), images)
    assert torch.allclose(M.make_baseline(torch.rand(2, 3, 8, 8), "mean").flatten(2).std(-1), torch.zeros(2, 3))
    with pytest.raises(CxrlensError, match="unknown baseline"):
        M.make_baseline(images, "grey")


@pytest.mark.numerics
def test_deletion_curve_equals_quantus_pixel_flipping():
    quantus = _quantus()
    model = tiny_cnn(in_channels=1)
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    maps = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(4))  # no ties
    targets = np.array([0, 1, 2, 0])
    metric = quantus.PixelFlipping(features_in_step=32, perturb_baseline=0.0, normalise=False, disable_warnings=True)
    theirs = np.asarray(metric(model=model, x_batch=images.numpy(), y_batch=targets, a_batch=maps.numpy(),
                               softmax=False))
    # ours explains a list of targets for every image; pick each image's own target
    ours = M.perturbation_curves(model, images, maps.expand(-1, 3, -1, -1), [0, 1, 2], steps=8, baseline=0.0,
                                 output="logit")
    ours = ours[torch.arange(4), torch.as_tensor(targets), 1:]  # Quantus leaves out the intact image
    # the same float32 logits through other batch compositions (Quantus: one pass per step): a tiny model
    # (K ~ 50 terms per output), so differences of a few ulps (u = 6e-8) of values of order 1; 1e-5 is 100 u
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5, atol=1e-6)


# --- sanity and robustness -----------------------------------------------------------------------


def test_randomisation_flags_an_edge_detector_and_passes_gradients():
    model = tiny_cnn()
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    edges = M.cascading_randomisation(model, sobel_explainer(), images, steps=3)
    grads = M.cascading_randomisation(model, gradient_explainer([0, 1]), images, steps=3)
    assert torch.allclose(edges.spearman, torch.ones_like(edges.spearman))
    assert torch.allclose(edges.ssim, torch.ones_like(edges.ssim))
    assert not edges.passes()
    assert grads.passes() and grads.spearman[-1].mean() < 0.5
    # the scorecard's definition: the mean over the picked (image, class) pairs only
    pick = np.zeros((4, 2), dtype=bool)
    pick[:, 0] = True
    assert grads.curve("spearman", pick)[-1] == pytest.approx(grads.spearman[-1][:, 0].mean().item(), rel=1e-12)
    assert grads.spearman.shape == (3, 4, 2) and grads.n_randomised[0] == 1 and grads.layers[0] == "7"
    # the trained model and the caller's random state are untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng_before, torch.random.get_rng_state())


def test_randomisation_equals_quantus_mprt():
    quantus = _quantus()
    model = tiny_cnn()
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    targets = np.array([0, 2, 1, 0])

    def quantus_explain(model, inputs, targets, **kwargs):
        x = torch.as_tensor(inputs).float().requires_grad_(True)
        out = model(x)
        grad = torch.autograd.grad(out[torch.arange(len(x)), torch.as_tensor(targets)].sum(), x)[0]
        return grad.sum(1, keepdim=True).detach().numpy()

    a = quantus_explain(model, images.numpy(), targets)
    theirs = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True)(
        model=model, x_batch=images.numpy(), y_batch=targets, a_batch=a, explain_func=quantus_explain, batch_size=4
    )

    def ours_explain(model, x):
        return torch.from_numpy(quantus_explain(model, x.numpy(), targets))

    ours = M.cascading_randomisation(model, ours_explain, images, seed=42)
    assert ours.layers == [k for k in theirs if k != "original"]
    expected = np.array([theirs[k] for k in ours.layers])
    np.testing.assert_allclose(ours.spearman[:, :, 0].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_max_sensitivity():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    # the gradient of a linear model does not depend on the input
    assert M.max_sensitivity(linear, gradient_explainer([0, 1]), images, n_samples=3).abs().max() < 1e-6
    moved = M.max_sensitivity(linear, sobel_explainer(2), images, n_samples=3, radius=0.05)
    small = M.max_sensitivity(linear, sobel_explainer(2), images, n_samples=3, radius=0.005)
    assert moved.shape == (3, 2) and (moved > small).all() and (small > 0).all()


def test_bootstrap_ci():
    mean, low, high, n = M.bootstrap_ci([0.5] * 10)
    assert (mean, low, high, n) == (0.5, 0.5, 0.5, 10)
    values = np.random.default_rng(0).normal(1.0, 0.2, 200)
    mean, low, high, n = M.bootstrap_ci(np.append(values, np.nan), n_boot=500)
    assert n == 200 and low < mean < high and high - low < 0.1
    assert np.isnan(M.bootstrap_ci([np.nan])[0])


# --- masks ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mask_set():
    return K.load_mask_set(LUNGMASKS, 64)


def test_mask_set_on_the_vendored_data(mask_set):
    assert len(mask_set) == 60 and mask_set.images.shape == (60, 3, 64, 64)
    assert int(mask_set.present["devices"].sum()) == 15 and int(mask_set.present["opacity"].sum()) == 59
    lungs, region = mask_set.masks["lungs"], mask_set.masks["image_region"]
    assert not (lungs & ~region).any()  # lungs lie inside the image, not in the padding
    assert torch.equal(lungs, mask_set.masks["left_lung"] | mask_set.masks["right_lung"])
    assert not (lungs & mask_set.masks["outside_body"]).any()
    assert (mask_set.masks["padding"] <= mask_set.masks["outside_body"]).all()
    xs = torch.arange(64).float()

    def centre_x(m: torch.Tensor) -> torch.Tensor:
        return (m.float().sum(1) * xs).sum(-1) / m.float().sum((1, 2))

    # the patient's left lung appears on the image's right
    assert (centre_x(mask_set.masks["left_lung"]) > 32).all()
    assert (centre_x(mask_set.masks["right_lung"]) < 32).all()
    # the padding is black and the image region carries the X-ray
    assert mask_set.images[:, 0][mask_set.masks["padding"]].abs().max() == 0
    assert 0.2 < M.mask_share(lungs).mean() < 0.5


def test_mask_set_cropped_to_content_has_no_padding():
    pad = K.load_mask_set(LUNGMASKS, 64, max_images=6)
    crop = K.load_mask_set(LUNGMASKS, Preprocess(64, fit="crop"), max_images=6)
    assert pad.masks["padding"].any() and not crop.masks["padding"].any()  # portrait and landscape images alike
    assert crop.masks["image_region"].all()
    assert torch.equal(crop.images, torch.stack([Preprocess(64, fit="crop")(K.read_image(p)).expand(3, -1, -1)
                                                 for p in crop.frame["path"]]))
    # cropping the long side loses some of the outside, never more than the lungs it keeps
    assert (M.mask_share(crop.masks["lungs"]) >= M.mask_share(pad.masks["lungs"])).all()


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_mask_geometry_matches_preprocess(fit):
    # a wide image (content everywhere, black bars burned into its top) with a bright rectangle: the mask of the
    # rectangle must land where Preprocess puts the rectangle, whichever fit
    image = np.tile(np.linspace(20, 60, 150, dtype=np.float32), (90, 1))
    image[:10] = 0.0  # a black bar: crop trims it, pad keeps it
    image[20:60, 30:100] = 200.0
    mask = np.zeros((90, 150), dtype=np.uint8)
    mask[20:60, 30:100] = 255
    size = 48
    preprocess = Preprocess(size, fit=fit)
    geometry = preprocess.geometry(image)
    pre = preprocess(image)[0] > 0.5
    placed = torch.from_numpy(K.place_mask(mask, geometry))
    iou = (pre & placed).sum() / (pre | placed).sum()
    assert iou > 0.9
    if fit == "pad":  # long side 150 -> 48: 90 rows -> 29, centred
        assert (geometry.content, geometry.resized, geometry.offset) == ((0, 90, 0, 150), (29, 48), (9, 0))
        assert geometry.region().sum() == 29 * 48
    else:  # the bar trimmed: 80 x 150 -> short side 48 -> 90 wide, 21 columns cropped on the left
        assert (geometry.content, geometry.resized, geometry.offset) == ((10, 90, 0, 150), (48, 90), (0, -21))
        assert geometry.region().all()


def _copy_rows(tmp_path: Path, rows: int = 2) -> Path:
    frame = pd.read_csv(LUNGMASKS / "masks.csv", dtype=str, keep_default_na=False).iloc[:rows]
    folder = tmp_path / "masks"
    for column in ("image", "lungs", "heart", "opacity"):
        for rel in frame[column]:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(LUNGMASKS / rel, folder / rel)
    frame[["image", "lungs", "heart", "opacity", "finding", "cls", "patient_group"]].to_csv(
        folder / "masks.csv", index=False
    )
    return folder


def test_mask_folder_errors(tmp_path):
    with pytest.raises(CxrlensError, match="no masks.csv"):
        K.load_mask_set(tmp_path)
    folder = _copy_rows(tmp_path)
    assert K.load_mask_set(folder, 32).mask_columns == ("lungs", "heart", "opacity")
    with pytest.raises(CxrlensError, match="no mask column 'devices'"):
        K.load_mask_set(folder, 32, mask_columns=["lungs", "devices"])
    frame = pd.read_csv(folder / "masks.csv", dtype=str, keep_default_na=False)
    frame.drop(columns="image").to_csv(folder / "masks.csv", index=False)
    with pytest.raises(CxrlensError, match="no 'image' column"):
        K.load_mask_set(folder, 32)
    frame.to_csv(folder / "masks.csv", index=False)
    missing = folder / frame["heart"].iat[1]
    missing.unlink()
    with pytest.raises(CxrlensError, match=r"row 3, column 'heart': mask file missing: .*heart\.png"):
        K.load_mask_set(folder, 32)
    shutil.copy(LUNGMASKS / frame["heart"].iat[1], missing)
    from PIL import Image

    Image.new("L", (10, 12)).save(folder / frame["opacity"].iat[0])
    with pytest.raises(CxrlensError, match=r"row 2, column 'opacity': mask .* is 10x12 but image .* is \d+x\d+"):
        K.load_mask_set(folder, 32)


# --- shortcut detector ---------------------------------------------------------------------------


def test_probe_folds_keep_patients_together():
    groups = np.repeat([f"p{i}" for i in range(20)], [1, 2, 3, 4] * 5)
    sources = np.where(np.arange(len(groups)) % 3 == 0, 1, 0)
    folds = S._probe_folds(sources, groups, 5, seed=0)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    assert set(folds) == set(range(5))


def test_source_probe_finds_encoded_sources_and_not_noise():
    rng = np.random.default_rng(0)
    n = 120
    sources = np.array(["nih"] * 60 + ["cohen"] * 40 + ["hannover"] * 20)
    groups = np.array([f"g{i // 2}" for i in range(n)])
    labels = np.where(sources == "nih", "Normal", "COVID-19")
    encoded = rng.normal(size=(n, 16))
    encoded[:, 0] += np.where(sources == "cohen", 6.0, 0) + np.where(sources == "hannover", -6.0, 0)
    probe = S.source_probe(encoded, sources, groups, labels)
    assert probe["accuracy"] > 0.9
    assert probe["majority_accuracy"] == pytest.approx(0.5)
    assert probe["class_only_accuracy"] == pytest.approx(100 / 120)
    noise = S.source_probe(rng.normal(size=(n, 16)), sources, groups, labels)
    assert noise["accuracy"] < probe["accuracy"] - 0.2
    assert "skipped" in S.source_probe(encoded, ["nih"] * n, groups)


def test_verdict_is_computed_from_numbers():
    rows = pd.DataFrame({
        "method": ["saliency"] * 4,
        "class": ["COVID-19"] * 4,
        "image": ["a", "b", "c", "d"],
        "lung_focus": [0.1, 0.2, 0.3, 0.8],
        "lung_area": [0.35] * 4,
        "device_share": [np.nan, 0.2, np.nan, np.nan],
        "device_area": [np.nan, 0.01, np.nan, np.nan],
        "outside_body_share": [0.6, 0.5, 0.4, 0.1],
        "outside_body_area": [0.4] * 4,
        "padding_share": [0.3, np.nan, np.nan, 0.1],
        "padding_area": [0.1, 0.0, 0.0, 0.1],
        "faithfulness": [0.1, -0.1, 0.2, 0.3],
    })
    probe = {"accuracy": 0.9, "majority_accuracy": 0.6, "class_only_accuracy": 0.7, "sources": {"a": 1, "b": 2}}
    thresholds = S.DetectorThresholds(source="this test")
    verdict = S.model_verdict("m", rows, probe=probe, sanity={"saliency": {"passes": False, "spearman": 0.93}},
                              thresholds=thresholds)
    text = " ".join(verdict["statements"])
    assert "most of the COVID-19 evidence lies outside the lungs in 75 % of images (3 of 4" in text
    assert "so the lung focus is 1.00x the lungs' area share" in text  # mean 0.35 over mean area 0.35
    assert "20.0 % of the evidence lies on them" in text
    assert "on the 2 images with zero padding, 20.0 % of the evidence lies in it (it covers 10.0 %" in text
    assert "with 90 % accuracy (majority baseline 60 %, true class alone 70 %)" in text
    assert "saliency FAILS the randomisation check" in text
    assert "from: this test" in text and "probe_margin >= 0.1" in text
    numbers = verdict["numbers"]
    assert numbers["COVID-19:lung_focus_ratio"] == pytest.approx(1.0)
    assert numbers["padding_ratio"] == pytest.approx(2.0)  # mean share 0.2 over mean area 0.1
    assert numbers["probe_margin"] == pytest.approx(0.2)
    # padding (2.0 >= 1.5) and probe (+0.2 >= 0.10) flag: two kinds
    assert verdict["risk"] == "high" and len(verdict["flags"]) == 2 and verdict["attribution_flagged"]
    calm = S.model_verdict("m", rows.assign(lung_focus=0.5, padding_share=0.1), thresholds=thresholds)
    assert calm["risk"] == "low" and not calm["flags"] and not calm["attribution_flagged"]
    ignored = S.DetectorThresholds({**S.UNCALIBRATED, "padding_ratio": S.Signal(1.5, "above", "padding", used=False)})
    quiet = S.model_verdict("m", rows, thresholds=ignored)
    assert quiet["risk"] == "low" and "flagged but not counted" in " ".join(quiet["statements"])


# --- end to end ----------------------------------------------------------------------------------


def test_run_scorecard_end_to_end(tmp_path):
    from cxrlens.models import create_model
    from cxrlens.runs import TrainConfig, save_model_weights
    from cxrlens.score import ScoreConfig, run_scorecard

    run = tmp_path / "runs" / "r18"
    run.mkdir(parents=True)
    TrainConfig(model="resnet18", out=str(run), image_size=64).save(run)
    torch.manual_seed(0)
    save_model_weights(create_model("resnet18", 3), run / "best.safetensors")
    with pytest.raises(CxrlensError, match="unknown attribution method 'salency'"):
        run_scorecard([run], tmp_path / "x", ScoreConfig(masks=str(LUNGMASKS), methods=["salency"]))
    assert not (tmp_path / "x").exists()
    out = tmp_path / "card"
    config = ScoreConfig(
        masks=str(LUNGMASKS), methods=["saliency", "grad_cam"], max_images=4, probe_images=24, steps=4,
        sanity_images=2, sanity_steps=2, robustness_images=2, robustness_samples=2, bootstrap=50,
    )
    card = run_scorecard([run], out, config)
    for name in ("scorecard.csv", "scorecard.md", "scorecard.png", "scorecard.json", "images.csv",
                 "verdicts.json", "shortcut.json", "worst_offenders.png", "config.json"):
        assert (out / name).stat().st_size > 0, name
    table = pd.read_csv(out / "scorecard.csv")
    assert set(table["method"]) == {"saliency", "grad_cam"} and set(table["model"]) == {"r18"}
    assert {"lung_focus", "lung_focus_low", "lung_focus_high", "faithfulness", "sanity_spearman"} <= set(table)
    assert (table["lung_focus_low"] <= table["lung_focus"]).all() and (table["lung_focus"] <= 1).all()
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert verdicts["r18"]["risk"] in {"low", "moderate", "high"} and verdicts["r18"]["statements"]
    assert card.rankings["lung_focus"][0]["model"] == "r18"
    assert set(card.sanity["r18"]) == {"saliency", "grad_cam"}
    assert "probe" in card.shortcut["r18"] and card.shortcut["r18"]["n_images"] == 24
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files
    saved = json.loads((out / "config.json").read_text())  # strict JSON, enough to re-run the scorecard
    assert saved["runs"] == [str(run)] and ScoreConfig.load(out) == card.config
    assert card.config.steps == 4 and card.config.masks == str(LUNGMASKS)
