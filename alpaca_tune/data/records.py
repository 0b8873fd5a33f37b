"""Load and validate instruction records before anything is trained.

Accepted files (detected from the content, not the file name, because Cog hands over downloads
with arbitrary names):
  - a JSON array of records
  - JSON Lines: one record per line (blank lines allowed); lines end at \n (or \r\n) only, as
    the JSON Lines format says: U+2028 or U+0085 inside a string is text, not a line break
Accepted records:
  - Alpaca: {"instruction": str, "input": str (optional), "output": str}
  - Replicate's llama trainers: {"prompt": str, "completion": str}; the prompt becomes the
    instruction and goes through the prompt template like any other (use template 'none' to
    train on the raw prompt text).
Every problem is reported with the file and the record (array index or line number).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

MAX_ERRORS_SHOWN = 5


class DataError(UserError):
    """The training data cannot be used; the message names the file, the record and the problem."""


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str


def _check_record(obj, where: str) -> Record | str:
    """A Record, or a message saying what is wrong with this record."""
    if not isinstance(obj, dict):
        return f"{where}: expected a JSON object, got {type(obj).__name__}"
    if "prompt" in obj and "instruction" not in obj:
        fields = {"instruction": "prompt", "input": None, "output": "completion"}
    else:
        fields = {"instruction": "instruction", "input": "input", "output": "output"}
    values = {}
    for name, key in fields.items():
        if key is None:
            values[name] = ""
            continue
        if key not in obj:
            if name == "input":
                values[name] = ""
                continue
            return (f"{where}: missing field {key!r} (records need instruction/input/output "
                    f"or prompt/completion)")
        value = obj[key]
        if value is None and name == "input":
            value = ""
        if not isinstance(value, str):
            return f"{where}: field {key!r} must be a string, got {type(value).__name__}"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # JSON's "\ud800" escape: no tokenizer takes it
            return (f"{where}: field {key!r} holds an unpaired surrogate {value[err.start]!r} at "
                    f"character {err.start}, which is not Unicode text")
        values[name] = value
    if not values["output"].strip():
        return f"{where}: field {fields['output']!r} is empty (nothing to learn)"
    if not values["instruction"].strip():
        return f"{where}: field {fields['instruction']!r} is empty"
    return Record(**values)


def _parse(text: str, path: Path) -> list[tuple[object, str]]:
    """(parsed record, its location) pairs from a JSON array or a JSON Lines text."""
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty")
    try:
        whole = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to be Alpaca records (records are flat JSON "
                        f"objects)") from None
    except json.JSONDecodeError as err:
        if stripped[0] != "{" or err.msg != "Extra data":
            raise DataError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: "
                            f"{err.msg})") from None
        whole = None  # several objects in a row: JSON Lines
    if whole is not None:
        if isinstance(whole, list):
            return [(obj, f"record {i}") for i, obj in enumerate(whole)]
        if not isinstance(whole, dict):
            raise DataError(f"{path}: expected a JSON array of records or JSON Lines, "
                            f"got a JSON {type(whole).__name__}")
        # a single object: a one-line JSONL file is fine, an object wrapping records is not
        looks_like_a_record = bool(whole.keys() & {"instruction", "output", "prompt", "completion"})
        if not looks_like_a_record and any(isinstance(v, list) for v in whole.values()):
            raise DataError(f"{path}: the top level is a JSON object; expected a JSON array of "
                            f"records (or one record per line)")
        return [(whole, "line 1")]
    parsed = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            parsed.append((json.loads(line), f"line {lineno}"))
        except RecursionError:
            raise DataError(f"{path}: line {lineno} is nested too deeply to be a record") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({err.msg}, column "
                            f"{err.colno})") from None
    return parsed


def load_records(path: str | Path) -> list[Record]:
    """All records of a data file, or DataError listing what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}, line {line}: "
                        f"{raw[err.start:err.start + 1]!r}); save the file as UTF-8") from None
    records, problems = [], []
    for obj, where in _parse(text, path):
        checked = _check_record(obj, where)
        (records if isinstance(checked, Record) else problems).append(checked)
    if problems:
        shown = "\n  ".join(problems[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_ERRORS_SHOWN} more" if len(problems) > MAX_ERRORS_SHOWN else ""
        raise DataError(f"{path}: {len(problems)} bad record(s):\n  {shown}{more}")
    if not records:
        raise DataError(f"{path}: contains no records")
    return records


def split_records(records: list[Record], val_set_size: float, seed: int):
    """(train, validation) lists; a fraction (< 1) or a count of records is held out, chosen by seed."""
    import random

    n_val = int(round(val_set_size * len(records))) if val_set_size < 1 else int(val_set_size)
    if n_val >= len(records):
        raise DataError(f"val_set_size={val_set_size}: holds out {n_val} of {len(records)} records, "
                        f"leaving none to train on")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val = [records[i] for i in sorted(order[:n_val])]
    train = [records[i] for i in sorted(order[n_val:])]
    return train, val
