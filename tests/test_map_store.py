"""The map store of ``cxrlens explain --store``: float16 chunks with an index, resumable, bounded in disk.

Real X-rays of data/cxr3 at 64 px and a ResNet18 whose BatchNorm looks trained; a run stopped (or
killed with SIGKILL) part-way and resumed must leave the same store as one that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT
from scale_helpers import cxr3_labels, one_thread, store_arrays, trained_like_run

from cxrlens.data import load_image_tensor
from cxrlens.errors import CxrlensError
from cxrlens.explain import explain_images
from cxrlens.explain.config import ExplainConfig, ExplainSettings
from cxrlens.explain.job import explain_runs
from cxrlens.explain.store import MapStore
from cxrlens.runs import load_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    labels = cxr3_labels(root)
    return root, labels, trained_like_run(root / "r18", labels)


def _config(setup, out, **changes) -> ExplainConfig:
    root, labels, run = setup
    base = ExplainConfig(runs=[str(run)], out=str(out), data=str(labels), split="test", max_images=None,
                         methods={"saliency": {}, "occlusion": {}}, store=True, chunk_size=2)
    return replace(base, **changes)


def _same_store(a, b) -> None:
    pd.testing.assert_frame_equal(MapStore(a).index, MapStore(b).index)
    maps_a, maps_b = store_arrays(a), store_arrays(b)
    assert list(maps_a) == list(maps_b) and maps_a
    for name in maps_a:  # the same chunks in the same batches: the same bits
        assert np.array_equal(maps_a[name], maps_b[name]), name


def test_store_keeps_every_map_to_float16_precision(setup, tmp_path):
    _, labels, run = setup
    with one_thread():
        methods = {"saliency": {}, "integrated_gradients": {"n_steps": 8}}
        summary = explain_runs(_config(setup, tmp_path / "s", methods=methods, chunk_size=5), progress=False)
        paths = pd.read_csv(labels)["path"]
        images = torch.stack([load_image_tensor(p, 64) for p in paths])
        reference = explain_images({"r18": load_run(run).model}, images, ["COVID-19", "Pneumonia", "Normal"],
                                   methods, None, tmp_path / "ref",
                                   image_ids=[os.path.splitext(os.path.basename(p))[0] for p in paths],
                                   settings=ExplainSettings(figures=False), progress=False)
    assert summary["complete"] and summary["rows"] == 12 * 2 * 3
    store = MapStore(tmp_path / "s")
    index = store.index
    assert len(index) == 12 * 2 * 3 and (index["error"] == "").all()
    assert list(index["position"]) == sorted(index["position"])  # chunk order = image order
    assert index.loc[index["method"] == "integrated_gradients", "delta"].notna().all()
    assert index.loc[index["method"] == "saliency", "delta"].isna().all()
    assert sorted((tmp_path / "s" / "maps" / "r18").iterdir())[0].name == "chunk-000000.npy"
    for (image, method), rows in index.groupby(["image", "method"]):
        expected = np.load(tmp_path / "ref" / "maps" / image / "r18" / f"{method}.npy")  # float32 [T, H, W]
        stored = store.maps(rows)
        assert stored.shape == expected.shape == (3, 64, 64)
        # stored = float16(map / scale) * scale with |map / scale| <= 1: float16 rounds to within 2^-12 = 2.4e-4
        # of the scale; the two maps come from batches of 5 and 12 images, float32 rounding far below that
        scale = rows["scale"].to_numpy()[:, None, None]
        assert np.all(np.abs(stored - expected) <= 2.5e-4 * scale), (image, method)
        probs = reference["models"]["r18"]["predictions"][image]
        np.testing.assert_allclose(rows["probability"], [probs[c] for c in rows["class"]], atol=1e-6)  # 6 digits


def test_stopped_run_resumes_to_the_same_store(setup, tmp_path):
    with one_thread():
        explain_runs(_config(setup, tmp_path / "whole"), progress=False)
        config = _config(setup, tmp_path / "parts")
        first = explain_runs(config, progress=False, stop_after=2)
        assert not first["complete"] and first["chunks_done"] == 2 and first["chunks"] == 6
        assert not (tmp_path / "parts" / "index.csv").exists()
        done = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "parts").rglob("chunk-*")}
        assert len(done) == 4  # 2 chunks: their map file and their index file
        with pytest.raises(CxrlensError, match="already holds a store .2 of 6 chunks done.; pass --resume"):
            explain_runs(config, progress=False)
        last = explain_runs(config, progress=False, resume=True)
    assert last["complete"] and last["chunks_done"] == 6
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == seen for p, seen in done.items())  # skipped, not redone
    _same_store(tmp_path / "whole", tmp_path / "parts")


@pytest.mark.slow  # a second Python process that imports torch
def test_killed_run_continues_where_it_stopped(setup, tmp_path):
    _, labels, run = setup
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "cxrlens.cli", "explain", "--run", str(run), "--data", str(labels),
               "--max-images", "0", "--methods", "occlusion", "--store", "--chunk-size", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while len(list((out / "index").glob("chunk-*.csv"))) < 2 and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)  # no chance to clean up: half a chunk may be on disk
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "index.csv").exists() and len(list((out / "index").glob("chunk-*.csv"))) < 12
    config = _config(setup, out, methods={"occlusion": {}}, chunk_size=1)
    with one_thread():
        resumed = explain_runs(config, progress=False, resume=True)
        explain_runs(replace(config, out=str(tmp_path / "whole")), progress=False)
    assert resumed["complete"] and not list(out.rglob(".*.tmp"))  # a kill's temporaries are cleared
    _same_store(tmp_path / "whole", out)


def test_resume_refuses_another_job(setup, tmp_path):
    config = _config(setup, tmp_path / "s", methods={"saliency": {}}, chunk_size=6)
    with one_thread():
        explain_runs(config, progress=False, stop_after=1)
    with pytest.raises(CxrlensError, match="holds a store of another job .methods differ"):
        explain_runs(replace(config, methods={"grad_cam": {}}), progress=False, resume=True)
    with pytest.raises(CxrlensError, match="holds a store of another job .images differ"):
        explain_runs(replace(config, max_images=8), progress=False, resume=True)


def test_targets_true_and_positive_keep_the_pairs_asked_for(setup, tmp_path):
    _, labels, _ = setup
    with one_thread():
        explain_runs(_config(setup, tmp_path / "true", methods={"grad_cam": {}}, targets="true"), progress=False)
        explain_runs(_config(setup, tmp_path / "pos", methods={"grad_cam": {}}, targets="positive"), progress=False)
    true = MapStore(tmp_path / "true").index
    frame = pd.read_csv(labels)
    # cxr3: COVID-19 images are labelled COVID-19 and Pneumonia (its parent), the others one class each
    assert len(true) == 2 * (frame["cls"] == "covid").sum() + (frame["cls"] != "covid").sum()
    assert set(true.loc[true["position"] == int(np.flatnonzero(frame["cls"] == "normal")[0]), "class"]) == {"Normal"}
    positive = MapStore(tmp_path / "pos").index
    assert set(positive["position"]) == set(range(12))  # every image keeps at least its most probable class
    assert (positive["probability"] > 0.51).sum() >= len(positive) - 12


def test_a_store_that_cannot_fit_is_refused_before_anything_is_written(setup, tmp_path, monkeypatch):
    import shutil

    from cxrlens.explain import dataset

    usage = shutil.disk_usage(tmp_path)._replace(free=10**5)  # a nearly full disk
    monkeypatch.setattr(dataset.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(CxrlensError, match=r"would take up to 589.8 kB but .* has 100.0 kB free; .*--metrics-only"):
        explain_runs(_config(setup, tmp_path / "s"), progress=False)
    assert not (tmp_path / "s" / "store.json").exists()
