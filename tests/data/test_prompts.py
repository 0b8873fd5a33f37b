import json
import os
import sys

import pytest

from alpaca_tune.data.prompts import (
    BUILTIN_TEMPLATES,
    TemplateError,
    load_template,
    read_template_file,
    template_for,
    template_from_json,
)
from alpaca_tune.settings import GenerateSettings, TrainSettings

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


MINE = {"prompt_input": "Q: {instruction} ({input})\nA:", "prompt_no_input": "Q: {instruction}\nA:",
        "response_split": "A:"}


def test_user_template_file_and_round_trip(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(MINE))
    template = read_template_file(path)
    assert template.render("why", "because") == "Q: why (because)\nA:"
    assert template_from_json(template.to_json()) == template
    # the command line's --prompt_template_file wins over prompt_template
    for settings in (TrainSettings(train_data="x", prompt_template_file=str(path)),
                     GenerateSettings(prompt="x", prompt_template_file=str(path))):
        assert template_for(settings) == template


def test_an_inline_template(tmp_path):
    template = load_template(json.dumps(MINE))
    assert template.render("why") == "Q: why\nA:" and template.response_split == "A:"
    with pytest.raises(TemplateError, match=r"prompt_template \(inline\): field 'response_split' is missing"):
        load_template(json.dumps({**MINE, "response_split": None}))
    with pytest.raises(TemplateError, match="inline template is not valid JSON"):
        load_template('{"prompt_input": ')


def test_named_templates_from_the_template_directory(tmp_path, monkeypatch):
    (tmp_path / "house.json").write_text(json.dumps(MINE))
    monkeypatch.setenv("ALPACA_TUNE_TEMPLATE_DIR", str(tmp_path))
    assert load_template("house").render("why") == "Q: why\nA:"
    with pytest.raises(TemplateError, match="not a template name"):
        load_template(str(tmp_path / "house.json"))  # its name, not its path


@pytest.fixture
def opened(monkeypatch):
    """The paths this process opens from now on (an audit hook sees every open, by any means)."""
    seen = []
    active = [True]

    def hook(event, args):
        if event == "open" and active[0] and isinstance(args[0], (str, bytes, os.PathLike)):
            seen.append(os.fsdecode(args[0]))
    sys.addaudithook(hook)  # hooks cannot be removed; this one goes quiet after the test
    yield seen
    active[0] = False


def test_a_path_is_never_opened_and_gets_the_same_answer_whether_it_exists(tmp_path, opened):
    probe = tmp_path / "secret.json"
    answers = {}
    for state in ("a JSON template", "other bytes", "missing"):
        if state == "a JSON template":
            probe.write_text(json.dumps(MINE))
        elif state == "other bytes":
            probe.write_bytes(b"\xa0\x00 not json")
        else:
            probe.unlink()
        del opened[:]
        for spec in (str(probe), f"../../../..{probe}", "/etc/passwd", "/proc/self/environ"):
            with pytest.raises(TemplateError) as err:
                load_template(spec)
            answers.setdefault(spec, set()).add(str(err.value))
        assert not [path for path in opened if "secret" in path or path.startswith(("/etc", "/proc"))]
    assert all(len(messages) == 1 for messages in answers.values()), answers
    assert "not a template name (alpaca, alpaca_short, none) nor an inline JSON template" in answers["/etc/passwd"].pop()


@pytest.mark.parametrize("content, message", [
    ("{not json", "template file: not UTF-8 JSON"),
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
        read_template_file(path)
    assert str(path) in str(err.value)
    with pytest.raises(TemplateError, match="missing.json: template file: cannot be read"):
        read_template_file(tmp_path / "missing.json")


def test_unknown_template_name():
    with pytest.raises(TemplateError, match=r"prompt_template='vicuna': not a template name"):
        load_template("vicuna")
