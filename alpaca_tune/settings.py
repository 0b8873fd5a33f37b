"""Every user-facing setting, defined once.

`TrainSettings` and `GenerateSettings` are the single source of truth for names, types,
defaults, descriptions and allowed ranges. The Cog entry points (train.py, predict.py) build
their `Input(...)`s from these fields and the local command line builds its argparse flags from
them, so `cog train -i lora_rank=16` and `python train.py --lora_rank 16` mean the same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


class SettingsError(UserError):
    """A setting has a value outside what it allows; the message names the setting."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, ge=None, le=None, choices=None,
           min_length=None, cog: bool = True, separated_choices=None):
    """A dataclass field with the metadata the Cog Inputs and the CLI are built from.

    cog=False marks a local-only setting (e.g. an output directory) that has no Cog Input;
    separated_choices: a comma-separated list whose every item must be one of these.
    """
    meta = {"help": help, "ge": ge, "le": le, "choices": choices, "min_length": min_length, "cog": cog,
            "separated_choices": separated_choices}
    return field(default=default, metadata=meta)


# what scripts/export.py writes (alpaca_tune/export/); train.py's export_formats picks among them
EXPORT_FORMATS = ("hf", "meta", "gguf", "gguf-lora", "ollama")


@dataclass
class TrainSettings:
    train_data: str = option(help="Training data: a JSON array or JSONL file of {instruction, input, "
                                  "output} records (Alpaca format) or {prompt, completion} records.")
    num_train_epochs: float = option(3.0, "Passes over the training data (ignored when max_steps > 0).",
                                     ge=0.01, le=1000)
    max_steps: int = option(-1, "Optimizer steps to train for; -1 (or 0) trains for num_train_epochs instead.",
                            ge=-1, le=1_000_000)
    learning_rate: float = option(3e-4, "Peak learning rate of AdamW.", ge=1e-7, le=1.0)
    lr_scheduler: str = option("linear", "Learning-rate schedule after warmup.",
                               choices=["linear", "cosine", "constant"])
    warmup_steps: int = option(10, "Steps of linear learning-rate warmup from 0 (at most the run's steps minus one).",
                               ge=0, le=100_000)
    warmup_ratio: float = option(0.0, "Warmup as a fraction of the run's steps; when > 0 it replaces "
                                      "warmup_steps.", ge=0.0, le=1.0)
    weight_decay: float = option(0.0, "AdamW weight decay.", ge=0.0, le=1.0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables clipping).", ge=0.0, le=1000.0)
    train_batch_size: int = option(4, "Micro-batch: examples per forward/backward pass.", ge=1, le=1024)
    gradient_accumulation_steps: int = option(
        4, "Micro-batches per optimizer step (effective batch = train_batch_size x this).", ge=1, le=1024)
    cutoff_len: int = option(512, "Maximum tokens per example (prompt + response); longer ones are "
                                  "truncated and counted in the log.", ge=8, le=32768)
    val_set_size: float = option(0.05, "Held-out validation records: a fraction of the data if < 1, "
                                       "a number of records if >= 1, 0 for none.", ge=0.0, le=1_000_000)
    lora_rank: int = option(8, "LoRA rank r.", ge=1, le=1024)
    lora_alpha: int = option(16, "LoRA alpha (the update is scaled by alpha / r).", ge=1, le=4096)
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.", ge=0.0, le=0.9)
    lora_target_modules: str = option(
        "q_proj,v_proj", "Comma-separated module names to adapt, or 'all-linear' for every linear "
                         "layer but the output head.")
    train_on_inputs: bool = option(False, "Also train on the prompt tokens (by default only the "
                                          "response is learned; the prompt is masked out).")
    prompt_template: str = option("alpaca", "Prompt template: 'alpaca', 'alpaca_short', 'none' (raw "
                                            "text), a template in $ALPACA_TUNE_TEMPLATE_DIR, or the template "
                                            "itself as JSON: {\"prompt_input\": ..., \"prompt_no_input\": ..., "
                                            "\"response_split\": ...}.")
    precision: str = option("auto", "Precision of the frozen base model: auto (bf16 where the hardware "
                                    "has fast bf16, else fp32), bf16 or fp32. LoRA weights stay fp32.",
                            choices=["auto", "bf16", "fp32"])
    packing: bool = option(False, "Pack each micro-batch into one padding-free row (examples isolated "
                                  "by a block-diagonal mask); off: pad to the micro-batch's longest.")
    group_by_length: bool = option(True, "Put examples of similar length in the same micro-batch "
                                         "(less padding; order is still shuffled per epoch).")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    torch_compile: bool = option(True, "On a GPU, compile the decoder layers with torch.compile (7B bf16 "
                                       "LoRA steps ~1.4x faster; the first steps wait for compilation). "
                                       "Not used on CPU or with an 8/4-bit base.")
    quantization: str = option("none", "Load the frozen base in 8-bit or 4-bit (QLoRA) with "
                                       "bitsandbytes; CUDA only.", choices=["none", "8bit", "4bit"])
    logging_steps: int = option(5, "Log step, loss, lr, tokens/s and ETA every N optimizer steps.",
                                ge=1, le=100_000)
    eval_steps: int = option(0, "Evaluate every N optimizer steps (0: only at the end).", ge=0,
                             le=1_000_000)
    save_steps: int = option(0, "Write a resumable checkpoint every N optimizer steps (0: none).",
                             ge=0, le=1_000_000)
    seed: int = option(42, "Random seed: data split, shuffling, LoRA init and dropout.", ge=0,
                       le=2**31 - 1)
    finetune_method: str = option("lora", "lora: train a LoRA adapter (the archive holds it); full: train every "
                                          "weight of the base in fp32 (Stanford Alpaca's recipe; the archive holds "
                                          "the whole model, which predict.py serves in place of the base).",
                                  choices=["lora", "full"])
    preset: str = option("", "A named recipe for the inputs left at their defaults: 'stanford_alpaca' (full "
                             "fine-tuning, lr 2e-5, 3 epochs, cutoff 512, 128 examples per step, weight decay 0, "
                             "warmup ratio 0.03, cosine, sharding fsdp). Empty: none.", choices=["", "stanford_alpaca"])
    sharding: str = option("none", "With several processes: 'fsdp' shards each decoder layer's weights (the "
                                   "frozen base's and LoRA's, or all in full fine-tuning) over them with PyTorch's FSDP2, for bases that do not "
                                   "fit one device; 'none': every process holds the whole base.",
                           choices=["none", "fsdp"])
    num_devices: int = option(0, "Processes to train on, one per GPU, each taking an equal share of every "
                                 "step (0: every visible GPU; one process on a CPU). More than one starts "
                                 "them with torchrun.", ge=0, le=4096)
    export_formats: str = option("", "Comma-separated formats exported into the archive's export/ folder after "
                                     "training, e.g. 'gguf-lora,hf' (hf, meta, gguf, gguf-lora, ollama; as "
                                     "scripts/export.py writes them, gguf in f16). Empty: none.",
                                 separated_choices=EXPORT_FORMATS)
    # Local-only settings: Cog runs put outputs in a temp dir and the base in weights/.
    output_dir: str = option("outputs/run", "Where the adapter archive, checkpoints, metrics and "
                                            "loss plot are written.", cog=False)
    base_model: str = option("", "Base model directory (default: weights/, or the embedded "
                                 "SmolLM2 when weights/ holds no model).", cog=False)
    resume_from_checkpoint: str = option("", "Checkpoint directory to continue from (its step, "
                                             "optimizer and scheduler state).", cog=False)
    prompt_template_file: str = option("", "A template JSON file to use instead of prompt_template.",
                                       cog=False)


@dataclass
class GenerateSettings:
    prompt: str = option(help="The instruction to answer.", min_length=1)
    input: str = option("", "Optional input/context for the instruction (Alpaca's 'input').")
    max_new_tokens: int = option(256, "Maximum tokens to generate.", ge=1, le=8192)
    temperature: float = option(0.7, "Sampling temperature; 0 means greedy decoding.", ge=0.0, le=5.0)
    top_p: float = option(0.9, "Nucleus sampling: keep the smallest set of tokens whose probability "
                               "sums to top_p.", ge=0.01, le=1.0)
    top_k: int = option(40, "Sample only among the k most likely tokens (0 disables).", ge=0, le=100_000)
    repetition_penalty: float = option(1.0, "Penalty for tokens already present (1.0: none).",
                                       ge=0.01, le=10.0)
    stop_sequences: str = option("", "Comma-separated strings that end the answer (not included).")
    seed: int = option(-1, "Random seed for sampling (-1: a random seed).", ge=-1, le=2**31 - 1)
    prompt_template: str = option("auto", "Prompt template: 'auto' (the one the adapter was trained "
                                          "with, else 'alpaca'), 'alpaca', 'alpaca_short', 'none', a "
                                          "template in $ALPACA_TUNE_TEMPLATE_DIR, or the template itself as "
                                          "JSON: {\"prompt_input\": ..., \"prompt_no_input\": ..., "
                                          "\"response_split\": ...}.")
    lora_weights: str = option("", "An adapter for this request alone: an http(s) URL or a data: URI of an "
                                   "adapter archive from train.py, or the name of one in the server's "
                                   "$ALPACA_TUNE_ADAPTER_DIR. Empty: the server's own adapter (COG_WEIGHTS), "
                                   "or the base alone.")
    # Local-only: the command line's; no HTTP input reaches a server path.
    prompt_template_file: str = option("", "A template JSON file to use instead of prompt_template.",
                                       cog=False)


def default_of(cls, name: str):
    """The default of setting `name` of a settings dataclass."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def fields_of(cls, cog_only: bool = False) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cog", True) or not cog_only]


def validate(settings) -> None:
    """Raise SettingsError naming the first setting that is out of range or not allowed."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        meta = f.metadata
        required = f.default is dataclasses.MISSING
        if value is None or value is dataclasses.MISSING or (required and value == ""):
            raise SettingsError(f"{f.name}: a value is required")
        if meta.get("ge") is not None and value < meta["ge"]:
            raise SettingsError(f"{f.name}={value!r}: must be >= {meta['ge']}")
        if meta.get("le") is not None and value > meta["le"]:
            raise SettingsError(f"{f.name}={value!r}: must be <= {meta['le']}")
        if meta.get("min_length") and len(value) < meta["min_length"]:
            raise SettingsError(f"{f.name}: must be at least {meta['min_length']} character(s) long")
        if isinstance(value, str) and not _is_unicode(value):
            raise SettingsError(f"{f.name}: holds an unpaired surrogate (e.g. \\ud800), which is not "
                                f"Unicode text; send the text as UTF-8")
        if meta.get("choices") and value not in meta["choices"]:
            raise SettingsError(f"{f.name}={value!r}: must be one of {', '.join(map(str, meta['choices']))}")
        if meta.get("separated_choices"):
            if unknown := [item for item in value.split(",") if item.strip() not in meta["separated_choices"]
                           and item.strip()]:
                raise SettingsError(f"{f.name}={value!r}: {', '.join(u.strip() for u in unknown)} unknown; each "
                                    f"must be one of {', '.join(meta['separated_choices'])}")


def _is_unicode(text: str) -> bool:
    """False for a str holding a lone surrogate (JSON's "\\ud800" parses to one; no tokenizer takes it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser(cls, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one --flag per field: same names, types and defaults as Cog's."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = {"bool": _parse_bool, "int": int, "float": float}.get(str(f.type), str)
        required = f.default is dataclasses.MISSING
        parser.add_argument(f"--{f.name}", type=kind, required=required, help=f.metadata["help"],
                            choices=f.metadata.get("choices"),
                            default=None if required else f.default)
    return parser


# Stanford Alpaca's train.py command (README of tatsu-lab/stanford_alpaca): full fine-tuning, bf16,
# 3 epochs, per-device batch 4 x 8 accumulation on 4 GPUs = 128, lr 2e-5, weight decay 0, warmup
# ratio 0.03, cosine, max length 512. The step keeps 128 examples whatever the process count.
PRESETS = {"stanford_alpaca": {"finetune_method": "full", "learning_rate": 2e-5, "num_train_epochs": 3.0,
                               "cutoff_len": 512, "weight_decay": 0.0, "warmup_ratio": 0.03, "lr_scheduler": "cosine",
                               "train_batch_size": 4, "examples_per_step": 128,
                               "sharding": "fsdp"}}  # their --fsdp "full_shard auto_wrap" (no-op on 1 process)


def apply_preset(settings, processes: int = 1):
    """The settings with the preset's values in every setting still at its default (what the user
    set stays); its examples_per_step becomes the accumulation for this many processes."""
    if not getattr(settings, "preset", ""):
        return settings
    values = dict(PRESETS[settings.preset])
    per_step = values.pop("examples_per_step")
    values["gradient_accumulation_steps"] = max(1, per_step // (values["train_batch_size"] * processes))
    changes = {name: value for name, value in values.items()
               if getattr(settings, name) == default_of(type(settings), name)}
    return dataclasses.replace(settings, **changes)


def to_args(settings) -> list[str]:
    """The command line that parse_args turns back into these settings."""
    args = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        args += [f"--{f.name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def parse_args(cls, argv: list[str] | None, description: str):
    """Parse a command line into a validated settings object; exits 2 with a message on error."""
    parser = build_parser(cls, description)
    settings = cls(**vars(parser.parse_args(argv)))
    try:
        validate(settings)
    except SettingsError as err:
        parser.error(str(err))
    return settings
