"""The tokenizer in a GGUF file, so that llama.cpp gives the ids transformers gives.

Three kinds of tokenizer, read with the gguf library's vocabularies where they fit:
  - a SentencePiece tokenizer.model (LLaMA 1/2): gguf.SentencePieceVocab, llama.cpp's "llama" model;
  - a SentencePiece-style BPE tokenizer.json (byte fallback; what convert_weights.py writes for
    LLaMA 1/2, with no tokenizer.model): same "llama" model; llama.cpp joins the adjacent pair
    whose joined piece scores highest, so each piece scores minus the rank of the first merge that
    forms it, which makes it choose as the merges do (the library's LlamaHfVocab gives every piece
    the same score, and llama.cpp then joins in another order);
  - a byte-level BPE tokenizer.json (LLaMA 3, SmolLM2): gguf.BpeVocab, llama.cpp's "gpt2" model,
    with the pre-tokenizer named after the split the tokenizer.json does (llama.cpp cannot run an
    arbitrary regex; an unknown one is refused rather than written as "default").
Special tokens, BOS/EOS flags and the chat template come from gguf.SpecialVocab.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import ExportError

# tokenizer.json pre-tokenizer -> llama.cpp's name for the same split
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT \
            and not steps[1].get("use_regex", True):
        return "llama-bpe"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    raise ExportError(f"tokenizer.json: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent known "
                      f"here (GPT-2, LLaMA 3 and SmolLM splits are); the GGUF would tokenize differently")


def spm_scores_from_merges(vocab: dict[str, int], merges: list) -> dict[int, float]:
    scores = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = vocab.get(left + right)
        if token_id is not None and token_id not in scores:
            scores[token_id] = -float(rank)
    return scores


def add_vocab(writer, base_dir: Path, n_vocab: int, add_bos: bool) -> str:
    """Write the tokenizer keys; returns a one-line description for the log."""
    import gguf

    path = base_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    model = data.get("model", {})
    merges = False
    if (base_dir / "tokenizer.model").is_file() and _is_sentencepiece(base_dir / "tokenizer.model"):
        vocab = gguf.SentencePieceVocab(base_dir)
        tokens = list(vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_spm_dummy_prefix(base_dir / "tokenizer.model"))
        described = "SentencePiece tokenizer.model"
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        tokens = _spm_tokens_from_json(data)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_adds_space_prefix(data))
        described = "SentencePiece-style tokenizer.json"
    elif model.get("type") == "BPE" and (data.get("decoder") or {}).get("type") == "ByteLevel":
        pre = bpe_pre_tokenizer(data)
        try:
            tokens = list(gguf.BpeVocab(base_dir).all_tokens())
        except (FileNotFoundError, ValueError) as err:
            raise ExportError(f"{path}: {err}") from None
        specials = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
        # BpeVocab marks every added token CONTROL; llama.cpp must still read the non-special ones
        tokens = [(text, score, gguf.TokenType.USER_DEFINED if kind == gguf.TokenType.CONTROL
                   and text.decode("utf-8") not in specials else kind) for text, score, kind in tokens]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        merges = True
        described = f"byte-level BPE tokenizer.json ({pre})"
    else:
        raise ExportError(f"{base_dir}: no tokenizer llama.cpp can run (a SentencePiece tokenizer.model or a BPE "
                          f"tokenizer.json)")
    if len(tokens) > n_vocab:
        raise ExportError(f"{base_dir}: the tokenizer has {len(tokens)} tokens, the embeddings {n_vocab} rows")
    tokens += [(f"[PAD{i}]".encode(), -1000.0, gguf.TokenType.UNUSED) for i in range(len(tokens), n_vocab)]
    writer.add_token_list([text for text, _, _ in tokens])
    writer.add_token_scores([score for _, score, _ in tokens])
    writer.add_token_types([kind for _, _, kind in tokens])
    special = gguf.SpecialVocab(base_dir, load_merges=merges, n_vocab=n_vocab)
    special.add_special_token.update({"bos": add_bos, "eos": False})  # as the HF tokenizer encodes a prompt
    special.add_to_gguf(writer, quiet=True)
    return f"{described}, {len(tokens)} tokens"


def _spm_tokens_from_json(data: dict) -> list:
    import gguf

    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    size = max([*vocab.values(), *added.keys()]) + 1
    by_id = {i: text for text, i in vocab.items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if missing := [i for i in range(size) if i not in by_id]:
        raise ExportError(f"tokenizer.json: no token for id(s) {missing[:5]}")
    scores = spm_scores_from_merges(vocab, model.get("merges", []))
    tokens = []
    for i in range(size):
        text = by_id[i]
        if i in added:
            kind = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
            kind = gguf.TokenType.UNKNOWN if text == model.get("unk_token") else kind
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append((text.encode("utf-8"), scores.get(i, 0.0 if len(text) == 1 else -1e9), kind))
    return tokens


def _adds_space_prefix(data: dict) -> bool:
    """SentencePiece's dummy "▁" before the text: a Prepend normalizer (convert_weights.py's
    tokenizers) or a Metaspace pre-tokenizer that prepends (transformers' LlamaTokenizer)."""
    steps = []
    for part in (data.get("normalizer"), data.get("pre_tokenizer")):
        if part:
            steps += part.get("normalizers") or part.get("pretokenizers") or [part]
    return any(step.get("type") == "Prepend" or (step.get("type") == "Metaspace"
                                                   and step.get("prepend_scheme", "always") in ("always", "first"))
               for step in steps)


def _is_sentencepiece(path: Path) -> bool:
    from ..conversion.tokenizer import SENTENCEPIECE, tokenizer_kind

    return tokenizer_kind(path) == SENTENCEPIECE


def _spm_dummy_prefix(path: Path) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto.normalizer_spec.add_dummy_prefix
