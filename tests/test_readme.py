"""The README's input tables are generated from the settings: a stale README fails here."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import settings_table  # noqa: E402


def test_readme_tables_match_the_settings():
    text = settings_table.README.read_text()
    assert settings_table.render(text) == text, "run: python scripts/settings_table.py --write"
    assert "| `lora_target_modules` |" in text and "| `stop_sequences` |" in text


def test_readme_names_the_commands():
    text = settings_table.README.read_text()
    for command in ("make demo", "make test", "cog train -i train_data=@", "cog predict -i prompt=",
                    "convert_weights.py", "cog push"):
        assert command in text
