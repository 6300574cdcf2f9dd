"""Reading JSON files of a capture or a run, with errors that name the file and line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from tempeh.errors import TempehDataError


def read_json(path: Union[str, Path], expect: type = dict, what: str = "") -> Any:
    """Parse a JSON file whose top level must be an instance of ``expect`` (dict or list).

    Raises :class:`TempehDataError` naming the file (and the line of a syntax error) when it
    cannot be read, is not valid JSON, or holds the wrong top-level type (``what`` describes the
    expected content in that message).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise TempehDataError(path, f"cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise TempehDataError(path, f"invalid JSON: {err.msg}", line=err.lineno) from None
    if not isinstance(data, expect):
        kind = "object" if expect is dict else "list" if expect is list else expect.__name__
        raise TempehDataError(path, what or f"must hold a JSON {kind}")
    return data
