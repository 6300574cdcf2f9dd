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
        self.message = message
        super().__init__(where + message)

    def __reduce__(self):
        # Picklable with its own arguments, so an error raised inside a DataLoader worker is
        # re-raised in the main process as the same type with the same file and line.
        return (type(self), (self.path, self.message, self.line))


class ConfigError(ValueError):
    """A configuration key that is unknown, missing or of the wrong type (the key is named)."""
