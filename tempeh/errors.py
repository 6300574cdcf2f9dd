"""Errors raised for bad input. Every message names the file (and line or key) at fault."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class TempehDataError(ValueError):
    """Bad or missing input data: a capture file, calibration, mesh, data list or template.

    ``str(err)`` starts with the path (and ``:line`` for text formats) so a user can open it.
    """

    def __init__(self, path: Union[str, Path, None], message: str, line: Optional[int] = None):
        self.path = None if path is None else Path(path)
        self.line = line
        where = "" if path is None else f"{path}" + (f":{line}" if line is not None else "") + ": "
        super().__init__(where + message)


class ConfigError(ValueError):
    """A configuration key that is unknown, missing or of the wrong type (the key is named)."""
