"""The docs tell the truth about the commands: generated tables are current, and every command they
show names a program, make target and flags that exist."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import settings_table  # noqa: E402

DOCS = [ROOT / "README.md", ROOT / "DEVELOPERS.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
# `python[3] program.py --flags ...` (after `.venv/bin/`, `cog exec ` or an environment assignment)
COMMAND = re.compile(r"python3?\s+((?:scripts/)?[\w-]+\.py)((?:[ \t]+(?:\\\n\s*)?[^\s`|#)]+)*)")


def _commands() -> dict[str, set[str]]:
    """Program -> every --flag the docs pass it."""
    found: dict[str, set[str]] = {}
    for doc in DOCS:
        for program, rest in COMMAND.findall(doc.read_text()):
            found.setdefault(program, set()).update(re.findall(r"(?<![\w-])--[a-z][\w-]*", rest))
    return found


def test_readme_tables_match_the_settings():
    text = settings_table.README.read_text()
    assert settings_table.render(text) == text, "run: python scripts/settings_table.py --write"


def test_the_docs_show_the_entry_points_and_benchmarks():
    commands = _commands()
    assert {"train.py", "predict.py", "convert_weights.py", "scripts/bench_train.py",
            "scripts/bench_generate.py"} <= set(commands)  # the parser below really finds commands


@pytest.mark.parametrize("program", sorted(_commands()))
def test_every_flag_the_docs_pass_exists(program):
    path = ROOT / program
    assert path.is_file(), f"the docs run {program}, which does not exist"
    flags = _commands()[program]
    if not flags:
        return
    shown = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, cwd=ROOT,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    missing = [flag for flag in sorted(flags) if not re.search(rf"{re.escape(flag)}(?![\w-])", shown.stdout)]
    assert not missing, f"{program} has no {', '.join(missing)} (the docs use them)"


def test_every_make_target_the_docs_name_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    named = {target for doc in DOCS for target in re.findall(r"`make ([\w-]+)", doc.read_text())}
    named |= {target for doc in DOCS for target in re.findall(r"^\s+make ([\w-]+)", doc.read_text(), flags=re.M)}
    assert named and not named - targets, f"not in the Makefile: {sorted(named - targets)}"


PATH_NAMED = re.compile(r"(?<![\w/.])((?:alpaca_tune|tests|scripts|docs)/[\w/.-]*\w)")


def test_every_path_the_docs_and_docstrings_name_exists():
    sources = DOCS + [p for folder in ("alpaca_tune", "scripts", "tests") for p in (ROOT / folder).rglob("*.py")]
    missing = set()
    for source in sources:
        for path in PATH_NAMED.findall(source.read_text()):
            if not (ROOT / path).exists() and not (ROOT / path.rstrip(".")).exists():
                missing.add(f"{source.relative_to(ROOT)}: {path}")
    assert not missing, "\n".join(sorted(missing))
