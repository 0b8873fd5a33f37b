import json

import pytest
from conftest import TINY_RECORDS

from alpaca_tune.data.records import DataError, Record, load_records, split_records


def test_json_array_and_jsonl_give_the_same_records(tmp_path, write_json):
    array = load_records(write_json("a.json", TINY_RECORDS))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in TINY_RECORDS) + "\n\n")
    assert load_records(jsonl) == array
    assert array[2] == Record("Translate to French.", "thank you", "Here is my answer: merci. I hope this helps!")


def test_json_lines_end_at_newlines_only(tmp_path):
    """U+2028, U+2029 and U+0085 inside a string are text (str.splitlines would split there);
    \\r\\n endings are fine."""
    records = [{"instruction": "one\u2028two", "output": "three\u0085four\u2029five"}, TINY_RECORDS[0]]
    path = tmp_path / "odd.jsonl"
    path.write_bytes(("\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n").encode())
    assert [r.instruction for r in load_records(path)] == ["one\u2028two", TINY_RECORDS[0]["instruction"]]


def test_prompt_completion_and_missing_input(write_json):
    records = load_records(write_json("pc.json", [{"prompt": "Hi", "completion": "Hello"},
                                                  {"instruction": "Hey", "output": "Yo"}]))
    assert records == [Record("Hi", "", "Hello"), Record("Hey", "", "Yo")]


def test_real_alpaca_sample(alpaca_sample):
    records = load_records(alpaca_sample)
    assert len(records) == 102 and sum(bool(r.input) for r in records) == 48


BAD_FILES = [
    (b"", "the file is empty"),
    (b"   \n", "the file is empty"),
    (b"[{\"instruction\": \"a\", ", "not valid JSON (line 1"),
    (b"\"just a string\"", "got a JSON str"),
    (b"42", "got a JSON int"),
    (b'{"data": [{"instruction": "a", "output": "b"}]}', "the top level is a JSON object"),
    (b'{"instruction": "a", "input": ["x"], "output": "b"}', "line 1: field 'input' must be a string, got list"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', "line 2 is not valid JSON"),
    (b'[{"instruction": "a"}]', "record 0: missing field 'output'"),
    (b'[{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}]',
     "record 1: field 'instruction' must be a string, got int"),
    (b'[{"instruction": "a", "output": "   "}]', "record 0: field 'output' is empty"),
    (b'[{"prompt": "a", "completion": ""}]', "field 'completion' is empty"),
    (b'[["instruction", "output"]]', "record 0: expected a JSON object, got list"),
    (b'[{"instruction": "a", "input": ["x"], "output": "b"}]', "field 'input' must be a string"),
    (b'[{"instruction": "caf\xe9", "output": "b"}]', "not UTF-8 text (byte 21, line 1"),
    (b'[]', "contains no records"),
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply to be Alpaca records"),
    (b'{"instruction": "a", "output": "b"}\n' + b'{"x": ' * 200_000 + b"1" + b"}" * 200_000,
     "line 2 is nested too deeply"),
    (b'[{"instruction": "a\\ud800", "output": "b"}]',
     "record 0: field 'instruction' holds an unpaired surrogate '\\ud800' at character 1"),
]


@pytest.mark.parametrize("content, message", BAD_FILES)
def test_bad_data_is_refused_with_file_record_and_reason(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_records(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_all_bad_records_are_counted(write_json):
    bad = [{"instruction": "x", "output": ""}] * 8 + TINY_RECORDS
    with pytest.raises(DataError, match=r"8 bad record\(s\)[\s\S]*and 3 more"):
        load_records(write_json("many.json", bad))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.json")


def test_split_is_seeded_and_disjoint():
    records = [Record(f"i{n}", "", f"o{n}") for n in range(20)]
    train, val = split_records(records, 0.2, seed=1)
    assert len(val) == 4 and len(train) == 16 and not set(train) & set(val)
    assert split_records(records, 0.2, seed=1) == (train, val)
    assert split_records(records, 0.2, seed=2) != (train, val)
    assert len(split_records(records, 3, seed=1)[1]) == 3
    with pytest.raises(DataError, match="leaving none to train on"):
        split_records(records, 20, seed=1)
