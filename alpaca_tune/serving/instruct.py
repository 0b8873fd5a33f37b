"""A base model plus (optionally) a trained adapter, ready to answer instructions.

This is what Predictor.setup builds once and predict() calls per request. The adapter is merged
into the base weights after loading: same outputs (tested), no per-token LoRA cost. On CPU a
Llama is served by lean/llama.py, which needs neither transformers nor PEFT (seconds faster to
start, faster to decode); anything else goes through transformers (transformers_decoder.py).
Both are Decoders (decoder.py), which is all generation.py sees.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..adapter_check import check_adapter, read_adapter_config
from ..base_model import load_tokenizer, resolve_base_dir, weight_shapes
from ..data.prompts import (
    PromptTemplate,
    load_template,
    template_for,
    template_from_json,
)
from ..data.tokenization import encode_prompt
from ..device import pick_device
from ..settings import GenerateSettings, SettingsError, validate
from .adapters import AdapterCache
from .decoder import Decoder
from .generation import parse_stop_sequences, stream_text
from .lean.llama import LeanLlama, read_config, unsupported_reason
from .lean.lora_merge import unmergeable_reason
from .limits import Limits
from .sampling import SamplingParams
from .scheduler import Scheduler, Stream
from .threads import on_a_thread_of_its_own
from .tokenizer import ServingTokenizer, can_serve
from .transformers_decoder import TransformersDecoder
from .weights import WeightsError, fetch_weights, read_training_config

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
    def __init__(self, decoder: Decoder, tokenizer, trained_template: PromptTemplate | None,
                 limits: Limits | None = None, base_shapes: dict | None = None):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.trained_template = trained_template
        self.limits = limits or Limits.from_env()
        # per-request adapters (lora_weights), where the decoder applies them unmerged
        self.adapters = AdapterCache(decoder, base_shapes, self.limits) \
            if base_shapes is not None and hasattr(decoder, "request_adapter") else None

    @classmethod
    def load(cls, weights: str | None = None, base_model: str = "", merge: bool = True) -> InstructModel:
        """Base model (+ adapter from an archive, a directory or an http(s) URL when weights is set).
        Loaded on a thread that ends when it is done, so that the caller's thread (coglet's main
        thread, at setup) keeps no OpenMP threads that would slow the scheduler's (threads.py)."""
        return on_a_thread_of_its_own(cls._load, weights, base_model, merge)

    @classmethod
    def _load(cls, weights: str | None, base_model: str, merge: bool) -> InstructModel:
        limits = Limits.from_env()  # read once, at setup
        if not weights:
            base_dir = resolve_base_dir(base_model)
            return cls(cls._load_model(base_dir, None, merge), cls._tokenizer(base_dir), None, limits,
                       weight_shapes(base_dir))
        # the unpacked files are only needed until the weights are in memory
        with tempfile.TemporaryDirectory(prefix="adapter-") as workdir:
            adapter = fetch_weights(str(weights), Path(workdir), limits)
            recorded = read_training_config(adapter).get("prompt_template")
            template = template_from_json(recorded, f"{adapter.label}: training_config.json") if recorded else None
            if adapter.full_model:  # finetune_method=full: the trained model replaces the base (not read)
                log.info("serving the fully fine-tuned model in %s in place of the base", adapter.label)
                shapes = weight_shapes(adapter.root)
                return cls(cls._load_model(adapter.root, None, merge), cls._tokenizer(adapter.root), template,
                           limits, shapes)
            base_dir = resolve_base_dir(base_model)
            shapes = weight_shapes(base_dir)
            check_adapter(adapter.root, shapes, adapter.label)
            model = cls._load_model(base_dir, adapter.root, merge, adapter.label)
            tokenizer = cls._tokenizer(base_dir)
        log.info("adapter loaded from %s (%s)", adapter.label, "merged" if merge else "unmerged")
        return cls(model, tokenizer, template, limits, shapes)

    @staticmethod
    def _load_model(base_dir: Path, adapter_dir: Path | None, merge: bool, label: str | None = None) -> Decoder:
        """LeanLlama on CPU when it can run the model (faster start and decoding), else transformers."""
        reason = lean_unsupported_reason(base_dir, adapter_dir, merge)
        if reason is None:
            log.info("loading %s for CPU serving (lean Llama path)", base_dir)
            return LeanLlama.load(base_dir, adapter_dir)
        log.info("serving through transformers: %s", reason)
        return TransformersDecoder.load(base_dir, adapter_dir, merge, label)

    @staticmethod
    def _tokenizer(base_dir: Path):
        # older HF conversions ship only SentencePiece's tokenizer.model, some ask for transformers'
        # clean-up of spaces when decoding: transformers handles those
        return ServingTokenizer(base_dir) if can_serve(base_dir) else load_tokenizer(base_dir)

    def template_for(self, settings: GenerateSettings) -> PromptTemplate:
        if settings.prompt_template == "auto" and not settings.prompt_template_file:
            return self.trained_template or load_template("alpaca")
        return template_for(settings)

    def prompt_ids(self, settings: GenerateSettings) -> list[int]:
        template = self.template_for(settings)
        return encode_prompt(self.tokenizer, template.render(settings.prompt, settings.input))

    def shared_prefix(self, settings: GenerateSettings, prompt_ids: list[int]) -> int:
        """How many of the prompt's first ids are its template's head (the text before the
        instruction, which every request with this template shares), less the head's last id,
        which may merge with the instruction's first characters; 0 when the ids do not start so."""
        head = encode_prompt(self.tokenizer, self.template_for(settings).head(settings.input))
        count = len(head) - 1
        return count if 0 < count < len(prompt_ids) and prompt_ids[:count] == head[:count] else 0

    def request(self, settings: GenerateSettings) -> tuple[list[int], SamplingParams, list[str], object, int]:
        """(prompt ids, sampling parameters, stop sequences, its own adapter or None, the length of
        its shared head) of a request; a prompt too long for the model, or an adapter that cannot
        be used, is refused before anything runs."""
        validate(settings)
        adapter = None
        if settings.lora_weights:
            if self.adapters is None:
                raise WeightsError("lora_weights: this server cannot apply an adapter per request; serve the "
                                   "adapter as COG_WEIGHTS")
            adapter = self.adapters.get(settings.lora_weights)
        prompt_ids = self.prompt_ids(settings)
        context = self.decoder.context_length
        room = context - len(prompt_ids)
        if room < 1:
            raise SettingsError(f"prompt (with input and template) is {len(prompt_ids)} tokens; the model reads at "
                                f"most {context}: shorten it")
        # the answer ends where the model's context does, as transformers' generate would end it
        params = SamplingParams.from_settings(settings, max_new_tokens=min(settings.max_new_tokens, room))
        return (prompt_ids, params, parse_stop_sequences(settings.stop_sequences), adapter,
                self.shared_prefix(settings, prompt_ids))

    def stream(self, settings: GenerateSettings) -> Iterator[str]:
        """Chunks of the answer, decoded here alone (the command line's way)."""
        prompt_ids, params, stops, adapter, shared = self.request(settings)
        return stream_text(self.decoder, self.tokenizer, prompt_ids, params, stops, self.limits.max_predict_seconds,
                           adapter, shared)

    def batching(self, max_batch: int) -> Scheduler:
        """A scheduler that serves up to `max_batch` requests at once, batched (scheduler.py)."""
        budget = self.limits.kv_budget_tokens or default_kv_budget(self.decoder, max_batch)
        log.info("batching up to %d requests, KV-cache budget %d positions", max_batch, budget)
        return Scheduler(self.decoder, self.tokenizer, max_batch, budget, self.limits.max_predict_seconds,
                         self.limits.load_log_seconds)

    def submit(self, scheduler: Scheduler, settings: GenerateSettings) -> Stream:
        """Queue a request with the scheduler; its answer arrives on the returned Stream."""
        return scheduler.submit(*self.request(settings))


def default_kv_budget(decoder: Decoder, max_batch: int) -> int:
    """Room for every slot to hold a full context, but at most a quarter of the memory available
    now (the GPU's, for a model on one) where the decoder says what a position takes."""
    wanted = max_batch * decoder.context_length
    per_position = getattr(decoder, "kv_bytes_per_position", None)
    if per_position:
        if decoder.device.type == "cuda":
            import torch

            available = torch.cuda.mem_get_info(decoder.device)[0]
        else:
            import psutil

            available = psutil.virtual_memory().available
        wanted = min(wanted, available // 4 // per_position)
    return max(wanted, 1)
