from alpaca_tune.data.prompts import load_template
from alpaca_tune.data.records import Record
from alpaca_tune.data.tokenization import (
    IGNORE_INDEX,
    build_example,
    encode_prompt,
    tokenize_records,
)

RECORD = Record("Tell me about alpacas.", "", "Here is my answer: alpacas hum.")


def _parts(tokenizer, record=RECORD, template="alpaca"):
    prompt = load_template(template).render(record.instruction, record.input)
    return encode_prompt(tokenizer, prompt), tokenizer(record.output, add_special_tokens=False)["input_ids"]


def test_labels_mask_exactly_the_prompt_and_end_with_eos(tiny_tokenizer):
    prompt_ids, response_ids = _parts(tiny_tokenizer)
    [example], stats = tokenize_records([RECORD], load_template("alpaca"), tiny_tokenizer, 512, False)
    assert example.input_ids == prompt_ids + response_ids + [tiny_tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tiny_tokenizer.eos_token_id]
    assert example.input_ids[0] == tiny_tokenizer.bos_token_id  # BOS, as the tokenizer adds it
    assert stats.truncated == 0 and stats.dropped == 0


def test_golden_ids(tiny_tokenizer, tiny_tokenizer_dir):
    """The boundary is exact: decoding the labelled part gives back the response and nothing else."""
    [example], _ = tokenize_records([RECORD], load_template("alpaca"), tiny_tokenizer, 512, False)
    learned = [t for t in example.labels if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(learned, skip_special_tokens=True) == RECORD.output
    masked = example.input_ids[:len(example.input_ids) - len(learned)]
    assert tiny_tokenizer.decode(masked, skip_special_tokens=True).endswith("### Response:\n")
    # the SentencePiece model itself (independent of transformers) gives the same response ids
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    assert learned[:-1] == sp.encode(RECORD.output)
    assert example.input_ids[:len(masked)] == [sp.bos_id()] + sp.encode(
        load_template("alpaca").render(RECORD.instruction))


def test_train_on_inputs_keeps_prompt_labels(tiny_tokenizer):
    [example], _ = tokenize_records([RECORD], load_template("alpaca"), tiny_tokenizer, 512, True)
    assert example.labels == example.input_ids


def test_truncation_drops_eos_and_is_counted(tiny_tokenizer):
    prompt_ids, response_ids = _parts(tiny_tokenizer)
    cutoff = len(prompt_ids) + 3
    [example], stats = tokenize_records([RECORD], load_template("alpaca"), tiny_tokenizer, cutoff, False)
    assert len(example) == cutoff and stats.truncated == 1
    assert example.labels[-3:] == response_ids[:3]
    assert tiny_tokenizer.eos_token_id not in example.labels


def test_prompt_filling_cutoff_is_dropped(tiny_tokenizer):
    records = [RECORD, Record("x " * 400, "", "y")]
    prompt_ids, response_ids = _parts(tiny_tokenizer)
    cutoff = len(prompt_ids) + len(response_ids) + 1
    examples, stats = tokenize_records(records, load_template("alpaca"), tiny_tokenizer, cutoff, False)
    assert len(examples) == 1 and stats.dropped == 1 and stats.dropped_records == [1]


def test_build_example_pure():
    example, truncated = build_example([1, 5, 6], [7, 8], eos_id=2, cutoff_len=10, train_on_inputs=False)
    assert example.input_ids == [1, 5, 6, 7, 8, 2] and example.labels == [-100, -100, -100, 7, 8, 2]
    assert not truncated
