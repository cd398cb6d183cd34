"""Crop to content travels with a run: every consumer of a run folder gives its model the run's preprocessing."""

from __future__ import annotations

import numpy as np
import torch
from conftest import XRAY, make_run, run_cli

from cxrlens.data import Preprocess, load_image_tensor, load_manifest, read_image, write_manifest
from cxrlens.datasets.cache import ImageCache, settings_key
from cxrlens.evaluate import predict_manifest
from cxrlens.nap.run import _collect_models
from cxrlens.runs import load_run, predict
from cxrlens.serve.engine import ModelBank

CROP = Preprocess(64, fit="crop")


def test_a_crop_run_gets_cropped_inputs_in_every_consumer(tmp_path, cxr3_manifest):
    pad_dir, crop_dir = make_run(tmp_path / "pad", 1), make_run(tmp_path / "crop", 1, fit="crop")  # same weights
    pad_run, crop_run = load_run(pad_dir), load_run(crop_dir)
    assert crop_run.config.preprocess == CROP and pad_run.config.preprocess == Preprocess(64)
    manifest = cxr3_manifest.head(4, seed=3)
    cropped = torch.stack([load_image_tensor(p, CROP) for p in manifest.frame["path"]])
    expected = predict(crop_run.model, cropped).numpy()
    # evaluation (and the scorecard's, the web app's test-set predictions: the same dataset class)
    assert np.array_equal(predict_manifest(crop_run, manifest), expected)  # same inputs, batch and kernels
    assert not np.array_equal(predict_manifest(pad_run, manifest), expected)  # the same weights on padded inputs
    # the web app preprocesses an upload once per preprocessing its models need
    bank = ModelBank([pad_dir, crop_dir])
    tensors = bank.preprocess(read_image(XRAY))
    assert set(tensors) == {Preprocess(64), CROP}
    assert torch.equal(tensors[CROP], load_image_tensor(XRAY, CROP))
    # NAPs group models by preprocessing; an --image-size override keeps each run's fit
    entries = _collect_models([pad_run, crop_run], 32, tuple(crop_run.taxonomy.classes))
    assert [e.preprocess for e in entries] == [Preprocess(32), Preprocess(32, fit="crop")]


def test_explain_writes_one_grid_per_preprocessing(tmp_path, monkeypatch, capsys):
    runs = [make_run(tmp_path / "pad", 1), make_run(tmp_path / "crop", 2, fit="crop")]
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--run", str(runs[0]), "--run", str(runs[1]),
                           "--image", str(XRAY), "--methods", "saliency", "--out", str(out))
    assert code == 0, err
    assert (out / "64px" / "maps" / XRAY.stem / "pad" / "saliency.npy").is_file()
    assert (out / "64px-crop" / "maps" / XRAY.stem / "crop" / "saliency.npy").is_file()


def test_training_with_crop_records_it_and_caches_cropped_images(cxr3_manifest, tmp_path, monkeypatch, capsys):
    small = cxr3_manifest.select(cxr3_manifest.frame["split"].isin(["train", "val"])).head(18, seed=1)
    write_manifest(small, tmp_path / "labels.csv")
    out, cache = tmp_path / "run", tmp_path / "cache"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", str(tmp_path / "labels.csv"), "--out", str(out),
                           "--epochs", "1", "--image-size", "64", "--accelerator", "cpu", "--fit", "crop",
                           "--cache", str(cache))
    assert code == 0, err
    assert load_run(out).config.preprocess == CROP
    # the cache the run trained from holds cropped images, to uint8 rounding (half of 1/255) plus float32 rounding
    cached = ImageCache(cache, CROP)
    paths = load_manifest(tmp_path / "labels.csv").frame["path"].tolist()
    for path, slot in zip(paths[:3], cached.locate(paths[:3]), strict=True):
        assert (cached.tensor(*slot) - CROP(read_image(path))).abs().max() <= 0.5 / 255 + 1e-6
    # and the study's preprocessing keeps the cache name it had before crop existed
    assert "fit" not in settings_key(Preprocess(64))[0] and settings_key(CROP)[0]["fit"] == "crop"
