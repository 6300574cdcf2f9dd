"""CaptureDataset, augmentation, view sampler, collate and bad input."""
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tempeh.bench.data import tiny_rig, write_tiny_capture
from tempeh.cameras import Cameras
from tempeh.config import AugmentConfig, DataConfig
from tempeh.data import Batch, CaptureDataset, ViewBatchSampler, collate, eval_batches, make_loader
from tempeh.data import augment as aug
from tempeh.errors import ConfigError, TempehDataError
from tempeh.io.calibration import write_cameras_json
from tempeh.io.images import write_png
from tempeh.io.layout import CaptureLayout, FrameId, write_data_list
from tempeh.io.mesh import read_mesh, write_mesh

V, W, H = 4, 48, 36


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    return write_tiny_capture(tmp_path_factory.mktemp("cap") / "capture", num_frames=5,
                              num_views=V, width=W, height=H, scan_points=300, with_gt=True)


def cfg_for(root, **kw) -> DataConfig:
    base = dict(root=str(root), min_views=2, max_views=V, scan_points=128, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


# ---------------------------------------------------------------------------- samples
def test_sample_contents(capture):
    ds = CaptureDataset(cfg_for(capture), "data_lists/all.json", train=False)
    assert len(ds) == 5 and ds.num_views == V
    s = ds[1]
    assert s.images.shape == (V, 1, H, W) and s.images.dtype == torch.float32
    assert 0 <= float(s.images.min()) and float(s.images.max()) <= 1
    assert s.cameras.batch_shape == (V,) and s.cameras.dtype == torch.float32
    assert s.cameras.names == ("23_A", "23_B", "24_A", "24_B")
    assert (s.cameras.width == W).all() and (s.cameras.height == H).all()
    L = CaptureLayout(capture)
    fid = FrameId("subj1", "seqA", "000001")
    assert s.frame == fid
    # images are the PNGs / 255
    png = cv2.imread(str(L.image_path(fid, "24_A")), cv2.IMREAD_UNCHANGED)
    assert torch.equal(s.images[2, 0], torch.from_numpy(png.astype(np.float32) / 255))
    # meshes in mm (files in metres)
    reg = read_mesh(L.registration_path(fid), units="m")[0]
    np.testing.assert_allclose(s.registration.numpy(), reg, atol=1e-4)
    assert 80 < float(s.registration.norm(dim=1).mean()) < 100
    assert s.gt_verts is not None and s.gt_verts.shape == s.registration.shape
    assert s.coarse_verts is None
    # scan: a subset of distinct file points, all valid
    pts = np.load(L.scan_path(fid), allow_pickle=False)
    assert s.scan.shape == (128, 3) and bool(s.scan_valid.all())
    assert len(np.unique(s.scan.numpy(), axis=0)) == 128
    d = np.abs(s.scan.numpy()[:, None] - pts[None]).max(-1).min(1)
    assert d.max() == 0
    # evaluation samples are deterministic
    assert torch.equal(ds[1].scan, s.scan) and torch.equal(ds[1].images, s.images)


def test_scan_padding_and_mask(capture):
    ds = CaptureDataset(cfg_for(capture, scan_points=500), "data_lists/all.json", train=False)
    s = ds[0]
    assert s.scan.shape == (500, 3)
    assert int(s.scan_valid.sum()) == 300 and bool(s.scan_valid[:300].all())
    assert float(s.scan[300:].abs().max()) == 0


def test_view_subset_and_downsample(capture):
    ds = CaptureDataset(cfg_for(capture, image_downsample=2), "data_lists/all.json", train=False)
    s = ds[(2, (0, 3), None)]
    assert s.images.shape == (2, 1, H // 2, W // 2)
    assert s.cameras.names == ("23_A", "24_B")
    full = CaptureLayout(capture).cameras_for(FrameId("subj1", "seqA", "000002"), ["24_B"])
    np.testing.assert_allclose(s.cameras.K[1].double().numpy(),
                               full.resize(size=(W // 2, H // 2)).K[0].numpy(), rtol=1e-6)
    # area downsampling of the 8-bit image
    png = cv2.imread(str(CaptureLayout(capture).image_path(FrameId("subj1", "seqA", "000002"), "23_A")), 0)
    small = cv2.resize(png, (W // 2, H // 2), interpolation=cv2.INTER_AREA)
    assert torch.equal(s.images[0, 0], torch.from_numpy(small.astype(np.float32) / 255))


# ---------------------------------------------------------------------------- augmentation geometry
def gaussian_dot(w, h, uv, sigma=2.0, peak=200.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)  # pixel centres at integers
    g = peak * np.exp(-((xx - uv[0]) ** 2 + (yy - uv[1]) ** 2) / (2 * sigma ** 2))
    return np.round(g).astype(np.uint8)


def centroid(img: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    w = img.astype(np.float64)
    return np.array([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])


def test_scale_crop_moves_features_with_the_camera():
    """A dot drawn where a world point projects stays on that point's augmented projection."""
    rng = np.random.default_rng(3)
    w, h = 96, 72
    cams = tiny_rig(3, w, h, distance_mm=600.0)
    X = torch.tensor([[12.0, -8.0, 15.0]], dtype=torch.float64)
    uv, _ = cams.project(X)
    imgs = np.stack([gaussian_dot(w, h, uv[v, 0].numpy()) for v in range(3)]).astype(np.float32) / 255
    errs = []
    for trial in range(6):
        params = np.array([aug.sample_scale_crop(rng, w, h, (0.9, 1.1)) for _ in range(3)])
        if trial == 0:
            params[:, 0] = (0.9, 1.0, 1.1)  # both extremes and the identity
        out, cams2 = aug.scale_crop(imgs, cams, params)
        assert out.shape == imgs.shape and (cams2.width == w).all() and (cams2.height == h).all()
        uv2, _ = cams2.project(X)
        for v in range(3):
            errs.append(np.abs(centroid(out[v]) - uv2[v, 0].numpy()).max())
    assert max(errs) < 0.1, errs
    # zoom-out pads with zeros: corners of a constant image become 0 for s < 1
    ones = np.ones((1, h, w), np.float32)
    padded, _ = aug.scale_crop(ones, cams[:1], np.array([[0.9, -4.0, -3.0]]))
    assert padded[0, 0, 0] == 0 and padded[0, -1, -1] == 0 and padded[0, h // 2, w // 2] == 1


def test_zoom_crop_cameras_equals_resize_then_crop():
    cams = tiny_rig(3, 64, 48)
    s, x0, y0 = np.array([0.9, 1.0, 1.07]), np.array([-3.2, 0.0, 2.5]), np.array([-2.0, 0.0, 1.25])
    got = aug.zoom_crop_cameras(cams, s, x0, y0, 64, 48)
    for v in range(3):
        ref = cams[v:v + 1].resize(scale=float(s[v])).crop(float(x0[v]), float(y0[v]), 64, 48)
        assert torch.allclose(got.K[v], ref.K[0], rtol=0, atol=1e-12)
        assert int(got.width[v]) == 64 and int(got.height[v]) == 48
    assert got.names == cams.names and torch.equal(got.R, cams.R) and torch.equal(got.dist, cams.dist)


def test_dataset_augmentation_is_exact_end_to_end(tmp_path):
    """Through the whole dataset (stored-size adjustment, downsample 2, zoom/crop): the dot
    drawn at the projection of a world point is found at the returned camera's projection."""
    root = write_tiny_capture(tmp_path / "cap", num_frames=1, num_views=3, width=80, height=60)
    L = CaptureLayout(root)
    fid = FrameId("subj1", "seqA", "000000")
    cams = L.cameras_for(fid)
    # calibrated at 2x the stored size: the dataset must rescale the cameras to the images
    X = torch.tensor([[-10.0, 5.0, 20.0]], dtype=torch.float64)
    uv, _ = cams.project(X)
    dots = [gaussian_dot(80, 60, uv[v, 0].numpy(), sigma=2.5) for v in range(3)]
    for v, name in enumerate(cams.names):
        write_png(L.image_path(fid, name), dots[v])
    # view 1 is stored in portrait (turned clockwise) with its calibration: the dataset turns
    # it back to landscape, image and camera
    write_png(L.image_path(fid, cams.names[1]), np.rot90(dots[1], -1))
    stored = Cameras.cat([cams[0:1], cams[1:2].rotate90(3), cams[2:3]]).resize(scale=2.0)
    write_cameras_json(L.calibration_dir("subj1", "seqA") / "cameras.json", stored)
    plain = CaptureDataset(cfg_for(root, min_views=1), [fid], train=False)[0]
    assert torch.equal(plain.images[1, 0], torch.from_numpy(dots[1].astype(np.float32) / 255))
    np.testing.assert_allclose(plain.cameras.K.numpy(), cams.K.numpy(), rtol=1e-5, atol=1e-4)
    with pytest.raises(TempehDataError, match="different sizes"):
        CaptureDataset(cfg_for(root, min_views=1, rotate_portrait=False), [fid])
    cfg = cfg_for(root, image_downsample=2, min_views=1,
                  augment=AugmentConfig(scale_range=(0.9, 1.1), brightness_sigma=0.0))
    ds = CaptureDataset(cfg, [fid], train=True)
    errs = []
    for seed in range(5):
        s = ds[(0, (0, 1, 2), seed)]
        assert s.images.shape == (3, 1, 30, 40)
        uv2, _ = s.cameras.project(X.float())
        for v in range(3):
            errs.append(np.abs(centroid(s.images[v, 0].numpy()) - uv2[v, 0].double().numpy()).max())
    assert max(errs) < 0.1, errs


def test_brightness_one_factor_per_view():
    rng = np.random.default_rng(0)
    f = aug.sample_brightness(rng, 2000, 0.33)
    assert abs(f.std() - 0.33) < 0.02 and abs(f.mean() - 1) < 0.02
    img = np.full((2, 4, 5), 0.5, np.float32)
    out = aug.apply_brightness(img, np.array([1.5, 3.0]))
    assert np.allclose(out[0], 0.75) and np.allclose(out[1], 1.0)  # one factor per view, clipped


def test_augmentation_depends_only_on_the_seed(capture):
    ds = CaptureDataset(cfg_for(capture), "data_lists/all.json", train=True)
    a, b, c = ds[(0, (1, 2), 7)], ds[(0, (1, 2), 7)], ds[(0, (1, 2), 8)]
    assert torch.equal(a.images, b.images) and torch.equal(a.cameras.K, b.cameras.K)
    assert torch.equal(a.scan, b.scan)
    assert not torch.equal(a.images, c.images) and not torch.equal(a.cameras.K, c.cameras.K)
    # no augmentation in evaluation datasets, even with a seed
    ev = CaptureDataset(cfg_for(capture), "data_lists/all.json", train=False)
    assert torch.equal(ev[(0, (1, 2), 7)].images, ev[(0, (1, 2), None)].images)


# ---------------------------------------------------------------------------- sampler
def test_sampler_is_deterministic_resumable_and_shares_views():
    kw = dict(num_frames=11, num_views=16, batch_size=2, min_views=8, max_views=16, seed=5)
    s = ViewBatchSampler(**kw)
    assert len(s) == 5
    s.set_epoch(3)
    e3 = list(s)
    assert e3 == ViewBatchSampler(**kw).epoch_batches(3)
    assert e3 != s.epoch_batches(4)
    sizes = set()
    for batch in e3 + s.epoch_batches(4) + s.epoch_batches(5):
        assert len(batch) == 2 and batch[0][1] == batch[1][1]  # one view subset per batch
        views = batch[0][1]
        assert list(views) == sorted(set(views)) and 8 <= len(views) <= 16
        assert batch[0][2] != batch[1][2]
        sizes.add(len(views))
    assert len(sizes) > 1
    # every frame at most once per epoch
    idx = [k[0] for b in e3 for k in b]
    assert len(idx) == len(set(idx)) == 10
    # resuming at global step 17 = epoch 3, step 2 reproduces the remaining batches
    r = ViewBatchSampler(**kw)
    assert r.set_position(17) == (3, 2)
    assert list(r) == e3[2:]
    state = ViewBatchSampler(**kw)
    state.load_state_dict(r.state_dict() | {"epoch": 3, "start_step": 4})
    assert list(state) == e3[4:]
    with pytest.raises(ValueError, match="num_frames"):
        ViewBatchSampler(**{**kw, "num_frames": 12}).load_state_dict(r.state_dict())


def test_sampler_ranks_partition_each_step():
    kw = dict(num_frames=13, num_views=6, batch_size=2, min_views=2, max_views=None, seed=1)
    ranks = [ViewBatchSampler(**kw, rank=r, world_size=3).epoch_batches(0) for r in range(3)]
    assert all(len(b) == 2 for b in ranks)  # 13 // (2*3)
    seen = []
    for step in range(2):
        views = {tuple(ranks[r][step][0][1]) for r in range(3)}
        assert len(views) == 1  # all ranks of a step share V
        seen += [k[0] for r in range(3) for k in ranks[r][step]]
    assert len(seen) == len(set(seen)) == 12
    ev = [eval_batches(5, 2, 4, rank=r, world_size=2) for r in range(2)]
    assert sorted(k[0] for e in ev for b in e for k in b) == list(range(5))
    assert all(k[1] == (0, 1, 2, 3) and k[2] is None for e in ev for b in e for k in b)


# ---------------------------------------------------------------------------- collate and workers
def test_collate_and_loader_with_workers(capture):
    ds = CaptureDataset(cfg_for(capture), "data_lists/all.json", train=True)
    sampler = ViewBatchSampler(len(ds), ds.num_views, 2, 2, V, seed=0)
    batches0 = list(make_loader(ds, sampler, num_workers=0))
    batches2 = list(make_loader(ds, sampler, num_workers=2))
    assert len(batches0) == len(batches2) == 2
    for b0, b2 in zip(batches0, batches2):
        assert isinstance(b0, Batch)
        Vb = b0.images.shape[1]
        assert b0.images.shape == (2, Vb, 1, H, W) and b0.cameras.batch_shape == (2, Vb)
        assert b0.scan.shape == (2, 128, 3) and b0.scan_valid.shape == (2, 128)
        assert b0.registration.shape == b0.gt_verts.shape == (2, 162, 3)
        assert b0.coarse_verts is None and len(b0.frames) == 2
        assert b0.cameras.names is not None and len(b0.cameras.names) == Vb
        for f in ("images", "scan", "registration", "indices"):
            assert torch.equal(getattr(b0, f), getattr(b2, f))  # workers change nothing
        assert torch.equal(b0.cameras.K, b2.cameras.K)
        # the batch cameras are each sample's cameras
        s = ds[(int(b0.indices[1]), tuple(sampler.epoch_batches(0)[0][0][1]), None)]
        assert s.cameras.K.shape[0] <= 4
    moved = batches0[0].to("cpu")
    assert moved.images.device.type == "cpu"
    assert collate([None, None]) is None


# ---------------------------------------------------------------------------- refinement input
def test_refine_needs_coarse_cache(capture, tmp_path):
    with pytest.raises(ConfigError, match="coarse_cache_dir"):
        CaptureDataset(cfg_for(capture), "data_lists/all.json", stage="refine")
    cache = tmp_path / "coarse"
    cfg = cfg_for(capture, coarse_cache_dir=str(cache))
    with pytest.raises(TempehDataError) as e:
        CaptureDataset(cfg, "data_lists/all.json", stage="refine")
    assert "coarse" in str(e.value) and "seqA.000000.ply" in str(e.value)
    L = CaptureLayout(capture)
    for i in range(5):
        fid = FrameId("subj1", "seqA", f"{i:06d}")
        v, f = read_mesh(L.registration_path(fid), units="m")
        write_mesh(cache / "subj1" / "seqA" / f"seqA.{i:06d}.ply", v + 1.0, f, units="m")
    ds = CaptureDataset(cfg, "data_lists/all.json", stage="refine", template_num_verts=162)
    s = ds[0]
    np.testing.assert_allclose(s.coarse_verts.numpy(), s.registration.numpy() + 1.0, atol=1e-3)


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def small_capture(tmp_path) -> Path:
    return write_tiny_capture(tmp_path / "cap", num_frames=4, num_views=2, width=16, height=12,
                              scan_points=50)


def _frame(i):
    return FrameId("subj1", "seqA", f"{i:06d}")


def test_missing_scan_registration_and_absent_frames(small_capture):
    L = CaptureLayout(small_capture)
    L.scan_path(_frame(1)).unlink()
    with pytest.raises(TempehDataError, match=r"scans/subj1/seqA/seqA\.000001"):
        CaptureDataset(cfg_for(small_capture, min_views=1), "data_lists/all.json")
    write_tiny_capture(small_capture, num_frames=4, num_views=2, width=16, height=12, scan_points=50)
    L.registration_path(_frame(2)).unlink()
    with pytest.raises(TempehDataError, match=r"registrations/subj1/seqA/seqA\.000002\.ply"):
        CaptureDataset(cfg_for(small_capture, min_views=1), "data_lists/all.json")
    write_data_list(L.data_list_path("ghost"), [("subj1", "seqA", "000099")])
    with pytest.raises(TempehDataError, match=r"images/subj1/seqA/000099"):
        CaptureDataset(cfg_for(small_capture, min_views=1), "data_lists/ghost.json")
    with pytest.raises(TempehDataError, match="nolist.json"):
        CaptureDataset(cfg_for(small_capture, min_views=1), "data_lists/nolist.json")


def test_unreadable_and_missing_images(small_capture):
    L = CaptureLayout(small_capture)
    img = L.image_path(_frame(0), "23_B")
    img.write_bytes(img.read_bytes()[:40])  # truncated
    with pytest.raises(TempehDataError, match=r"seqA\.000000\.23_B\.png"):
        CaptureDataset(cfg_for(small_capture, min_views=1), "data_lists/all.json")
    img.unlink()  # now frame 0 lacks a view the other frames have
    with pytest.raises(TempehDataError, match=r"seqA\.000000\.23_B\.png.*camera"):
        CaptureDataset(cfg_for(small_capture, min_views=1), "data_lists/all.json")


def test_skip_bad_frames_skips_and_counts(small_capture, caplog):
    L = CaptureLayout(small_capture)
    L.scan_path(_frame(1)).unlink()
    L.image_path(_frame(3), "23_A").write_bytes(b"not a png")
    cfg = cfg_for(small_capture, min_views=1, skip_bad_frames=True)
    with caplog.at_level(logging.WARNING, logger="tempeh.data.dataset"):
        ds = CaptureDataset(cfg, "data_lists/all.json")
    assert ds.frames == [_frame(0), _frame(2)]
    assert set(ds.skipped) == {_frame(1), _frame(3)}
    assert "skipped 2 bad frame(s) of 4" in caplog.text
    # corruption only a full read reveals: error naming the file, or None + dropped with skip
    L.registration_path(_frame(2)).write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 5\n"
                                               b"property float x\nproperty float y\nproperty float z\n"
                                               b"element face 1\nproperty list uchar int vertex_indices\n"
                                               b"end_header\n\x00\x01")
    assert ds[1] is None
    batch = collate([ds[0], ds[1]])
    assert len(batch) == 1 and batch.frames == [_frame(0)]
    strict = CaptureDataset(cfg_for(small_capture, min_views=1), [_frame(0), _frame(2)])
    with pytest.raises(TempehDataError, match=r"registrations/subj1/seqA/seqA\.000002\.ply"):
        strict[1]
    with pytest.raises(TempehDataError, match=r"registrations/subj1/seqA/seqA\.000002\.ply"):
        strict.check(deep=True)


def test_vertex_count_must_match_template(small_capture):
    ds = CaptureDataset(cfg_for(small_capture, min_views=1), "data_lists/all.json",
                        template_num_verts=100)
    with pytest.raises(TempehDataError, match=r"registrations/.*162 vertices, the template 100"):
        ds[0]
