"""A base model plus (optionally) a trained adapter, ready to answer instructions.

This is what Predictor.setup builds once and predict() calls per request. The adapter is merged
into the base weights after loading: same outputs (tested), no per-token LoRA cost.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .artifacts import fetch_weights, read_training_config
from .cpu_layout import use_input_major_linears
from .generation import SamplingParams, parse_stop_sequences, stream_text
from .model import load_adapter, load_base, merge_adapter
from .prompts import PromptTemplate, load_template, template_from_json
from .settings import GenerateSettings, validate
from .tokenization import encode_prompt

log = logging.getLogger(__name__)


class InstructModel:
    def __init__(self, model, tokenizer, trained_template: PromptTemplate | None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.trained_template = trained_template

    @classmethod
    def load(cls, weights: str | None = None, base_model: str = "", merge: bool = True) -> InstructModel:
        """Base model (+ adapter from an archive, a directory or an http(s) URL when weights is set)."""
        model, tokenizer = load_base(base_model)
        model.config.use_cache = True
        if not weights:
            return cls(cls._for_decoding(model), tokenizer, None)
        # the unpacked files are only needed until the weights are in memory
        with tempfile.TemporaryDirectory(prefix="adapter-") as workdir:
            adapter_dir = fetch_weights(str(weights), Path(workdir))
            recorded = read_training_config(adapter_dir).get("prompt_template")
            model = load_adapter(model, adapter_dir)
        if merge:
            model = cls._for_decoding(merge_adapter(model))
        log.info("adapter loaded from %s (%s)", weights, "merged" if merge else "unmerged")
        return cls(model, tokenizer, template_from_json(recorded) if recorded else None)

    @staticmethod
    def _for_decoding(model):
        """A plain (merged) model on CPU gets the faster weight layout for decoding."""
        if model.device.type == "cpu":
            use_input_major_linears(model)
        return model

    def template_for(self, name: str) -> PromptTemplate:
        if name == "auto":
            return self.trained_template or load_template("alpaca")
        return load_template(name)

    def prompt_ids(self, settings: GenerateSettings) -> list[int]:
        template = self.template_for(settings.prompt_template)
        return encode_prompt(self.tokenizer, template.render(settings.prompt, settings.input))

    def stream(self, settings: GenerateSettings) -> Iterator[str]:
        validate(settings)
        params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p, top_k=settings.top_k,
                                repetition_penalty=settings.repetition_penalty,
                                seed=None if settings.seed < 0 else settings.seed)
        return stream_text(self.model, self.tokenizer, self.prompt_ids(settings), params,
                           parse_stop_sequences(settings.stop_sequences))
