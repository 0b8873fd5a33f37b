"""Cog Inputs built from the library's settings dataclasses (the single source of truth).

Only the entry points (train.py, predict.py) import cog; this helper is theirs.
"""

import dataclasses

from cog import Input


def cog_input(settings_cls, name: str):
    """Input(default, description, ge, le, choices, min_length) for one field of a settings dataclass."""
    field = next(f for f in dataclasses.fields(settings_cls) if f.name == name)
    meta = field.metadata
    kwargs = {"description": meta["help"]}
    if field.default is not dataclasses.MISSING:
        kwargs["default"] = field.default
    for key in ("ge", "le", "choices", "min_length"):
        if meta.get(key) is not None:
            kwargs[key] = meta[key]
    return Input(**kwargs)
