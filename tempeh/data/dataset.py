"""Training and evaluation samples over a capture folder (or its HDF5 cache).

One :class:`Sample` per frame of a data list (``tempeh.io.layout``):

* ``images``: ``(V, 1, H, W)`` float32 in [0, 1], grey; ``cameras``: ``(V,)`` float32
  :class:`~tempeh.cameras.Cameras` that describe these images EXACTLY (after the stored-size
  adjustment, ``image_downsample`` and augmentation).
* ``scan``: ``(P, 3)`` float32 world mm, ``P = data.scan_points`` points drawn WITHOUT
  replacement; a scan with fewer points is returned whole and zero-padded, ``scan_valid``
  ``(P,)`` bool marks the real points (losses take it as their mask).
* ``registration``: ``(N, 3)`` float32 mm; ``gt_verts`` ``(N, 3)`` when the capture has
  ``gt_meshes/``; ``coarse_verts`` ``(N, 3)`` for stage "refine", read from
  ``data.coarse_cache_dir`` (a missing file is an error naming it: there is NO fallback).

Views: the cameras of a frame are ``data.cameras`` or every camera with an image in the frame
folder (sorted). Within a sequence every listed frame must have the same cameras (a missing
image is a bad frame naming the file) and all sequences the same number of views. The
dataset's keys are ints (all views, no augmentation) or ``(index, views, aug_seed)`` from
:class:`~tempeh.data.sampler.ViewBatchSampler` (``views`` index the frame's camera list).

Stored images may be smaller than the calibrated size by a uniform factor (e.g. stored at 1/4):
the cameras are resized to the stored size first (aspect ratio must agree within rounding).

Bad data: :meth:`CaptureDataset.check` (run by the constructor) verifies every listed frame up
front: images present and complete, calibration readable with every camera, sizes equal,
scan / registration / gt / coarse-cache files present (``deep=True`` also decodes all of
them). A bad frame raises :class:`~tempeh.errors.TempehDataError` naming the file, or with
``data.skip_bad_frames`` is dropped, logged and counted (``dataset.skipped``). A file that is
corrupt in a way only a full read reveals raises at load time, again naming the file; with
``skip_bad_frames`` the sample becomes ``None``, :func:`~tempeh.data.collate` drops it and the
count is logged.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from tempeh.cameras import Cameras
from tempeh.config import DataConfig
from tempeh.data import augment as aug
from tempeh.errors import ConfigError, TempehDataError
from tempeh.io.images import check_png_complete, image_size, read_gray
from tempeh.io.layout import CaptureLayout, FrameId, frame_file, frame_id, read_data_list
from tempeh.io.mesh import read_mesh, read_points

logger = logging.getLogger(__name__)

__all__ = ["Sample", "CaptureDataset", "load_views", "cameras_for_image_sizes",
           "STAGES"]

PathLike = Union[str, os.PathLike]
STAGES = ("coarse", "refine")


@dataclass
class Sample:
    """One frame, ready for the networks (all 3D quantities world mm).

    images: ``(V, 1, H, W)`` float32 in [0, 1].
    cameras: ``(V,)`` float32 cameras of ``images`` (names = camera names).
    scan: ``(P, 3)`` float32 scan points (zero rows where ``scan_valid`` is False).
    scan_valid: ``(P,)`` bool.
    registration: ``(N, 3)`` float32 reference registration.
    gt_verts: ``(N, 3)`` float32 ground-truth mesh (synthetic captures) or None.
    coarse_verts: ``(N, 3)`` float32 cached coarse prediction (stage refine) or None.
    frame: the frame id.
    index: position in the dataset.
    """

    images: Tensor
    cameras: Cameras
    scan: Tensor
    scan_valid: Tensor
    registration: Tensor
    gt_verts: Optional[Tensor]
    coarse_verts: Optional[Tensor]
    frame: FrameId
    index: int


# ============================================================================ pure helpers
def cameras_for_image_sizes(cams: Cameras, sizes: Sequence[Tuple[int, int]],
                            paths: Sequence[PathLike]) -> Cameras:
    """Adapt ``(V,)`` calibrated cameras to the stored image sizes ``(w, h)``.

    A view whose image is the calibrated size is unchanged; one that is uniformly scaled
    (``h == round(H w / W)`` or ``w == round(W h / H)``) gets ``Cameras.resize(size=(w, h))``;
    anything else raises TempehDataError naming the image.
    """
    out = []
    for v, ((w, h), p) in enumerate(zip(sizes, paths)):
        cam = cams[v:v + 1]
        W, H = int(cam.width[0]), int(cam.height[0])
        if (w, h) == (W, H):
            out.append(cam)
            continue
        if abs(h - H * w / W) <= 1.0 or abs(w - W * h / H) <= 1.0:
            out.append(cam.resize(size=(w, h)))
            continue
        raise TempehDataError(p, f"image is {w}x{h} but camera "
                                 f"{(cams.names or ['?'] * len(sizes))[v]!r} is calibrated for "
                                 f"{W}x{H} (not a uniform rescale)")
    return Cameras.cat(out)


def load_views(layout: CaptureLayout, fid: FrameId, names: Sequence[str],
               downsample: float = 1.0, rotate_portrait: bool = True) -> Tuple[np.ndarray, Cameras]:
    """Read the images of ``names`` and their cameras, downsampled by ``downsample``.

    With ``rotate_portrait`` a portrait view (H > W) is turned 90 degrees counter-clockwise
    (``np.rot90``) with :meth:`Cameras.rotate90`, so mixed-orientation rigs stack (as the
    reference does).

    Returns:
        images ``(V, H, W)`` uint8 and cameras ``(V,)`` float64 describing them exactly.
    Raises:
        TempehDataError naming the image or calibration at fault (also when the views'
        sizes differ after downsampling and rotation).
    """
    paths = [layout.image_path(fid, n) for n in names]
    imgs = [read_gray(p) for p in paths]
    cams = layout.cameras_for(fid, list(names))
    cams = cameras_for_image_sizes(cams, [(im.shape[1], im.shape[0]) for im in imgs], paths)
    if downsample != 1:
        imgs = [aug.downsample_image(im, aug.downsample_size(im.shape[1], im.shape[0], downsample))
                for im in imgs]
        sizes = [(im.shape[1], im.shape[0]) for im in imgs]
        if len(set(sizes)) == 1:
            cams = cams.resize(size=sizes[0])
        else:
            cams = Cameras.cat([cams[v:v + 1].resize(size=sz) for v, sz in enumerate(sizes)])
    if rotate_portrait and any(im.shape[0] > im.shape[1] for im in imgs):
        cams = Cameras.cat([cams[v:v + 1].rotate90(1) if im.shape[0] > im.shape[1] else cams[v:v + 1]
                            for v, im in enumerate(imgs)])
        imgs = [np.ascontiguousarray(np.rot90(im, 1)) if im.shape[0] > im.shape[1] else im
                for im in imgs]
    for p, im in zip(paths, imgs):
        if im.shape != imgs[0].shape:
            raise TempehDataError(p, f"image is {im.shape[1]}x{im.shape[0]} after downsampling"
                                     f"{' and rotation' if rotate_portrait else ''}, the first "
                                     f"view of the frame {imgs[0].shape[1]}x{imgs[0].shape[0]}")
    return np.stack(imgs), cams


def _subset_points(rng: np.random.Generator, pts: np.ndarray, P: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(P, 3)`` float32 subset without replacement (zero-padded) and ``(P,)`` validity."""
    n = pts.shape[0]
    valid = np.zeros(P, dtype=bool)
    out = np.zeros((P, 3), dtype=np.float32)
    if n >= P:
        idx = rng.choice(n, size=P, replace=False)
        out[:] = pts[idx]
        valid[:] = True
    else:
        out[:n] = pts[rng.permutation(n)]
        valid[:n] = True
    return out, valid


# ============================================================================ dataset
class CaptureDataset(torch.utils.data.Dataset):
    """Samples of the frames of one data list (see the module docstring).

    Args:
        cfg: the data config (``root`` required).
        split_list: a data-list path (relative paths are taken relative to ``cfg.root``) or
            a sequence of frames (FrameId / ``"s/q/f"`` / 3-lists).
        stage: "coarse" or "refine" (refine needs ``cfg.coarse_cache_dir``).
        train: training samples (augmentation when ``cfg.augment.enabled``).
        template_num_verts: if given, every registration / gt / coarse mesh must have this
            many vertices.
    """

    def __init__(self, cfg: DataConfig, split_list, stage: str = "coarse", train: bool = True,
                 template_num_verts: Optional[int] = None):
        if stage not in STAGES:
            raise ConfigError(f"CaptureDataset: stage must be one of {STAGES}, got {stage!r}")
        if cfg.root is None:
            raise ConfigError("data.root: the capture folder is required")
        if stage == "refine" and cfg.coarse_cache_dir is None:
            raise ConfigError("data.coarse_cache_dir is required for stage 'refine' (the cached "
                              "coarse meshes; there is no fallback to the registrations)")
        self.cfg = cfg
        self.stage = stage
        self.train = train
        self.template_num_verts = template_num_verts
        self.layout = CaptureLayout(cfg.root)
        if isinstance(split_list, (str, os.PathLike)):
            p = Path(split_list)
            self.list_path: Optional[Path] = p if p.is_absolute() else self.layout.root / p
            frames = read_data_list(self.list_path)
        else:
            self.list_path = None
            try:
                frames = [frame_id(f) for f in split_list]
            except ValueError as err:
                raise TempehDataError(None, f"bad frame in the given frame list: {err}") from None
        self._cache = None
        self._cache_pid = None
        self.cache_path = Path(cfg.use_cache) if cfg.use_cache else None
        if self.cache_path is not None:
            cache = self._open_cache()
            if cache.rotate_portrait != cfg.rotate_portrait:
                raise ConfigError(f"data.use_cache: {self.cache_path} was built with "
                                  f"rotate_portrait={cache.rotate_portrait}, but "
                                  f"data.rotate_portrait is {cfg.rotate_portrait}")
            if abs(cache.image_downsample - cfg.image_downsample) > 1e-9:
                raise ConfigError(f"data.use_cache: {self.cache_path} holds images downsampled by "
                                  f"{cache.image_downsample:g}, but data.image_downsample is "
                                  f"{cfg.image_downsample:g} (rebuild the cache or change one)")
        self.has_gt = (self.layout.root / "gt_meshes").is_dir() if self.cache_path is None \
            else self._open_cache().has_gt
        self.skipped: Dict[FrameId, str] = {}
        self.frames: List[FrameId] = list(frames)
        self.camera_names: List[Tuple[str, ...]] = []
        self.check()

    # ------------------------------------------------------------------ cache handle
    def _open_cache(self):
        """The HDF5 cache, opened once per process (safe with DataLoader workers)."""
        from tempeh.data.cache import CaptureCache

        if self._cache is None or self._cache_pid != os.getpid():
            self._cache = CaptureCache(self.cache_path)
            self._cache_pid = os.getpid()
        return self._cache

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None  # h5py handles do not cross processes
        state["_cache_pid"] = None
        return state

    # ------------------------------------------------------------------ checking
    def _frame_cameras(self, fid: FrameId) -> Tuple[str, ...]:
        if self.cache_path is not None:
            available = self._open_cache().camera_names(fid)
            if self.cfg.cameras is None:
                return tuple(available)
            missing = [c for c in self.cfg.cameras if c not in available]
            if missing:
                raise TempehDataError(self.cache_path, f"frame {fid}: no images of camera(s) "
                                                       f"{missing} in the cache")
            return tuple(self.cfg.cameras)
        if self.cfg.cameras is not None:
            return tuple(self.cfg.cameras)
        names = tuple(self.layout.frame_cameras(fid))
        if not names:
            raise TempehDataError(self.layout.image_dir(fid), f"no images for frame {fid} "
                                  f"(expected <sequence>.<frame>.<camera>.{self.layout.image_ext})")
        return names

    def _check_frame(self, fid: FrameId, names: Tuple[str, ...], deep: bool) -> None:
        """Raise TempehDataError naming the first problem of one frame."""
        if self.cache_path is not None:
            cache = self._open_cache()
            cache.check_frame(fid)
            if deep:
                self._load(fid, tuple(range(len(names))), names, None, 0)
        else:
            L = self.layout
            sizes = set()
            for n in names:
                p = L.image_path(fid, n)
                if not p.is_file():
                    raise TempehDataError(p, f"image of camera {n!r} not found")
                if p.suffix.lower() == ".png":
                    check_png_complete(p)
                w, h = image_size(p)
                sizes.add((max(w, h), min(w, h)) if self.cfg.rotate_portrait else (w, h))
            if len(sizes) > 1:
                raise TempehDataError(L.image_dir(fid), f"views have different sizes {sorted(sizes)}")
            L.cameras_for(fid, list(names))
            L.scan_path(fid)
            for p, what in ((L.registration_path(fid), "registration"),
                            (L.gt_mesh_path(fid), "ground-truth mesh")):
                if what == "registration" or self.has_gt:
                    if not p.is_file():
                        raise TempehDataError(p, f"{what} of frame {fid} not found")
        if self.stage == "refine":
            p = frame_file(self.cfg.coarse_cache_dir, fid)
            if not p.is_file():
                raise TempehDataError(p, f"cached coarse mesh of frame {fid} not found "
                                         "(run the coarse stage on this list first)")
        if deep and self.cache_path is None:
            self._load(fid, tuple(range(len(names))), names, None, 0)

    def check(self, deep: bool = False) -> int:
        """Verify every frame (see the module docstring); returns the number of usable frames.

        Raises TempehDataError naming the first bad file, unless ``skip_bad_frames`` (then the
        bad frames are removed, logged and recorded in ``self.skipped``).
        """
        good, names_of, bad = [], [], {}
        for fid in self.frames:
            try:
                names = self._frame_cameras(fid)
                self._check_frame(fid, names, deep)
            except TempehDataError as err:
                if not self.cfg.skip_bad_frames:
                    raise
                bad[fid] = str(err)
                continue
            good.append(fid)
            names_of.append(names)
        # every frame of a sequence must have the sequence's cameras
        if self.cfg.cameras is None and good:
            union: Dict[Tuple[str, str], set] = {}
            for fid, names in zip(good, names_of):
                union.setdefault(fid[:2], set()).update(names)
            keep_f, keep_n = [], []
            for fid, names in zip(good, names_of):
                missing = sorted(union[fid[:2]] - set(names))
                if missing:
                    p = self.layout.image_path(fid, missing[0]) if self.cache_path is None \
                        else self.cache_path
                    msg = (f"frame {fid} has no image of camera(s) {missing} (other frames of "
                           f"the sequence have them)")
                    if not self.cfg.skip_bad_frames:
                        raise TempehDataError(p, msg)
                    bad[fid] = f"{p}: {msg}"
                    continue
                keep_f.append(fid)
                keep_n.append(names)
            good, names_of = keep_f, keep_n
        counts = Counter(len(n) for n in names_of)
        if len(counts) > 1:
            by_seq = sorted({(f[0], f[1], len(n)) for f, n in zip(good, names_of)})
            raise TempehDataError(self.list_path, "sequences have different numbers of views "
                                  f"{by_seq[:6]}; choose a common set with data.cameras")
        if bad:
            self.skipped.update(bad)
            logger.warning("skipped %d bad frame(s) of %d (data.skip_bad_frames): first: %s",
                           len(bad), len(self.frames), next(iter(bad.values())))
            for fid, why in bad.items():
                logger.info("skipped frame %s: %s", fid, why)
        self.frames, self.camera_names = good, names_of
        if not self.frames:
            raise TempehDataError(self.list_path, "no usable frames" + (
                f" ({len(bad)} skipped as bad)" if bad else ""))
        return len(self.frames)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.frames)

    @property
    def num_views(self) -> int:
        """Views of every frame."""
        return len(self.camera_names[0])

    def __getitem__(self, key) -> Optional[Sample]:
        """``key``: int (all views, no augmentation) or ``(index, views, aug_seed)``."""
        if isinstance(key, (tuple, list)):
            index, views, seed = key
        else:
            index, views, seed = int(key), None, None
        index = int(index)
        if not 0 <= index < len(self.frames):
            raise IndexError(f"index {index} out of range [0, {len(self.frames)})")
        names = self.camera_names[index]
        views = tuple(range(len(names))) if views is None else tuple(int(v) for v in views)
        fid = self.frames[index]
        try:
            return self._load(fid, views, names, seed, index)
        except TempehDataError as err:
            if not self.cfg.skip_bad_frames:
                raise
            logger.warning("skipping frame %s at load time (data.skip_bad_frames): %s", fid, err)
            return None

    def _augmenting(self, seed: Optional[int]) -> bool:
        a = self.cfg.augment
        return seed is not None and a.enabled and (self.train or a.on_validation)

    def _load(self, fid: FrameId, views: Tuple[int, ...], names: Tuple[str, ...],
              seed: Optional[int], index: int) -> Sample:
        if len(views) == 0 or min(views) < 0 or max(views) >= len(names):
            raise IndexError(f"view indices {views} out of range for {len(names)} views")
        sel = [names[v] for v in views]
        cfg = self.cfg
        if self.cache_path is not None:
            cache = self._open_cache()
            imgs_u8, cams = cache.read_views(fid, sel)
            scan_all = cache.read_scan(fid)
            reg = cache.read_registration(fid)
            gt = cache.read_gt(fid) if self.has_gt else None
        else:
            L = self.layout
            imgs_u8, cams = load_views(L, fid, sel, cfg.image_downsample, cfg.rotate_portrait)
            scan_all = read_points(L.scan_path(fid), units=L.scan_units).astype(np.float32)
            reg = read_mesh(L.registration_path(fid), units=L.mesh_units)[0].astype(np.float32)
            gt = None
            if self.has_gt:
                gt = read_mesh(L.gt_mesh_path(fid), units=L.mesh_units)[0].astype(np.float32)
        coarse = None
        if self.stage == "refine":
            p = frame_file(cfg.coarse_cache_dir, fid)
            if not p.is_file():
                raise TempehDataError(p, f"cached coarse mesh of frame {fid} not found")
            coarse = read_mesh(p, units=cfg.coarse_cache_units)[0].astype(np.float32)
        for what, v, path in (("registration", reg, "registration"), ("gt", gt, "gt_meshes"),
                              ("coarse", coarse, "coarse cache")):
            if v is not None and self.template_num_verts is not None \
                    and v.shape[0] != self.template_num_verts:
                where = {"registration": self.layout.registration_path(fid),
                         "gt": self.layout.gt_mesh_path(fid),
                         "coarse": frame_file(cfg.coarse_cache_dir or ".", fid)}[what]
                if self.cache_path is not None and what != "coarse":
                    where = self.cache_path
                raise TempehDataError(where, f"{what} mesh of frame {fid} has {v.shape[0]} "
                                             f"vertices, the template {self.template_num_verts}")

        # --- randomness: one generator per sample, fixed draw order (augmentation, then scan)
        rng = np.random.default_rng(seed if seed is not None else
                                    np.random.SeedSequence([0x7E3, index]))
        imgs = imgs_u8.astype(np.float32) / np.float32(255.0)
        if self._augmenting(seed):
            V, H, W = imgs.shape
            params = np.array([aug.sample_scale_crop(rng, W, H, cfg.augment.scale_range)
                               for _ in range(V)])
            imgs, cams = aug.scale_crop(imgs, cams, params)
            factors = aug.sample_brightness(rng, V, cfg.augment.brightness_sigma)
            imgs = aug.apply_brightness(imgs, factors)
        scan, valid = _subset_points(rng, scan_all, cfg.scan_points)

        as_t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return Sample(images=torch.from_numpy(np.ascontiguousarray(imgs))[:, None],
                      cameras=cams.to(dtype=torch.float32),
                      scan=as_t(scan), scan_valid=as_t(valid), registration=as_t(reg),
                      gt_verts=as_t(gt), coarse_verts=as_t(coarse), frame=fid, index=index)
