"""Explain, NAP and score on two gloo processes give what one process gives.

Every stage runs once on one process (here, one torch thread) and once on two processes started by
``cxrlens.distributed.launch`` (one thread each), on real X-rays of data/cxr3 and data/lungmasks at 64 px
with a ResNet18 whose BatchNorm looks trained. Work is shared out in units of fixed composition (chunks,
batches, blocks), so per-image results are the same bits; only sums taken across processes (NAP group
sums) are added in another order.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import LUNGMASKS
from scale_helpers import cxr3_labels, lungmask_labels, one_thread, store_arrays, trained_like_run

from cxrlens.distributed import Launch, launch
from cxrlens.explain.config import ExplainConfig
from cxrlens.explain.job import explain_runs
from cxrlens.explain.store import MapStore
from cxrlens.nap import NapConfig, NapJob, run_nap_job
from cxrlens.score import ScoreConfig, run_scorecard

pytestmark = pytest.mark.slow  # two processes, each importing torch: about 20 s of CPU for the module

TWO = Launch(devices=2, accelerator="cpu", threads=1)
METRICS = dict(steps=4, sanity_images=2, sanity_steps=2, robustness_images=3, robustness_samples=2, bootstrap=50)


def _each(calls: list) -> list:
    """What every process runs: the stages one after the other (module level, so it pickles by name)."""
    return [fn(*args, **kwargs) for fn, args, kwargs in calls]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    labels, masks_csv = cxr3_labels(root), lungmask_labels(root)
    run = str(trained_like_run(root / "r18", labels))
    nap = NapJob([run], str(root / "nap"), str(labels), "test",
                 NapConfig(layers=["layer2", "layer4"], groups="errors", gradient_weighted="COVID-19", batch_size=4,
                           figures=False, progress=False))
    return SimpleNamespace(
        root=root,
        # 12 images in batches of 4: process 0 takes batches 0 and 2, process 1 batch 1; in one batch of 16,
        # process 1 has no image at all and adds zeros
        naps=[nap, replace(nap, out=str(root / "nap16"), config=replace(nap.config, batch_size=16))],
        # 12 images in chunks of 5, 5, 2
        explain=ExplainConfig(runs=[run], out=str(root / "store"), data=str(labels), split="test", max_images=None,
                              methods={"saliency": {}, "occlusion": {}}, targets="all", store=True, chunk_size=5),
        # 8 mask images in blocks of 3, 3, 2
        score=(([run], str(root / "card"), ScoreConfig(masks=str(LUNGMASKS), methods=["saliency", "grad_cam"],
                                                        max_images=8, data=str(labels), probe_images=12,
                                                        block_size=3, **METRICS))),
        metrics=ExplainConfig(runs=[run], out=str(root / "metrics"), data=str(masks_csv), split=None, max_images=None,
                              methods={"saliency": {}, "grad_cam": {}}, targets="true", metrics_only=True,
                              chunk_size=3, masks=str(LUNGMASKS), metrics=METRICS),
    )


def _calls(jobs, suffix: str = "") -> list:
    """Every stage, writing to its folder + ``suffix``."""
    runs, out, config = jobs.score
    calls = [(run_nap_job, (replace(job, out=job.out + suffix),), {}) for job in jobs.naps]
    return calls + [
        (explain_runs, (replace(jobs.explain, out=jobs.explain.out + suffix),), {"progress": False}),
        (run_scorecard, (runs, out + suffix, config), {}),
        (explain_runs, (replace(jobs.metrics, out=jobs.metrics.out + suffix),), {"progress": False}),
    ]


@pytest.fixture(scope="module")
def results(jobs):
    """Every stage on one process and on two."""
    with one_thread():
        one = _each(_calls(jobs))
    return one, launch(_each, _calls(jobs, "-2"), launch=TWO)


def test_nap_on_two_processes_equals_one(jobs, results):
    one, two = results
    for job, a, b in zip(jobs.naps, one[:2], two[:2], strict=True):
        assert a["stats"]["models"]["r18"]["images"] == b["stats"]["models"]["r18"]["images"] == 12
        x, y = np.load(f"{job.out}/nap_r18.npz"), np.load(f"{job.out}-2/nap_r18.npz")
        assert sorted(x.files) == sorted(y.files)
        for key in x.files:
            u, v = x[key], y[key]
            if u.dtype.kind != "f":  # names, counts, dead maps, top maps: exact
                assert np.array_equal(u, v), key
            elif u.dtype == np.float32:
                # the same activations summed in float64 in another order (relative error ~ n * 1e-16), then
                # rounded to float32: at most one float32 ulp (1.2e-7 relative) apart
                np.testing.assert_allclose(u, v, rtol=2.4e-7, atol=1e-12 * np.nanmax(np.abs(u)), err_msg=key)
            else:
                # float64 statistics of those sums; standard deviations come from sums of squares minus n * mean^2,
                # whose cancellation can grow the 1e-16 reordering error by a few orders of magnitude
                np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-14, err_msg=key)
        assert json.loads((jobs.root / "nap" / "nap_stats.json").read_text())["models"]["r18"]["groups"] == \
            b["stats"]["models"]["r18"]["groups"]


def test_explain_store_on_two_processes_is_identical(jobs, results):
    one, two = results
    assert one[2]["complete"] and two[2]["complete"] and one[2]["rows"] == two[2]["rows"] == 12 * 2 * 3
    a, b = MapStore(jobs.explain.out), MapStore(jobs.explain.out + "-2")
    pd.testing.assert_frame_equal(a.index, b.index)  # the same rows, probabilities and scales, in chunk order
    maps_one, maps_two = store_arrays(a.folder), store_arrays(b.folder)
    assert list(maps_one) == [f"maps/r18/chunk-00000{k}.npy" for k in range(3)] == list(maps_two)
    for name in maps_one:  # each chunk is explained in the same batches whichever process takes it
        assert maps_one[name].dtype == np.float16 and np.array_equal(maps_one[name], maps_two[name]), name


def test_score_on_two_processes_equals_one(jobs, results):
    one, two = results
    card_one, card_two = one[3], two[3]
    # every block is scored in the same batches with its own random draws, whichever process takes it:
    # the per-image rows, and everything computed from them, are the same numbers
    pd.testing.assert_frame_equal(card_one.images, card_two.images, check_exact=True)
    pd.testing.assert_frame_equal(card_one.table, card_two.table, check_exact=True)
    out_one, out_two = jobs.root / "card", jobs.root / "card-2"
    written = sorted(p.name for p in out_one.iterdir())
    assert written == sorted(p.name for p in out_two.iterdir())  # written once: no file of process 1's own
    for name in ("scorecard.csv", "images.csv", "verdicts.json", "shortcut.json"):
        assert (out_one / name).read_bytes() == (out_two / name).read_bytes(), name
    assert card_one.sanity["r18"]["saliency"]["spearman_curve"] == card_two.sanity["r18"]["saliency"]["spearman_curve"]


def test_metrics_only_on_two_processes_equals_the_scorecard(jobs, results):
    one, two = results
    assert two[4]["complete"] and not list((jobs.root / "metrics-2").glob("maps"))  # no map kept
    card = one[3].images  # the scorecard of the same 8 mask images in blocks of 3 = chunks of 3
    rows = pd.read_csv(jobs.root / "metrics-2" / "images.csv")
    rows = rows.assign(image="images/" + rows["image"] + ".jpg")
    key = ["method", "image", "class"]
    card = card.sort_values(key, kind="stable").reset_index(drop=True)
    rows = rows.sort_values(key, kind="stable").reset_index(drop=True)
    assert len(rows) == len(card) > 0 and (rows[key] == card[key]).all().all()
    for column in [c for c in card.columns if c in rows.columns and card[c].dtype.kind == "f"]:
        # the CSV keeps 7 significant digits: 5e-7 relative
        np.testing.assert_allclose(rows[column], card[column], rtol=1e-6, atol=1e-12, err_msg=column)
    assert rows["lung_focus"].notna().all() and rows["faithfulness"].notna().all()
    assert (jobs.root / "metrics-2" / "scorecard.csv").is_file()


def test_a_bad_image_in_one_process_ends_the_job_with_one_line(jobs, tmp_path, monkeypatch, capsys):
    from cxrlens.cli import main

    labels = pd.read_csv(jobs.naps[0].data)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a JPEG")
    labels.loc[6, "path"] = str(bad)  # chunk 1 of 5-image chunks: process 1's
    labels.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "store"
    monkeypatch.setattr(sys, "argv", ["cxrlens", "explain", "--run", jobs.explain.runs[0], "--data",
                                      str(tmp_path / "labels.csv"), "--max-images", "0", "--methods", "saliency",
                                      "--store", "--chunk-size", "5", "--devices", "2", "--accelerator", "cpu",
                                      "--out", str(out)])
    with pytest.raises(SystemExit) as stop:
        main()
    err = capsys.readouterr().err  # (after the progress bar)
    assert stop.value.code == 2 and err.count("error:") == 1
    assert err.splitlines()[-1].startswith("error: process 1: ") and "bad.jpg" in err.splitlines()[-1]
    assert not (out / "index.csv").exists()  # unfinished: a --resume after fixing the image continues it


@pytest.mark.parametrize("option, value, message", [
    ("--devices", "0", "--devices must be a whole number >= 1"),
    ("--accelerator", "tpu", "--accelerator must be one of auto, cpu, gpu"),
])
def test_bad_launch_options_get_one_line(jobs, tmp_path, monkeypatch, capsys, option, value, message):
    from cxrlens.cli import main

    monkeypatch.setattr(sys, "argv", ["cxrlens", "nap", "--run", jobs.explain.runs[0], "--out", str(tmp_path / "n"),
                                      option, value])
    with pytest.raises(SystemExit) as stop:
        main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and message in err
    assert not (tmp_path / "n").exists()


class _FailsInOtherProcesses:
    """An argument that unpickles in this process but raises in a started one (as an import error would)."""

    def __init__(self) -> None:
        import os

        self.parent = os.getpid()

    def __reduce__(self):  # noqa: ANN204
        return (_rebuild, (self.parent,))


def _rebuild(parent: int) -> _FailsInOtherProcesses:
    import os

    if os.getpid() != parent:
        raise ImportError("this argument cannot be rebuilt in another process")
    return _FailsInOtherProcesses()


def test_a_process_that_dies_before_starting_fails_the_job_instead_of_hanging():
    """Rank 0 used to wait in the group's rendezvous for the 12-hour timeout when a started process died
    before joining it."""
    from cxrlens.errors import CxrlensError

    with pytest.raises(CxrlensError, match="process 1 stopped before it started"):
        launch(len, [_FailsInOtherProcesses()], launch=Launch(devices=2, accelerator="cpu"))
