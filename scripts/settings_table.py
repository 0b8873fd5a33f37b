"""Print (or --check) the README's tables of training and prediction inputs, from the settings.

    python scripts/settings_table.py           # print both tables
    python scripts/settings_table.py --write   # rewrite them in README.md between the markers
"""

import dataclasses
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alpaca_tune.settings import GenerateSettings, TrainSettings  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
TABLES = {"train-inputs": TrainSettings, "predict-inputs": GenerateSettings}


def _default(field) -> str:
    if field.default is dataclasses.MISSING:
        return "required"
    return f'`"{field.default}"`' if isinstance(field.default, str) else f"`{field.default}`"


def _range(meta) -> str:
    if meta["choices"]:
        return ", ".join(map(str, meta["choices"]))
    return f"{meta['ge']} to {meta['le']}" if meta["ge"] is not None else ""


def table(cls) -> str:
    rows = ["| input | default | allowed | what it does |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        note = " *(local command line only)*" if not field.metadata["cog"] else ""
        rows.append(f"| `{field.name}` | {_default(field)} | {_range(field.metadata)} | "
                    f"{field.metadata['help']}{note} |")
    return "\n".join(rows)


def render(text: str) -> str:
    for marker, cls in TABLES.items():
        pattern = re.compile(rf"(<!-- {marker} -->\n)(?:.*?\n)?(<!-- /{marker} -->)", re.S)
        text = pattern.sub(lambda m, cls=cls: m.group(1) + table(cls) + "\n" + m.group(2), text)
    return text


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The input tables of README.md, from the settings.")
    parser.add_argument("--write", action="store_true", help="rewrite them in README.md (default: print them)")
    if parser.parse_args().write:
        README.write_text(render(README.read_text()))
    else:
        print("\n\n".join(table(cls) for cls in TABLES.values()))
