"""--format gguf and gguf-lora: llama.cpp's files, written with the gguf library.

gguf: the merged model as a complete "llama" GGUF. Hyper-parameters from config.json, the
tokenizer (gguf_vocab.py), LLaMA 3.1/3.2 rope scaling as llama.cpp reads it (a rope_freqs tensor
of per-frequency factors, computed by transformers' own llama3 rope function), q/k rows in
Meta's interleaved rotary order, which llama.cpp's llama expects. Norms and other 1-D tensors stay
f32 at every --outtype; with q8_0 a matrix whose rows do not split into 32-value blocks is written f16.
The header is written first from the planned shapes, then tensors one at a time, so memory holds
one tensor.

gguf-lora: the adapter alone (llama.cpp --lora, Ollama ADAPTER), lora_a [r, in] and lora_b
[out, r] per module in f32. llama.cpp scales by adapter.lora.alpha / r; an adapter with one
scale for every module is written as it is, one with rslora or per-module ranks/alphas has each
module's scale folded into its lora_b and alpha 0 (which llama.cpp reads as "scale 1").
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..adapter_check import rank_of, scaling_of, split_key
from ..adapter_files import ADAPTER_WEIGHTS
from . import ExportError
from .gguf_vocab import add_vocab
from .hf import progress_bar
from .llama_config import LlamaShape
from .merge import MergedModel
from .meta import unpermute_rotary

# q4_0 is not offered: on the embedded SmolLM2 its logits were NMSE 0.088 from transformers' with the
# top-1 token changed (q8_0: 0.0006, same top-1), too far to call the same model
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _gguf():
    import gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines repeat what the export logs
    return gguf


def gguf_name(name: str, layers: int) -> str:
    gguf = _gguf()
    mapped = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers).get_name(name.removesuffix(".weight"))
    if mapped is None:
        raise ExportError(f"--format gguf: no llama.cpp tensor for {name}")
    return mapped + ".weight"


def to_llama_cpp_order(name: str, tensor: torch.Tensor, shape: LlamaShape) -> torch.Tensor:
    if name.endswith("self_attn.q_proj.weight"):
        return unpermute_rotary(tensor, shape.heads)
    if name.endswith("self_attn.k_proj.weight"):
        return unpermute_rotary(tensor, shape.kv_heads)
    return tensor


def tensor_type(name: str, dims: tuple[int, ...], outtype: str):
    qtype = _gguf().GGMLQuantizationType
    if len(dims) < 2 or outtype == "f32":
        return qtype.F32
    if outtype in ("f16", "bf16"):
        return qtype.F16 if outtype == "f16" else qtype.BF16
    if dims[-1] % 32:
        return qtype.F16
    return qtype.Q8_0


def encode(array: np.ndarray, qtype) -> np.ndarray:
    gguf = _gguf()
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def nbytes(dims: tuple[int, ...], qtype) -> int:
    block, size = _gguf().GGML_QUANT_SIZES[qtype]
    return math.prod(dims) // block * size


def llama3_rope_factors(base_dir: Path) -> torch.Tensor:
    """The factor llama.cpp divides each rotary frequency by: transformers' unscaled frequencies
    over its llama3-scaled ones."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(str(base_dir))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config, device="cpu")
    return (plain / scaled).float()


def add_hparams(writer, shape: LlamaShape, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.norm_eps)
    writer.add_vocab_size(shape.vocab)


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(model: MergedModel, shape: LlamaShape, path: Path, outtype: str, name: str,
               progress: bool = True) -> str:
    """The merged model as one GGUF file; returns a description of its tokenizer for the log."""
    gguf = _gguf()
    writer = gguf.GGUFWriter(str(path), "llama")
    add_hparams(writer, shape, name)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[outtype]))
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer = add_vocab(writer, model.source.base_dir, shape.vocab, _adds_bos(model.source.base_dir))
    extra = {}
    if shape.rope_scaling is not None:
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(model.source.base_dir)
    plan = {}
    for tensor_name in model.names():
        dims = model.shape(tensor_name)
        plan[tensor_name] = tensor_type(tensor_name, dims, outtype)
        writer.add_tensor_info(gguf_name(tensor_name, shape.layers), dims, np.float32,
                               nbytes(dims, plan[tensor_name]), raw_dtype=plan[tensor_name])
    for extra_name, tensor in extra.items():
        writer.add_tensor_info(extra_name, tuple(tensor.shape), np.float32, tensor.numel() * 4,
                               raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(nbytes(model.shape(n), q) for n, q in plan.items())
    with progress_bar(total, f"gguf {outtype}", progress) as bar:
        for tensor_name, tensor in model.tensors(torch.float32):
            bar.set_postfix_str(tensor_name.removeprefix("model."), refresh=False)
            array = to_llama_cpp_order(tensor_name, tensor, shape).contiguous().numpy()
            writer.write_tensor_data(encode(array, plan[tensor_name]))
            bar.update(nbytes(model.shape(tensor_name), plan[tensor_name]))
    for tensor in extra.values():
        writer.write_tensor_data(tensor.numpy())
    writer.close()
    model.check_changed()
    return tokenizer


def _adds_bos(base_dir: Path) -> bool:
    from ..base_model import load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def lora_tensors(source, shape: LlamaShape):
    """(llama.cpp name, tensor) of every lora_a / lora_b, and the alpha to record."""
    from safetensors.torch import load_file

    config, label = source.adapter_config, source.adapter.label
    for feature, why in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save")):
        if config.get(feature):
            raise ExportError(f"{label}: {why} cannot be expressed as a GGUF LoRA; use --format gguf, which "
                              f"merges it")
    tensors = load_file(str(source.adapter.root / ADAPTER_WEIGHTS))
    modules = sorted({split_key(key)[0] for key in tensors})
    for key in tensors:
        module, suffix = split_key(key)
        if suffix not in (".lora_A.weight", ".lora_B.weight"):
            raise ExportError(f"{label}: {key} ({suffix or 'a whole parameter'}) cannot be expressed as a GGUF "
                              f"LoRA on a Linear layer; use --format gguf, which merges it")
    scales = {scaling_of(m, config) for m in modules}
    ranks = {rank_of(m, config) for m in modules}
    uniform = len(scales) == 1 and len(ranks) == 1
    alpha = scales.pop() * ranks.pop() if uniform else 0.0
    out = []
    for module in modules:
        prefix = "base_model.model." + module
        down = tensors[prefix + ".lora_A.weight"].float()
        up = tensors[prefix + ".lora_B.weight"].float() * (1.0 if uniform else scaling_of(module, config))
        name = gguf_name(module + ".weight", shape.layers)
        out.append((name + ".lora_a", down))
        out.append((name + ".lora_b", to_llama_cpp_order(module + ".weight", up, shape)))
    return out, alpha


def write_gguf_lora(source, shape: LlamaShape, path: Path, name: str) -> None:
    gguf = _gguf()
    tensors, alpha = lora_tensors(source, shape)
    if not any(bool(t.any()) for n, t in tensors if n.endswith(".lora_b")):
        raise ExportError(f"{source.adapter.label}: every lora_B is zero (an untrained adapter?); nothing written")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    for tensor_name, tensor in tensors:
        writer.add_tensor(tensor_name, tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
