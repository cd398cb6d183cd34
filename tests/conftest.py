"""Shared fixtures: the vendored real data set and small real samples of it."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CXR3 = ROOT / "data" / "cxr3"
LUNGMASKS = ROOT / "data" / "lungmasks"
XRAY = CXR3 / "images" / "actualmed-083cce5d2bcc.jpg"  # a real COVID-19 X-ray of the vendored set

# scripts/numerics.sh reruns the numerical tests with another thread count (tests/test_explain.py
# defaults to one thread, the others to two).
torch.set_num_threads(int(os.environ.get("CXRLENS_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def cxr3_manifest():
    from cxrlens.data import load_manifest

    return load_manifest(CXR3)


@pytest.fixture(scope="session")
def real_batch(cxr3_manifest):
    """12 real test-split images (4 per class) at 64 px with their targets."""
    from cxrlens.data import XrayDataset

    test = cxr3_manifest.split("test")
    picks = []
    for cls in ("covid", "pneumonia", "normal"):
        picks += list(test.frame.index[test.frame["cls"] == cls][:4])
    mask = test.frame.index.isin(picks)
    dataset = XrayDataset(test.select(mask), 64)
    images, targets = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.stack(targets)


def make_run(path: Path, seed: int, size: int = 64, fit: str = "pad") -> Path:
    """A run folder with untrained weights, written by the real writers: real loading code, no training time."""
    from cxrlens.models import create_model
    from cxrlens.runs import TrainConfig, save_model_weights

    torch.manual_seed(seed)
    path.mkdir(parents=True)
    TrainConfig(model="resnet18", image_size=size, out=str(path), fit=fit).save(path)
    save_model_weights(create_model("resnet18", 3), path / "best.safetensors")
    return path


@pytest.fixture(autouse=True, scope="session")
def private_audit_cache(tmp_path_factory):
    """The data audit caches what it read of each image; tests keep that cache out of the user's folder."""
    import os

    os.environ["CXRLENS_CACHE_DIR"] = str(tmp_path_factory.mktemp("audit-cache"))


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``cxrlens ARGS`` in this process, through the real entry point: (exit status, stdout, stderr)."""
    import sys

    from cxrlens.cli import main

    monkeypatch.setattr(sys, "argv", ["cxrlens", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    """Exit status 2 and exactly one ``error:`` line on stderr, no traceback, naming every fragment."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread, restored afterwards: runs compared bit for bit (with a subprocess started with
    OMP_NUM_THREADS=1, or between launched processes) must use the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dicom_bytes(pixels: np.ndarray, rows: int | None = None, cols: int | None = None,
                photometric: str = "MONOCHROME2", bits_stored: int | None = None, **tags: Any) -> bytes:
    """An uncompressed DICOM of ``pixels`` as the collections ship them (uint8 in 8 bits, else 16),
    optionally lying about its size; other tags (RescaleSlope, ViewPosition, ...) as keywords."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows or pixels.shape[0], cols or pixels.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored = bits, bits_stored or bits
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header declares width x height (a decompression bomb's header)."""
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)
