"""The base model's tokenizer for serving, through the `tokenizers` library alone.

tokenizer.json holds the whole pipeline (normaliser, pre-tokeniser, model, BOS post-processor,
decoder), so the Rust library gives transformers' ids without importing transformers, whose
AutoTokenizer costs ~2.4 s of start-up (BENCHMARKS.md). tests/serving/lean/test_llama.py compares ids and
decoded text with AutoTokenizer for each kind of tokenizer the project produces.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def can_serve(base_dir: Path) -> bool:
    """tokenizer.json is there and no transformers-only decoding rule is switched on."""
    config_path = Path(base_dir) / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # let transformers report what is wrong with it
    return (Path(base_dir) / "tokenizer.json").exists() and not config.get("clean_up_tokenization_spaces")


class ServingTokenizer:
    def __init__(self, base_dir: Path):
        from tokenizers import Tokenizer

        path = Path(base_dir) / "tokenizer.json"
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
            config_path = Path(base_dir) / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.exists() else {}
        except Exception as err:  # tokenizers raises its own Exception subclass for a bad file
            raise UserError(f"{path}: cannot load the tokenizer: {err}") from None
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_token_id = self._tokenizer.token_to_id(eos) if eos else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        """transformers' calling convention, so encode_prompt works with either tokenizer."""
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
