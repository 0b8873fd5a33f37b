"""Prompt templates in alpaca-lora's JSON format.

A template file holds `prompt_input` (uses {instruction} and {input}), `prompt_no_input` (uses
{instruction}) and `response_split` (the marker after which the answer starts). Built-ins live in
templates/; a user may pass the path of their own file instead of a name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


class TemplateError(UserError):
    """A template name is unknown or a template file is malformed; the message names which."""


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    prompt_input: str
    prompt_no_input: str
    response_split: str
    description: str = ""

    def render(self, instruction: str, input: str = "") -> str:
        """The prompt the model sees; the response is generated (or trained) right after it."""
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def extract_response(self, text: str) -> str:
        """The answer part of a full prompt+answer text."""
        if self.response_split and self.response_split in text:
            return text.split(self.response_split, 1)[1].strip()
        return text.strip()

    def to_json(self) -> dict:
        return asdict(self)


def _from_dict(name: str, data, source: str) -> PromptTemplate:
    if not isinstance(data, dict):
        raise TemplateError(f"{source}: a template must be a JSON object with prompt_input, "
                            f"prompt_no_input and response_split")
    for key in ("prompt_input", "prompt_no_input", "response_split"):
        if not isinstance(data.get(key), str):
            raise TemplateError(f"{source}: field {key!r} is missing or not a string")
    template = PromptTemplate(name=name, prompt_input=data["prompt_input"],
                              prompt_no_input=data["prompt_no_input"],
                              response_split=data["response_split"],
                              description=str(data.get("description", "")))
    if "{instruction}" not in template.prompt_input or "{instruction}" not in template.prompt_no_input:
        raise TemplateError(f"{source}: prompt_input and prompt_no_input must contain {{instruction}}")
    if "{input}" not in template.prompt_input:
        raise TemplateError(f"{source}: prompt_input must contain {{input}}")
    try:  # other braces would fail at the first record; fail now instead
        template.render("x", "y")
        template.render("x")
    except (KeyError, IndexError, ValueError) as err:
        raise TemplateError(f"{source}: only {{instruction}} and {{input}} may appear in braces "
                            f"(use {{{{ and }}}} for literal braces): {err!r}") from None
    return template


def load_template(name_or_path: str) -> PromptTemplate:
    """A built-in template by name, or a template JSON file by path."""
    if name_or_path in BUILTIN_TEMPLATES:
        path = TEMPLATE_DIR / f"{name_or_path}.json"
        return _from_dict(name_or_path, json.loads(path.read_text()), str(path))
    path = Path(name_or_path)
    if not path.is_file():
        raise TemplateError(f"prompt_template={name_or_path!r}: not a built-in template "
                            f"({', '.join(BUILTIN_TEMPLATES)}) and no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TemplateError(f"{path}: not a valid UTF-8 JSON template: {err}") from None
    return _from_dict(path.stem, data, str(path))


def template_from_json(data: dict) -> PromptTemplate:
    """Rebuild the template recorded in a training output (see training/outputs.py)."""
    return _from_dict(str(data.get("name", "recorded")), data, "recorded prompt template")
