"""Prompt templates in alpaca-lora's JSON format.

A template holds `prompt_input` (uses {instruction} and {input}), `prompt_no_input` (uses
{instruction}) and `response_split` (the marker after which the answer starts). The setting
`prompt_template` names one (the built-ins in templates/, or a file in the directory named by
$ALPACA_TUNE_TEMPLATE_DIR, for templates baked into a server's image) or is the template itself as
inline JSON. It is never a path: over HTTP anyone may set it, and a path would let them make the
server open its own files (and learn from the messages which exist). A template file is the
command line's `--prompt_template_file`, which no HTTP input can reach.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError, read_json

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))
EXTRA_TEMPLATES_ENV = "ALPACA_TUNE_TEMPLATE_DIR"


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

    def head(self, input: str = "") -> str:
        """The prompt's text before the instruction: the same for every instruction (with this input)."""
        marker = "\x00instruction\x00"
        rendered = self.render(marker, input)
        return rendered[:rendered.index(marker)]

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


def named_templates() -> dict[str, Path]:
    """Name -> file of every template a `prompt_template` name may choose: the built-ins, then the
    *.json files in $ALPACA_TUNE_TEMPLATE_DIR (a name is matched against this list, never joined
    to a path)."""
    named = {name: TEMPLATE_DIR / f"{name}.json" for name in BUILTIN_TEMPLATES}
    extra = os.environ.get(EXTRA_TEMPLATES_ENV, "")
    if extra:
        for path in sorted(Path(extra).glob("*.json")):
            named.setdefault(path.stem, path)
    return named


def load_template(spec: str) -> PromptTemplate:
    """The template a `prompt_template` setting names: a name from named_templates(), or the
    template itself as inline JSON. Whatever else it is, the answer is the same message, and no
    file is opened."""
    named = named_templates()
    if spec in named:
        return read_template_file(named[spec], name=spec)
    if spec.lstrip().startswith("{"):
        try:
            data = json.loads(spec)
        except (json.JSONDecodeError, RecursionError) as err:
            raise TemplateError(f"prompt_template: inline template is not valid JSON: {err}") from None
        return _from_dict(str(data.get("name", "inline")) if isinstance(data, dict) else "inline", data,
                          "prompt_template (inline)")
    shown = spec if len(spec) <= 120 else spec[:117] + "..."
    raise TemplateError(f"prompt_template={shown!r}: not a template name ({', '.join(named)}) nor an inline "
                        f"JSON template {{\"prompt_input\": ..., \"prompt_no_input\": ..., \"response_split\": ...}}; "
                        f"a template file is given locally with --prompt_template_file")


def read_template_file(path: str | Path, name: str | None = None) -> PromptTemplate:
    """A template JSON file (the command line's --prompt_template_file, or a named template)."""
    path = Path(path)
    data = read_json(path, TemplateError, f"{path}: template file")
    return _from_dict(name or path.stem, data, str(path))


def template_for(settings) -> PromptTemplate:
    """The template of a TrainSettings or GenerateSettings: its local-only template file when
    given, else what prompt_template names."""
    if settings.prompt_template_file:
        return read_template_file(settings.prompt_template_file)
    return load_template(settings.prompt_template)


def template_from_json(data: dict, source: str = "recorded prompt template") -> PromptTemplate:
    """Rebuild the template recorded in a training output (see training/outputs.py); `source`
    names the file it came from in messages."""
    return _from_dict(str(data.get("name", "recorded")), data, source)
