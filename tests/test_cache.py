"""HDF5 cache: build_cache CLI, byte-identical samples, errors."""
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tempeh.bench.data import write_tiny_capture
from tempeh.cli.build_cache import main as build_cache_main
from tempeh.config import DataConfig
from tempeh.data import CaptureDataset, ViewBatchSampler, make_loader
from tempeh.data.cache import CaptureCache
from tempeh.errors import ConfigError, TempehDataError
from tempeh.io.layout import FrameId

V, W, H = 3, 40, 30


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    return write_tiny_capture(tmp_path_factory.mktemp("cache") / "capture", num_frames=3,
                              num_views=V, width=W, height=H, scan_points=200, with_gt=True,
                              sequences=("seqA", "seqB"))


@pytest.fixture(scope="module")
def cache2(capture) -> Path:
    out = capture.parent / "cache_ds2.h5"
    rc = build_cache_main(["--data", str(capture), "--list", "data_lists/train.json",
                           "--list", str(capture / "data_lists/val.json"), "--out", str(out),
                           "--image-downsample", "2", "--quiet"])
    assert rc == 0
    return out


def cfg(root, **kw):
    base = dict(root=str(root), min_views=1, max_views=V, scan_points=150, num_workers=0,
                image_downsample=2)
    base.update(kw)
    return DataConfig(**base)


def same(a, b):
    assert a.frame == b.frame and a.index == b.index
    for f in ("images", "scan", "scan_valid", "registration", "gt_verts"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.numpy().tobytes() == y.numpy().tobytes(), f
    for f in ("K", "R", "t", "dist", "width", "height"):
        assert getattr(a.cameras, f).numpy().tobytes() == getattr(b.cameras, f).numpy().tobytes(), f
    assert a.cameras.names == b.cameras.names


def test_cache_layout(cache2):
    with CaptureCache(cache2) as c:
        assert c.image_downsample == 2.0 and c.has_gt
        frames = c.frames()
        assert len(frames) == 6 and FrameId("subj1", "seqB", "000002") in frames
        g = c.h5["frames/subj1/seqA/000001"]
        assert g["images"].dtype == np.uint8 and g["images"].shape == (V, H // 2, W // 2)
        assert g["images"].chunks == (V, H // 2, W // 2) and g["images"].compression == "lzf"
        assert g["scan"].dtype == np.float32 and g["scan"].shape == (200, 3)
        assert c.camera_names(frames[0]) == ["23_A", "23_B", "24_A"]


def test_cached_samples_are_byte_identical(capture, cache2):
    png = CaptureDataset(cfg(capture), "data_lists/all.json", train=True)
    h5 = CaptureDataset(cfg(capture, use_cache=str(cache2)), "data_lists/all.json", train=True)
    assert png.frames == h5.frames and png.camera_names == h5.camera_names
    keys = [0, 5, (1, (0, 2), 11), (4, (1,), 12), (3, (0, 1, 2), 13)]
    for k in keys:
        same(png[k], h5[k])
    # and through DataLoader workers (the h5 handle is reopened per worker)
    sampler = ViewBatchSampler(len(h5), h5.num_views, 2, 1, V, seed=3)
    for a, b in zip(make_loader(png, sampler, 0), make_loader(h5, sampler, 2)):
        assert torch.equal(a.images, b.images) and torch.equal(a.scan, b.scan)
        assert torch.equal(a.cameras.K, b.cameras.K)


def test_cache_mismatch_and_missing_frames(capture, cache2, tmp_path):
    with pytest.raises(ConfigError, match="downsampled by 2"):
        CaptureDataset(cfg(capture, use_cache=str(cache2), image_downsample=1), "data_lists/all.json")
    out = tmp_path / "train_only.h5"
    assert build_cache_main(["--data", str(capture), "--list", "data_lists/train.json",
                             "--out", str(out), "--image-downsample", "2", "--quiet"]) == 0
    with pytest.raises(TempehDataError, match=r"train_only\.h5.*subj1/seqB/000002 is not in the cache"):
        CaptureDataset(cfg(capture, use_cache=str(out)), "data_lists/all.json")
    ds = CaptureDataset(cfg(capture, use_cache=str(out), skip_bad_frames=True), "data_lists/all.json")
    assert len(ds) == 5 and list(ds.skipped) == [FrameId("subj1", "seqB", "000002")]
    with pytest.raises(TempehDataError, match="cache not found"):
        CaptureDataset(cfg(capture, use_cache=str(tmp_path / "nope.h5")), "data_lists/all.json")
    bogus = tmp_path / "bogus.h5"
    with h5py.File(bogus, "w") as f:
        f.attrs["format"] = "something else"
    with pytest.raises(TempehDataError, match="not a tempeh capture cache"):
        CaptureDataset(cfg(capture, use_cache=str(bogus)), "data_lists/all.json")


def test_cli_errors(capture, tmp_path, capsys):
    out = tmp_path / "x.h5"
    assert build_cache_main(["--data", str(capture), "--list", "data_lists/missing.json",
                             "--out", str(out), "--quiet"]) == 1
    assert "missing.json" in capsys.readouterr().out and not out.exists()
    assert build_cache_main(["--data", str(capture), "--out", str(out)]) == 2
    (capture / "data_lists" / "ghost.json").write_text('[["subj1", "seqA", "000077"]]')
    assert build_cache_main(["--data", str(capture), "--list", "data_lists/ghost.json",
                             "--out", str(out), "--quiet"]) == 1
    assert "000077" in capsys.readouterr().out
    assert not out.exists() and not list(tmp_path.glob(".x.h5.tmp*"))  # nothing half-written
