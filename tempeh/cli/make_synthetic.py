"""``make_synthetic``: write a synthetic multi-view capture folder (images, calibrations, scans,
registrations, true meshes, template, data lists).

Usage::

    make_synthetic --out DIR --subjects N --sequences-per-subject S --frames-per-sequence T
                   --seed K [--views 16] [--rig paper|random] [--image-downsample 4]
                   [--template low|full|TEMPLATE_DIR] [--scan-points 80000] [--preview]
                   [--workers 1] [--overwrite]

The same seed and settings give byte-identical folders; see :mod:`tempeh.synth.writer` for the
layout and :mod:`tempeh.synth.render`, :mod:`tempeh.synth.scan`,
:mod:`tempeh.synth.registration` for what is simulated.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

from tempeh.cli.common import parse_cli
from tempeh.errors import TempehDataError

logger = logging.getLogger(__name__)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from tempeh.synth.writer import SyntheticConfig

    d = SyntheticConfig()
    p = argparse.ArgumentParser(prog="make_synthetic", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="capture folder to write")
    p.add_argument("--subjects", type=int, default=d.subjects)
    p.add_argument("--sequences-per-subject", type=int, default=d.sequences_per_subject)
    p.add_argument("--frames-per-sequence", type=int, default=d.frames_per_sequence)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--views", type=int, default=d.views, help="number of cameras")
    p.add_argument("--rig", choices=("paper", "random"), default=d.rig)
    p.add_argument("--image-downsample", type=int, default=d.image_downsample,
                   help="images are written at 1600x1200 / this")
    p.add_argument("--speckle-mm", type=float, default=d.speckle_mm,
                   help="cell size of the skin's speckle texture, mm")
    p.add_argument("--markings", type=float, default=d.markings,
                   help="strength in [0, 1] of the darker hair, eyes, lids, lips and nostrils "
                        "(0: speckle only)")
    p.add_argument("--template", type=str, default=d.template,
                   help="low | full (procedural head) | a template folder")
    p.add_argument("--scan-points", type=int, default=d.scan_points)
    p.add_argument("--scan-noise-mm", type=float, default=d.scan_noise_mm)
    p.add_argument("--outlier-rate", type=float, default=d.outlier_rate)
    p.add_argument("--hole-rate", type=float, default=d.hole_rate)
    p.add_argument("--translation-mm", type=float, default=d.translation_mm,
                   help="max head translation per axis")
    p.add_argument("--preview", action="store_true", help="also write preview.png")
    p.add_argument("--workers", type=int, default=d.workers, help="worker processes")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the generator; returns 0 on success, 1 on bad data/settings, 2 on bad arguments."""
    args, code = parse_cli(_parse_args, argv)
    if args is None:
        return code
    from tempeh.synth.writer import SyntheticConfig, write_synthetic_capture

    cfg = SyntheticConfig(
        subjects=args.subjects, sequences_per_subject=args.sequences_per_subject,
        frames_per_sequence=args.frames_per_sequence, seed=args.seed, views=args.views,
        rig=args.rig, image_downsample=args.image_downsample, speckle_mm=args.speckle_mm,
        markings=args.markings, template=args.template,
        scan_points=args.scan_points, scan_noise_mm=args.scan_noise_mm,
        outlier_rate=args.outlier_rate, hole_rate=args.hole_rate,
        translation_mm=args.translation_mm, preview=args.preview, workers=args.workers)
    try:
        write_synthetic_capture(args.out, cfg, overwrite=args.overwrite, progress=not args.quiet)
    except (TempehDataError, ValueError, FileExistsError) as err:
        print(f"make_synthetic: {err}")
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
