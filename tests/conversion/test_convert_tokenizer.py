"""The converted tokenizers, loaded back with AutoTokenizer, give exactly the ids of Meta's
tokenizers: SentencePiece for LLaMA 1/2 (models trained here) and tiktoken for LLaMA 3.x (Meta's
real file), on real instruction data and text chosen to trip tokenizers."""

import pytest
import sentencepiece as spm
import tiktoken
from convert_fixtures import LLAMA3_TOKENIZER, sample_texts, train_sentencepiece
from tiktoken.load import load_tiktoken_bpe
from transformers import AutoTokenizer

from alpaca_tune.conversion.tokenizer import (
    SENTENCEPIECE,
    TIKTOKEN,
    convert_sentencepiece,
    convert_tiktoken,
    save_tokenizer,
    tokenizer_kind,
)

# Written out from Meta's tokenizer.py (meta-llama/llama3, llama-models), not imported from the code under test.
META_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
META_SPECIAL = {  # id -> token, the ones models use
    "3": {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
          128007: "<|end_header_id|>", 128009: "<|eot_id|>", 128255: "<|reserved_special_token_250|>"},
    "3.1": {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
            128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
            128010: "<|python_tag|>", 128255: "<|reserved_special_token_246|>"},
    "3.2": {128008: "<|eom_id|>", 128009: "<|eot_id|>", 128010: "<|python_tag|>", 128011: "<|image|>",
            128255: "<|reserved_special_token_245|>"},
}
# What only a Hugging Face tokenizer does: spelled-out special tokens become their ids.
SPELLED_SPECIAL = ("<s>", "</s>", "<|")


def texts() -> list[str]:
    return [t for t in sample_texts() if not any(s in t for s in SPELLED_SPECIAL)]


def load_back(converted, tmp_path, max_length=4096):
    save_tokenizer(converted, tmp_path, max_length)
    return AutoTokenizer.from_pretrained(tmp_path)


SENTENCEPIECE_MODELS = {
    "llama": {},  # BPE, byte fallback, split digits, identity normalization: LLaMA's settings
    "bpe defaults": dict(byte_fallback=False, split_digits=False, normalization_rule_name="nmt_nfkc",
                         remove_extra_whitespaces=True, allow_whitespace_only_pieces=False, vocab_size=300),
    "unigram defaults": dict(model_type="unigram", byte_fallback=False, split_digits=False,
                             normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
                             allow_whitespace_only_pieces=False, vocab_size=300),
}


@pytest.mark.parametrize("name", SENTENCEPIECE_MODELS)
def test_sentencepiece_ids_match(tmp_path, name):
    model = train_sentencepiece(tmp_path / "tokenizer.model", **SENTENCEPIECE_MODELS[name])
    assert tokenizer_kind(model) == SENTENCEPIECE
    sp = spm.SentencePieceProcessor(model_file=str(model))
    hf = load_back(convert_sentencepiece(model), tmp_path / "hf")
    for text in texts():
        # Meta's Tokenizer.encode(s, bos=True, eos=False) is [bos] + sp.encode(s)
        assert hf(text).input_ids == [sp.bos_id()] + sp.encode(text), repr(text)
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<s>", "</s>", "<unk>")


def test_sentencepiece_llama_details(tmp_path):
    model = train_sentencepiece(tmp_path / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    hf = load_back(convert_sentencepiece(model), tmp_path / "hf")
    # The leading "▁" SentencePiece adds, and the extra one for a leading space.
    assert hf.convert_ids_to_tokens(hf("Hello").input_ids)[1].startswith("▁")
    assert hf(" Hello").input_ids == [1] + sp.encode(" Hello") != hf("Hello").input_ids
    assert hf("7 apples").input_ids[1:] == sp.encode("7 apples")  # digits split one by one
    unseen = "Ω🦙"  # not in the tiny vocabulary: UTF-8 bytes, no <unk>
    assert hf(unseen).input_ids[1:] == sp.encode(unseen) and sp.unk_id() not in sp.encode(unseen)
    for text in texts():
        assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == sp.decode(sp.encode(text))
    assert hf("<s>").input_ids == [1, 1]  # Hugging Face's convention; SentencePiece spells it out


@pytest.fixture(scope="module")
def meta_ranks():
    return load_tiktoken_bpe(str(LLAMA3_TOKENIZER))


@pytest.mark.parametrize("version", ["3", "3.1", "3.2"])
def test_tiktoken_ids_match(tmp_path, meta_ranks, version):
    assert tokenizer_kind(LLAMA3_TOKENIZER) == TIKTOKEN
    meta = tiktoken.Encoding(name="llama3", pat_str=META_PATTERN, mergeable_ranks=meta_ranks, special_tokens={})
    hf = load_back(convert_tiktoken(LLAMA3_TOKENIZER, version), tmp_path, 131072)
    for text in texts():
        # Meta's encode(s, bos=True, eos=False) with its defaults (special tokens read as text)
        assert hf(text).input_ids == [128000] + meta.encode(text, disallowed_special=()), repr(text)
        assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == text
    assert len(hf) == 128256
    for token_id, token in META_SPECIAL[version].items():
        assert hf.convert_ids_to_tokens(token_id) == token
        assert hf(token, add_special_tokens=False).input_ids == [token_id]
    assert (hf.bos_token, hf.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")


def test_unreadable_tokenizer_is_a_value_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00\xff" * 64)
    with pytest.raises(ValueError, match="not a SentencePiece model nor a tiktoken file"):
        convert_sentencepiece(bad)
    bad.write_text("IQ== 0\nnot base64 1\n")
    with pytest.raises(ValueError, match="cannot read tiktoken ranks"):
        convert_tiktoken(bad, "3")
