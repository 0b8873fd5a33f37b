"""config.json and generation_config.json for the converted model."""

import json
from pathlib import Path

import torch

from . import tokenizer as tok
from .params import (
    DEFAULT_ROPE_THETA,
    MAX_POSITIONS,
    ROPE_SCALING,
    ROPE_SCALING_FACTOR,
    MetaParams,
)


def hf_config(params: MetaParams, version: str, vocab: int, tied: bool, dtype: torch.dtype,
              tokenizer: tok.ConvertedTokenizer):
    from transformers import LlamaConfig

    theta = params.rope_theta if params.rope_theta is not None else DEFAULT_ROPE_THETA[version]
    rope = {"rope_type": "default", "rope_theta": theta}
    if version in ROPE_SCALING_FACTOR:
        factor = params.rope_scaling_factor or ROPE_SCALING_FACTOR[version]
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, **ROPE_SCALING}
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=params.dim, intermediate_size=params.ffn_dim,
        num_hidden_layers=params.n_layers, num_attention_heads=params.n_heads,
        num_key_value_heads=params.n_kv_heads, head_dim=params.head_dim, rms_norm_eps=params.norm_eps,
        max_position_embeddings=MAX_POSITIONS[version], rope_parameters=rope, tie_word_embeddings=tied,
        bos_token_id=tokenizer.token_id(tokenizer.bos_token), eos_token_id=tokenizer.token_id(tokenizer.eos_token),
        dtype=str(dtype).removeprefix("torch."),
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def stop_token_ids(tokenizer: tok.ConvertedTokenizer) -> int | list[int]:
    """What Meta's generate() stops on: end of text, plus end of turn/message in LLaMA 3.x."""
    names = [tokenizer.eos_token, "<|eom_id|>", "<|eot_id|>"] if tokenizer.kind == tok.TIKTOKEN else [tokenizer.eos_token]
    ids = [i for i in (tokenizer.token_id(n) for n in names) if i is not None]
    return ids[0] if len(ids) == 1 else ids


def write_configs(out_dir: Path, params: MetaParams, version: str, vocab: int, tied: bool, dtype: torch.dtype,
                  tokenizer: tok.ConvertedTokenizer) -> None:
    from transformers import GenerationConfig

    config = hf_config(params, version, vocab, tied, dtype, tokenizer)
    config.save_pretrained(out_dir)
    # Readers older than transformers 5 (vLLM, llama.cpp's converter) look for these two keys.
    path = out_dir / "config.json"
    data = json.loads(path.read_text())
    data["rope_theta"] = config.rope_parameters["rope_theta"]
    scaling = {k: v for k, v in config.rope_parameters.items() if k != "rope_theta"}
    data["rope_scaling"] = scaling if scaling["rope_type"] != "default" else None
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=stop_token_ids(tokenizer)).save_pretrained(out_dir)
    tok.save_tokenizer(tokenizer, out_dir, MAX_POSITIONS[version])
