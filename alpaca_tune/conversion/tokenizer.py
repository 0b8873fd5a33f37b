"""Meta's tokenizer files -> a Hugging Face fast tokenizer that gives Meta's ids.

LLaMA 1/2 ship a SentencePiece model, LLaMA 3.x a tiktoken BPE file, both named tokenizer.model.
Both become a `tokenizers.Tokenizer` built directly from the file's own settings, so the ids are
SentencePiece's / tiktoken's, not an approximation: transformers' LlamaTokenizer class rebuilds
its pipeline from vocab and merges with a Metaspace "first" pre-tokenizer, which drops
SentencePiece's "▁" before text that starts with a space. That is why the saved
tokenizer_config.json names the generic PreTrainedTokenizerFast: it loads tokenizer.json as is.

One convention differs from Meta on purpose: text that spells a special token ("<s>",
"<|eot_id|>") becomes that token's id, as everywhere in Hugging Face; Meta's encoders read it
as plain text. Errors are ValueError; convert.py names the file, the command line exits 2.
"""

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

SENTENCEPIECE = "sentencepiece"
TIKTOKEN = "tiktoken"

# Meta's split pattern for LLaMA 3 (the cl100k one); tokens never cross these pieces.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_LLAMA3_SPECIAL = 256  # appended after the file's ranks: ids 128000..128255


def llama3_special_tokens(version: str) -> list[str]:
    """The 256 special tokens in id order, as Meta's tokenizer for that version names them.

    meta-llama/llama3 (3) and llama-models (3.1, 3.2) agree on every token a model uses
    (begin/end of text, headers, eot, and for 3.1+ eom, python_tag, finetune pad); they differ
    only in what the reserved slots are called.
    """
    if version == "3":
        named = ["<|begin_of_text|>", "<|end_of_text|>"]
        named += [f"<|reserved_special_token_{i}|>" for i in range(4)]
        named += ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        first_reserved = 5
    else:
        named = [
            "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
        ]
        if version == "3.2":
            named.append("<|image|>")  # llama-models' 3.2 tokenizer also serves the vision models
        first_reserved = 2
    reserved = NUM_LLAMA3_SPECIAL - len(named)
    return named + [f"<|reserved_special_token_{first_reserved + i}|>" for i in range(reserved)]


@dataclass
class ConvertedTokenizer:
    tokenizer: Tokenizer
    kind: str  # SENTENCEPIECE or TIKTOKEN
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)


def tokenizer_kind(path: Path) -> str:
    """Which of Meta's two formats a tokenizer.model is: tiktoken is text, SentencePiece protobuf."""
    with open(path, "rb") as f:
        first_line = f.readline(4096).split()
    try:
        if len(first_line) == 2 and int(first_line[1]) >= 0 and base64.b64decode(first_line[0], validate=True):
            return TIKTOKEN
    except ValueError:
        pass
    return SENTENCEPIECE


def _read_sentencepiece(path: Path):
    from sentencepiece import (
        sentencepiece_model_pb2 as sp_pb2,  # protobuf, no C++ model needed
    )

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as exc:  # protobuf's DecodeError has no stable import path
        raise ValueError(f"not a SentencePiece model nor a tiktoken file ({exc})") from exc
    if not proto.pieces:
        raise ValueError("not a SentencePiece model nor a tiktoken file (no pieces)")
    return proto, sp_pb2


def _sentencepiece_bpe_merges(pieces, normal_type) -> list[tuple[str, str]]:
    """Every split of a normal piece into two pieces, ranked by the merged piece's score.

    SentencePiece's BPE encoder repeatedly joins the adjacent pair whose join is the
    highest-scoring normal piece (leftmost on ties); a BPE model whose merge ranks follow the
    joined piece's score, for every way of forming it, picks the same joins in the same order.
    Byte, control and unused pieces never take part in a join.
    """
    joinable = {p.piece: i for i, p in enumerate(pieces) if p.type == normal_type}
    ranked = []
    for piece, index in joinable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in joinable and right in joinable:
                ranked.append((-pieces[index].score, index, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def convert_sentencepiece(path: Path) -> ConvertedTokenizer:
    """A SentencePiece model (BPE as in LLaMA 1/2, or unigram) as a fast tokenizer, BOS added."""
    proto, sp_pb2 = _read_sentencepiece(path)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    piece_type = sp_pb2.ModelProto.SentencePiece
    if norm.name not in ("identity", "") and not norm.precompiled_charsmap:
        raise ValueError(f"normalization rule {norm.name!r} has no precompiled charsmap to reproduce")
    if trainer.treat_whitespace_as_suffix:
        raise ValueError("treat_whitespace_as_suffix SentencePiece models are not supported")

    pieces = proto.pieces
    if trainer.model_type == sp_pb2.TrainerSpec.BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        merges = _sentencepiece_bpe_merges(pieces, piece_type.NORMAL)
        # fuse_unk: SentencePiece emits one unk for a run of unknown characters.
        model = models.BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True,
                           byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == sp_pb2.TrainerSpec.UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                               byte_fallback=trainer.byte_fallback)
    else:
        raise ValueError(f"SentencePiece model type {trainer.model_type} is neither BPE nor unigram")

    tokenizer = Tokenizer(model)
    # SentencePiece's normalizer, step by step: character map, whitespace cleanup, the dummy
    # "▁" prefix (so "Hello" and " Hello" differ, as in SentencePiece), spaces as "▁".
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)

    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(decode)

    special = [p.piece for p in pieces if p.type in (piece_type.CONTROL, piece_type.UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in special])
    user = [p.piece for p in pieces if p.type == piece_type.USER_DEFINED]
    tokenizer.add_tokens([AddedToken(s, normalized=True, special=False) for s in user])

    def piece_or_none(index: int) -> str | None:
        return pieces[index].piece if 0 <= index < len(pieces) else None

    bos = piece_or_none(trainer.bos_id)
    if bos is not None:
        tokenizer.post_processor = _prepend_bos(bos, trainer.bos_id)
    return ConvertedTokenizer(tokenizer, SENTENCEPIECE, bos, piece_or_none(trainer.eos_id),
                              piece_or_none(trainer.unk_id))


def _prepend_bos(bos: str, bos_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )


def convert_tiktoken(path: Path, version: str) -> ConvertedTokenizer:
    """Meta's LLaMA 3 tiktoken file plus its 256 special tokens as a byte-level BPE tokenizer."""
    from tiktoken.load import load_tiktoken_bpe
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as exc:  # tiktoken raises bare ValueError/binascii errors on bad lines
        raise ValueError(f"cannot read tiktoken ranks ({exc})") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("tiktoken ranks are not 0..n-1")
    byte_to_char = bytes_to_unicode()
    text = {token: "".join(byte_to_char[b] for b in token) for token in ranks}  # byte-level BPE strings
    vocab = {text[token]: rank for token, rank in ranks.items()}
    # tiktoken joins the adjacent pair whose joined bytes have the lowest rank; a merge for
    # every split of every token, ranked by the token, makes BPE choose identically.
    ranked = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                ranked.append((rank, ranks[left], text[left], text[right]))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]

    # ignore_merges: tiktoken takes a whole regex piece that is itself a token without merging.
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    special = llama3_special_tokens(version)
    tokenizer.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in special])
    bos, eos = special[0], special[1]
    tokenizer.post_processor = _prepend_bos(bos, tokenizer.token_to_id(bos))
    return ConvertedTokenizer(tokenizer, TIKTOKEN, bos, eos)


def convert_tokenizer(path: Path, version: str) -> ConvertedTokenizer:
    """Either of Meta's tokenizer files, chosen by content (both are called tokenizer.model)."""
    if tokenizer_kind(path) == TIKTOKEN:
        return convert_tiktoken(path, version)
    return convert_sentencepiece(path)


def save_tokenizer(converted: ConvertedTokenizer, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json that AutoTokenizer loads unchanged."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=converted.tokenizer,
        bos_token=converted.bos_token,
        eos_token=converted.eos_token,
        unk_token=converted.unk_token,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(out_dir)
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # Not LlamaTokenizer(Fast): transformers would rebuild it and lose SentencePiece's "▁".
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # BOS first, no EOS, as Meta's generate() encodes a prompt. tokenizer.json's post-processor
    # already does this (transformers 5 reads only that); the flags tell other readers.
    config["add_bos_token"] = converted.bos_token is not None
    config["add_eos_token"] = False
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
