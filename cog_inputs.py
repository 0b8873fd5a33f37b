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


_INPUT_TYPE = type(Input(description=""))


def filled_in(values: dict) -> dict:
    """The inputs of a direct Python call, with every input left out replaced by its default.

    Cog fills in defaults before it calls train() or predict(); a plain call such as
    `train(train_data=Path("data.json"))` or `predictor.predict(prompt="Hi")` would otherwise pass
    the Input objects themselves along as values.
    """
    filled = {}
    for name, value in values.items():
        if isinstance(value, _INPUT_TYPE):
            if value.default is None:  # only inputs without a default have none
                raise TypeError(f"input {name!r} is required")
            value = value.default
        filled[name] = value
    return filled
