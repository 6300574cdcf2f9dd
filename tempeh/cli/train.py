"""``train``: run the training pipeline (or some of its stages) into a run directory.

Usage::

    train --run-dir DIR [--config DIR | --config FILE | --config STAGE=FILE ...]
          [--stages a,b,c | --from STAGE] [--device auto|cpu|cuda] [-v] [KEY=VALUE ...]
          [STAGE:KEY=VALUE ...]

Stages, in order: ``coarse_pretrain``, ``coarse``, ``cache_coarse``, ``refine`` (all by
default). Each training stage reads ``<config dir>/<stage>.yaml`` (default dir: ``configs/``)
unless ``--config STAGE=FILE`` names another file; a plain ``--config FILE`` is allowed when
exactly one training stage is selected. ``KEY=VALUE`` overrides every training stage,
``STAGE:KEY=VALUE`` one of them. Examples::

    # the paper's coarse stages on a capture folder
    train --run-dir runs/exp1 --stages coarse_pretrain,coarse,cache_coarse data.root=data/famos
    # then the refinement (resumes a killed run: just run the same command again)
    train --run-dir runs/exp1 --from refine data.root=data/famos
    # one stage with its own file
    train --run-dir runs/exp2 --stages coarse_pretrain --config configs/demo_cpu.yaml data.root=cap

Multi-GPU: ``torchrun --nproc_per_node G tools/train.py --run-dir DIR ...`` (``run.batch_size``
per GPU; ``--run`` is an accepted alias of ``--run-dir`` but torchrun itself rejects it).
Layout of the run directory: :mod:`tempeh.engine.stages`. Exit code: 0 done, 1 bad
config/data (the message names the key or file), 2 bad arguments, 3 interrupted (resumable).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from tempeh.cli.common import parse_cli
from tempeh.errors import ConfigError, TempehDataError

logger = logging.getLogger(__name__)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--run-dir", "--run", dest="run", type=Path, required=True,
                   help="run directory (one folder per stage); under torchrun spell it --run-dir "
                        "(torchrun rejects --run as an abbreviation of its --run-path)")
    p.add_argument("--config", action="append", default=[], metavar="DIR|FILE|STAGE=FILE",
                   help="config folder with <stage>.yaml files, a stage's file, or STAGE=FILE "
                        "(repeatable; default folder: configs/)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stages", type=str, default=None, help="comma-separated stages to run")
    g.add_argument("--from", dest="start", type=str, default=None,
                   help="run this stage and every later one")
    p.add_argument("--device", type=str, default=None, help="override run.device of every stage")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", metavar="[STAGE:]KEY=VALUE",
                   help="config overrides, e.g. run.iterations=1000 refine:data.scan_points=5000")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the selected stages; see the module docstring for arguments and exit codes."""
    args, code = parse_cli(_parse_args, argv, log_default=None)
    if args is None:
        return code
    from tempeh.engine import distributed as D

    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.DEBUG if args.verbose else (logging.INFO if rank0 else logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from tempeh.engine.stages import run_pipeline, select_stages

    try:
        stages = select_stages(args.stages, args.start)
        results = run_pipeline(args.run, stages, args.config, args.overrides, device=args.device)
    except (ConfigError, TempehDataError) as err:
        print(f"train: {err}", file=sys.stderr)
        return 1
    finally:
        D.cleanup_distributed()
    interrupted = any(r.get("interrupted") for r in results.values())
    if rank0:
        for s, r in results.items():
            val = r.get("val") or {}
            extra = ", ".join(f"{k} {val[k]:.3f}" for k in ("s2m_median_mm", "reg_v2v_mean_mm",
                                                            "gt_v2v_mean_mm") if k in val)
            print(f"{s}: " + ("skipped (complete)" if r.get("skipped") else
                              r.get("cache_dir", f"step {r.get('step')}")) + (f" ({extra})" if extra else ""))
    return 3 if interrupted else 0


def run() -> None:
    """Command-line entry: :func:`main`, then exit (a torchrun worker skips the interpreter's
    finalisation, see :func:`tempeh.engine.distributed.exit_process`)."""
    from tempeh.engine.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
