"""``register_sequence``: register capture frames with a trained run (coarse + refinement, all
views, no augmentation) and write one mesh per frame in the template topology.

Usage::

    register_sequence --model RUN_DIR --data DIR (--list LIST.json | --sequence SUBJECT/SEQUENCE ... | --all)
                      --out DIR [--units m|mm] [--format ply|obj] [--batch-size B]
                      [--device auto|cpu|cuda] [--shard I/N] [--coarse-only] [--smooth SIGMA_FRAMES]
                      [--smooth-mode reflect|odd] [--workers K] [--max-frames K] [--overwrite]
    register_sequence --merge --out DIR [--smooth SIGMA_FRAMES]

Outputs (see :mod:`tempeh.register`)::

    <out>/<subject>/<sequence>/<sequence>.<frame>.ply   metres by default; tools/evaluate.py --pred <out>
    <out>/<subject>/<sequence>/<sequence>.npz           verts (T, N, 3), faces, frames, units
    <out>/smoothed/<subject>/<sequence>/...              with --smooth (tools/evaluate.py --pred <out>/smoothed)
    <out>/manifest.json                                  model, stage config hashes, per-frame status and
                                                         timings, device, version, jitter before/after smoothing

Frames already written (complete files of the template's size) are skipped, so rerunning the
same command after an interruption (Ctrl-C, SIGTERM from a scheduler, ``--max-frames``)
completes the job. A bad frame (truncated image, missing view, unreadable calibration) is
reported with the file at fault and skipped; the rest go on.

Sharding: ``--shard I/N`` with a 0-based ``I`` (``0 .. N-1``, as a SLURM array
``--array=0-(N-1)``) registers one of N disjoint parts covering every planned frame exactly
once; whole sequences stay together when there are at least N of them. Each shard writes
``manifest.shard-I-of-N.json`` and the NPZ of the sequences it holds whole; afterwards
``--merge --out DIR`` writes ``manifest.json`` and the NPZ (and smoothing) of every sequence.
See ``tools/slurm/register_array.sbatch``.

Smoothing (``--smooth SIGMA``, off by default): Gaussian over time, sigma in frames, reflected
at the sequence ends (:mod:`tempeh.smoothing`). It reduces jitter and lags / flattens fast
expressions; the manifest and the summary give the jitter before and after.

Exit code: 0 every frame registered; 1 some frames failed, the run was interrupted, or the
model / data could not be read; 2 bad arguments.
"""
from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import Optional, Sequence

from tempeh.cli.common import parse_cli
from tempeh.errors import ConfigError, TempehDataError

logger = logging.getLogger(__name__)

__all__ = ["main"]


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from tempeh.register import parse_shard
    from tempeh.smoothing import MODES

    p = argparse.ArgumentParser(prog="register_sequence", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="run directory (<run>/coarse, <run>/refine)")
    p.add_argument("--data", type=Path, help="capture folder (images, calibrations)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--list", type=Path, help="data list JSON [[subject, sequence, frame], ...] "
                                               "(relative paths: cwd first, then --data)")
    src.add_argument("--sequence", action="append", metavar="SUBJECT/SEQUENCE",
                     help="every frame of a sequence (repeatable)")
    src.add_argument("--all", action="store_true", help="every frame of the capture")
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument("--units", choices=("m", "mm"), default="m", help="unit of the written meshes")
    p.add_argument("--format", choices=("ply", "obj"), default="ply", dest="fmt",
                   help="mesh format (tools/evaluate.py reads ply)")
    p.add_argument("--batch-size", type=int, default=1, help="frames per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--shard", type=str, default=None, metavar="I/N",
                   help="register shard I (0-based) of N")
    p.add_argument("--coarse-only", action="store_true", help="skip the refinement stage")
    p.add_argument("--coarse-stage", default="coarse",
                   help="stage folder of the coarse network (e.g. coarse_pretrain)")
    p.add_argument("--refine-stage", default="refine", help="stage folder of the refinement")
    p.add_argument("--rebox", type=int, default=None, metavar="K",
                   help="re-box passes of the coarse stage (default: the trained config's "
                        "model.rebox_iterations; each pass re-samples the grid in the template's "
                        "box on the last prediction)")
    p.add_argument("--smooth", type=float, default=0.0, metavar="SIGMA_FRAMES",
                   help="temporal Gaussian smoothing, sigma in frames (0: off)")
    p.add_argument("--smooth-mode", choices=MODES, default="reflect",
                   help="edge handling of the smoothing (reflect: even; odd: keeps motion at the ends)")
    p.add_argument("--workers", type=int, default=2, help="image-loading worker processes")
    p.add_argument("--max-frames", type=int, default=None,
                   help="stop after registering K frames (rerun to continue)")
    p.add_argument("--overwrite", action="store_true",
                   help="register every frame again (also into a folder of another model)")
    p.add_argument("--merge", action="store_true",
                   help="join the shard manifests of --out and write every sequence's NPZ")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    args = p.parse_args(argv)
    if args.out is None:
        p.error("--out is required")
    if args.merge:
        if args.shard is not None:
            p.error("--merge joins every shard; do not give --shard")
    else:
        lacking = [f"--{k}" for k in ("model", "data") if getattr(args, k) is None]
        if lacking:
            p.error(f"{', '.join(lacking)} required")
        if args.list is None and not args.sequence and not args.all:
            p.error("choose the frames: --list LIST.json, --sequence SUBJECT/SEQUENCE or --all")
    try:
        args.shard_t = parse_shard(args.shard) if args.shard else (0, 1)
    except ValueError as err:
        p.error(str(err))
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    if args.max_frames is not None and args.max_frames < 0:
        p.error("--max-frames must be >= 0")
    if args.rebox is not None and args.rebox < 0:
        p.error("--rebox must be >= 0")
    if not args.smooth >= 0:
        p.error("--smooth must be >= 0 (frames)")
    return args


def _frames(args):
    from tempeh.io.layout import CaptureLayout, read_data_list
    from tempeh.register import plan_frames

    layout = CaptureLayout(args.data)
    if args.list is not None:
        lst = args.list
        if not lst.is_absolute() and not lst.is_file() and (args.data / lst).is_file():
            lst = args.data / lst
        return plan_frames(layout, frames=read_data_list(lst))
    if args.sequence:
        return plan_frames(layout, sequences=args.sequence)
    return plan_frames(layout, all_frames=True)


def _merge(args) -> int:
    from tempeh.register import merge_shards

    try:
        merged, problems = merge_shards(args.out, smooth_sigma=args.smooth or None,
                                        smooth_mode=args.smooth_mode)
    except (TempehDataError, ValueError, OSError) as err:
        print(f"register_sequence --merge: {err}")
        return 1
    s = merged["summary"]
    print(f"merged {len(merged['merged_from'])} shard manifest(s): {s['ok'] + s['done']} frames "
          f"registered, {s['failed']} failed, {s['pending']} pending; "
          f"{len(merged['sequences'])} sequence NPZ written")
    _print_jitter(merged["sequences"])
    for msg in problems:
        print(msg)
    print(f"wrote {Path(args.out) / 'manifest.json'}")
    return 1 if problems else 0


def _print_jitter(sequences: dict) -> None:
    for name, rec in sorted(sequences.items()):
        j, js = rec.get("jitter_mm"), rec.get("jitter_smoothed_mm")
        if j is None:
            continue
        print(f"  {name}: {rec['frames']} frames, jitter {j:.4f} mm"
              + (f" -> {js:.4f} mm smoothed" if js is not None else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Register frames; returns the exit code (0 ok, 1 failures / interrupted, 2 bad arguments)."""
    args, code = parse_cli(_parse_args, argv)
    if args is None:
        return code
    if args.merge:
        return _merge(args)

    import torch

    from tempeh.engine.distributed import resolve_device
    from tempeh.register import RegisterOptions, load_models, register

    try:
        device = resolve_device(args.device)
    except (RuntimeError, ValueError) as err:
        print(f"register_sequence: --device: {err}")
        return 2
    try:
        frames = _frames(args)
        models = load_models(args.model, device, coarse_only=args.coarse_only,
                             coarse_stage=args.coarse_stage, refine_stage=args.refine_stage,
                             rebox_iterations=args.rebox)
    except (TempehDataError, ConfigError, ValueError) as err:
        print(f"register_sequence: {err}")
        return 1
    opts = RegisterOptions(units=args.units, fmt=args.fmt, batch_size=args.batch_size,
                           shard=args.shard_t, smooth_sigma=args.smooth,
                           smooth_mode=args.smooth_mode, workers=args.workers,
                           max_frames=args.max_frames, overwrite=args.overwrite,
                           amp=args.amp and device.type == "cuda")
    stop = {"flag": False}

    def on_term(signum, frame):  # noqa: ARG001 - scheduler pre-emption: finish the batch, then stop
        stop["flag"] = True

    old = None
    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        pass
    try:
        with torch.inference_mode():
            res = register(args.data, frames, args.out, models, device, opts,
                           should_stop=lambda: stop["flag"], progress=not args.quiet)
    except (TempehDataError, ConfigError) as err:
        print(f"register_sequence: {err}")
        return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)

    shard = "" if opts.shard[1] == 1 else f" (shard {opts.shard[0]}/{opts.shard[1]})"
    print(f"register_sequence{shard}: {res.planned} frames planned: {res.ok} registered "
          f"({res.frames_per_s:.2f} frames/s on {device}), {res.done_before} already done, "
          f"{len(res.failed)} failed, {res.pending} not reached")
    _print_jitter(res.sequences)
    for fr, err in res.failed:
        print(f"FAILED {fr}: {err}")
    if res.interrupted:
        print("interrupted: rerun the same command to complete the job")
    elif res.pending:
        print(f"{res.pending} frame(s) left (--max-frames): rerun the same command to continue")
    if opts.shard[1] > 1:
        print(f"after every shard has finished: register_sequence --merge --out {args.out}")
    print(f"wrote {res.manifest}")
    return 1 if (res.failed or res.interrupted) else 0


if __name__ == "__main__":
    raise SystemExit(main())
