"""What every command-line entry point shares: argument parsing that returns an exit code
instead of raising SystemExit, and one logging format."""
from __future__ import annotations

import argparse
import logging
from typing import Callable, Optional, Sequence, Tuple

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def parse_cli(parse: Callable[[Optional[Sequence[str]]], argparse.Namespace],
              argv: Optional[Sequence[str]], log_default: Optional[int] = logging.WARNING
              ) -> Tuple[Optional[argparse.Namespace], int]:
    """Run ``parse(argv)``; return ``(args, 0)``, or ``(None, code)`` when argparse exits
    (``--help`` gives 0, a usage error gives 2), so ``main()`` can return the code.

    On success it also sets up logging: :func:`setup_logging` with ``args.verbose`` (False when
    the parser has no ``-v``) and ``log_default``; ``log_default=None`` leaves logging alone (for
    entry points that configure it themselves)."""
    try:
        args = parse(argv)
    except SystemExit as exc:
        return None, int(exc.code or 0)
    if log_default is not None:
        setup_logging(bool(getattr(args, "verbose", False)), default=log_default)
    return args, 0


def setup_logging(verbose: bool, default: int = logging.WARNING, fmt: str = LOG_FORMAT) -> None:
    """Log at INFO with ``-v`` (``DEBUG`` when the default is already INFO), else ``default``."""
    if verbose:
        level = logging.DEBUG if default <= logging.INFO else logging.INFO
    else:
        level = default
    logging.basicConfig(level=level, format=fmt)
