"""The one base class for mistakes a user can fix (bad data, settings, files), and reading a
user's JSON file with such a mistake as the answer.

Entry points catch it and print its message (no traceback) with a non-zero exit; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from pathlib import Path


class UserError(ValueError):
    """Input the user gave cannot be used; the message names it, says what is wrong and the fix."""


def read_json(path: Path, error: type[UserError], where: str):
    """The parsed JSON in `path`; `error` whose message starts with `where` when the file cannot
    be read, is not UTF-8 JSON, or is nested too deeply to parse."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise error(f"{where}: cannot be read ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise error(f"{where}: not UTF-8 JSON ({err})") from None
