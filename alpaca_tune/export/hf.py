"""--format hf: the merged model as a Hugging Face folder.

Safetensors streamed tensor by tensor (sharded with model.safetensors.index.json above
--shard-size), the base's config (dtype and tying updated), generation config, tokenizer files and
chat template copied as they are, and the adapter's training_config.json and prompt template
beside them. The folder loads with AutoModelForCausalLM.from_pretrained, serves as weights/ and is
a base for train.py.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ..adapter_files import CONFIG_FILE
from ..conversion.safetensors_writer import StreamingSafetensors
from .merge import MergedModel
from .source import Source, dump_json

# copied from the base unchanged when present
BASE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json",
              "merges.txt")
TEMPLATE_FILE = "prompt_template.json"


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, file=sys.stderr)


def write_hf(model: MergedModel, out_dir: Path, shard_bytes: int, progress: bool = True) -> list[Path]:
    plan = [(name, model.shape(name), model.output_dtype(name)) for name in model.names()]
    writer = StreamingSafetensors(out_dir, plan, shard_bytes)
    try:
        with progress_bar(writer.total_bytes, "hf", progress) as bar:
            for name, tensor in model.tensors():
                bar.set_postfix_str(name.removeprefix("model."), refresh=False)
                writer.write(name, tensor)
                bar.update(tensor.numel() * tensor.element_size())
        writer.close()
    finally:
        writer.abort()
    model.check_changed()
    write_folder_files(model.source, out_dir, model)
    return [out_dir / name for name in writer.names]


def write_folder_files(source: Source, out_dir: Path, model: MergedModel) -> None:
    """config.json and everything but the weights."""
    config = dict(source.config)
    config["dtype"] = str(model.output_dtype(model.names()[0])).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config["tie_word_embeddings"] = model.tied
    dump_json(out_dir / "config.json", config)
    for name in BASE_FILES:
        if (source.base_dir / name).is_file():
            shutil.copyfile(source.base_dir / name, out_dir / name)
    if source.training_config:
        dump_json(out_dir / CONFIG_FILE, source.training_config)
        if template := source.training_config.get("prompt_template"):
            dump_json(out_dir / TEMPLATE_FILE, template)  # train.py / predict.py --prompt_template_file
