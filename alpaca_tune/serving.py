"""A base model plus (optionally) a trained adapter, ready to answer instructions.

This is what Predictor.setup builds once and predict() calls per request. The adapter is merged
into the base weights after loading: same outputs (tested), no per-token LoRA cost. On CPU a
Llama is served by lean_llama.py, which needs neither transformers nor PEFT (seconds faster to
start, about twice as fast to decode); anything else goes through transformers.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .artifacts import fetch_weights, read_training_config
from .base_model import resolve_base_dir
from .generation import parse_stop_sequences, stream_text
from .lean_llama import LeanLlama, read_config, unsupported_reason
from .lora_merge import read_adapter_config, unmergeable_reason
from .model import load_adapter, load_model, load_tokenizer, merge_adapter, pick_device
from .prompts import PromptTemplate, load_template, template_from_json
from .sampling import SamplingParams
from .serving_tokenizer import ServingTokenizer, can_serve
from .settings import GenerateSettings, SettingsError, validate
from .tokenization import encode_prompt

log = logging.getLogger(__name__)


def lean_unsupported_reason(base_dir: Path, adapter_dir: Path | None, merge: bool) -> str | None:
    """Why the model is not served by LeanLlama (None: it is)."""
    if pick_device().type != "cpu":
        return "a GPU is available"
    if not merge and adapter_dir is not None:
        return "the adapter is kept unmerged"
    reason = unsupported_reason(read_config(base_dir))
    if reason is None and adapter_dir is not None:
        reason = unmergeable_reason(read_adapter_config(adapter_dir))
    return reason


class InstructModel:
    def __init__(self, model, tokenizer, trained_template: PromptTemplate | None):
        self.model = model
        self.tokenizer = tokenizer
        self.trained_template = trained_template

    @classmethod
    def load(cls, weights: str | None = None, base_model: str = "", merge: bool = True) -> InstructModel:
        """Base model (+ adapter from an archive, a directory or an http(s) URL when weights is set)."""
        base_dir = resolve_base_dir(base_model)
        if not weights:
            return cls(cls._load_model(base_dir, None, merge), *cls._tokenizer_and_template(base_dir, None))
        # the unpacked files are only needed until the weights are in memory
        with tempfile.TemporaryDirectory(prefix="adapter-") as workdir:
            adapter_dir = fetch_weights(str(weights), Path(workdir))
            model = cls._load_model(base_dir, adapter_dir, merge)
            tokenizer, template = cls._tokenizer_and_template(base_dir, adapter_dir)
        log.info("adapter loaded from %s (%s)", weights, "merged" if merge else "unmerged")
        return cls(model, tokenizer, template)

    @staticmethod
    def _load_model(base_dir: Path, adapter_dir: Path | None, merge: bool):
        """LeanLlama on CPU when it can run the model (faster start and decoding), else transformers."""
        reason = lean_unsupported_reason(base_dir, adapter_dir, merge)
        if reason is None:
            log.info("loading %s for CPU serving (lean Llama path)", base_dir)
            return LeanLlama.load(base_dir, adapter_dir)
        log.info("serving through transformers: %s", reason)
        model = load_model(base_dir)
        model.config.use_cache = True
        if adapter_dir is not None:
            model = load_adapter(model, adapter_dir)
            if merge:
                model = merge_adapter(model)
        return model.eval()

    @staticmethod
    def _tokenizer_and_template(base_dir: Path, adapter_dir: Path | None):
        recorded = read_training_config(adapter_dir).get("prompt_template") if adapter_dir else None
        # older HF conversions ship only SentencePiece's tokenizer.model, some ask for transformers'
        # clean-up of spaces when decoding: transformers handles those
        tokenizer = ServingTokenizer(base_dir) if can_serve(base_dir) else load_tokenizer(base_dir)
        return tokenizer, template_from_json(recorded) if recorded else None

    def template_for(self, name: str) -> PromptTemplate:
        if name == "auto":
            return self.trained_template or load_template("alpaca")
        return load_template(name)

    def prompt_ids(self, settings: GenerateSettings) -> list[int]:
        template = self.template_for(settings.prompt_template)
        return encode_prompt(self.tokenizer, template.render(settings.prompt, settings.input))

    @property
    def context_length(self) -> int:
        if isinstance(self.model, LeanLlama):
            return self.model.max_positions
        return self.model.config.max_position_embeddings

    def stream(self, settings: GenerateSettings) -> Iterator[str]:
        """Chunks of the answer; a prompt too long for the model is refused before anything runs."""
        validate(settings)
        prompt_ids = self.prompt_ids(settings)
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise SettingsError(f"prompt (with input and template) is {len(prompt_ids)} tokens; the model reads at "
                                f"most {self.context_length}: shorten it")
        # the answer ends where the model's context does, as transformers' generate would end it
        params = SamplingParams(max_new_tokens=min(settings.max_new_tokens, room), temperature=settings.temperature,
                                top_p=settings.top_p, top_k=settings.top_k,
                                repetition_penalty=settings.repetition_penalty,
                                seed=None if settings.seed < 0 else settings.seed)
        return stream_text(self.model, self.tokenizer, prompt_ids, params,
                           parse_stop_sequences(settings.stop_sequences))
