import json

import pytest

from alpaca_tune.data.prompts import (
    BUILTIN_TEMPLATES,
    TemplateError,
    load_template,
    template_from_json,
)

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nTell me about alpacas.\n\n### Response:\n")
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
    "### Input:\nthank you\n\n### Response:\n")


def test_builtins_exist():
    assert {"alpaca", "alpaca_short", "none"} <= set(BUILTIN_TEMPLATES)


def test_alpaca_golden_strings():
    template = load_template("alpaca")
    assert template.render("Tell me about alpacas.") == ALPACA_NO_INPUT
    assert template.render("Translate.", "thank you") == ALPACA_INPUT
    assert template.extract_response(ALPACA_NO_INPUT + " Alpacas hum.") == "Alpacas hum."


def test_short_and_none():
    assert load_template("alpaca_short").render("Hi") == "### Instruction:\nHi\n\n### Response:\n"
    assert load_template("none").render("Hi") == "Hi"
    assert load_template("none").render("Hi", "there") == "Hi\nthere"


def test_braces_in_user_text_are_kept():
    assert "{input} {0}" in load_template("alpaca").render("Echo {input} {0}")


def test_user_template_file_and_round_trip(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"prompt_input": "Q: {instruction} ({input})\nA:",
                                "prompt_no_input": "Q: {instruction}\nA:", "response_split": "A:"}))
    template = load_template(str(path))
    assert template.render("why", "because") == "Q: why (because)\nA:"
    assert template_from_json(template.to_json()) == template


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a valid UTF-8 JSON"),
    ("[]", "must be a JSON object"),
    ('{"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction}"}', "response_split"),
    ('{"prompt_input": "{instruction}", "prompt_no_input": "{instruction}", "response_split": ""}',
     "must contain {input}"),
    ('{"prompt_input": "{instruction} {input} {other}", "prompt_no_input": "{instruction}", '
     '"response_split": ""}', "only {instruction} and {input}"),
])
def test_bad_template_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TemplateError, match=message) as err:
        load_template(str(path))
    assert str(path) in str(err.value)


def test_unknown_template_name():
    with pytest.raises(TemplateError, match="not a built-in template"):
        load_template("vicuna")
