"""Meta's LLaMA checkpoints (1, 2, 3, 3.1, 3.2) -> a Hugging Face Llama model folder.

    params.py             params.json and the LLaMA version (given or detected)
    meta_files.py         finding and memory-mapping Meta's files
    checks.py             every shard's keys and shapes, before anything is written
    state_dict.py         the pure tensor mapping (shards merged, rotary rows reordered)
    hf_config.py          config.json and generation_config.json
    tokenizer.py          tokenizer.model (SentencePiece or tiktoken) -> tokenizer.json
    safetensors_writer.py sharded safetensors written tensor by tensor
    convert.py            the whole conversion, one layer at a time, into a staging folder
"""

from ..errors import UserError


class ConversionError(UserError):
    """Input that cannot be converted; the message names the file and what is wrong."""
