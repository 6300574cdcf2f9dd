"""``build_cache``: pack the frames of data lists into one HDF5 file for fast loading.

Usage::

    build_cache --data DIR --list LIST.json [--list ...] --out FILE.h5
                [--image-downsample K] [--compression lzf|gzip|none] [--camera NAME ...]

Stores, per frame, the 8-bit image stack (downsampled by K, one chunk per frame), the cameras
of those images, the scan points (float32 mm), the registration and (when the capture has
``gt_meshes/``) the ground-truth mesh; see :mod:`tempeh.data.cache`. Train with
``data.use_cache=FILE.h5 data.image_downsample=K``. Exit codes: 0 done, 1 bad data (the
message names the file), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

from tempeh.cli.common import parse_cli
from tempeh.errors import TempehDataError

logger = logging.getLogger(__name__)


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="build_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="capture folder")
    p.add_argument("--list", type=Path, action="append", required=True, dest="lists",
                   help="data list JSON (repeatable; relative paths: to the working directory, "
                        "else to --data)")
    p.add_argument("--out", type=Path, required=True, help="output .h5 file")
    p.add_argument("--image-downsample", type=float, default=1.0,
                   help="downsampling relative to the stored images (default 1)")
    p.add_argument("--compression", choices=("lzf", "gzip", "none"), default="lzf",
                   help="image-stack compression (default lzf)")
    p.add_argument("--camera", action="append", default=None, dest="cameras",
                   help="store only these cameras (repeatable; default: every camera with images)")
    p.add_argument("--keep-portrait", action="store_true",
                   help="do not rotate portrait views to landscape (data.rotate_portrait=false)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the cache; returns the exit code (0 ok, 1 bad data, 2 bad arguments)."""
    args, code = parse_cli(_parse_args, argv)
    if args is None:
        return code
    if args.image_downsample <= 0:
        print("--image-downsample must be > 0")
        return 2
    from tempeh.data.cache import build_cache
    from tempeh.io.layout import read_data_list

    if not args.data.is_dir():
        print(f"{args.data}: capture folder not found")
        return 1
    try:
        frames = []
        for lst in args.lists:
            path = lst if (lst.is_absolute() or lst.is_file()) else args.data / lst
            frames += read_data_list(path)
        out = build_cache(args.data, frames, args.out, image_downsample=args.image_downsample,
                          compression=None if args.compression == "none" else args.compression,
                          cameras=args.cameras, progress=not args.quiet,
                          rotate_portrait=not args.keep_portrait)
    except TempehDataError as err:
        print(err)
        return 1
    print(f"{out}: {len(set(frames))} frames")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
