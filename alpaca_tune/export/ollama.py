'''--format ollama: a Modelfile beside the GGUF (and the GGUF LoRA, when there is an adapter).

    FROM ./model.gguf
    ADAPTER ./adapter.gguf
    TEMPLATE """..."""          the adapter's prompt template as a Go template
    PARAMETER stop "..."        each section marker of the template, and the EOS token

Ollama has an instruction (the prompt) and a system message, no Alpaca "input"; the template
takes the instruction from the prompt and, when a system message is set, renders the template's
with-input form with the system message as the input. `ollama create NAME -f Modelfile` in the
output folder builds the model.
'''

from __future__ import annotations

import re

from ..data.prompts import PromptTemplate
from . import ExportError

GO_OPEN = '{{ "{{" }}'  # a literal "{{" in a Go template


def go_text(text: str) -> str:
    """Literal text inside a Go template: only "{{" has a meaning there."""
    return text.replace("{{", GO_OPEN)


def go_template(template: PromptTemplate) -> str:
    """The template's prompt with .Prompt as the instruction and .System as the input."""
    def render(text: str, **fields: str) -> str:
        pieces = re.split(r"(\{instruction\}|\{input\})", text.replace("{{", "\1").replace("}}", "\2"))
        out = []
        for piece in pieces:
            if piece in ("{instruction}", "{input}"):
                out.append(fields[piece[1:-1]])
            else:
                out.append(go_text(piece.replace("\1", "{").replace("\2", "}")))
        return "".join(out)

    with_input = render(template.prompt_input, instruction="{{ .Prompt }}", input="{{ .System }}")
    without = render(template.prompt_no_input, instruction="{{ .Prompt }}")
    return f"{{{{ if .System }}}}{with_input}{{{{ else }}}}{without}{{{{ end }}}}{{{{ .Response }}}}"


def stop_sequences(template: PromptTemplate, eos_token: str | None) -> list[str]:
    """What ends an answer: the template's section markers (a line of its own that ends in ':' and
    holds no placeholder, e.g. '### Instruction:'), the response marker, and EOS."""
    stops = []
    for text in (template.prompt_input, template.prompt_no_input):
        for line in text.splitlines():
            line = line.strip()
            if line.endswith(":") and "{" not in line and line not in stops:
                stops.append(line)
    if template.response_split and template.response_split not in stops:
        stops.append(template.response_split)
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    return stops


def quoted(value: str) -> str:
    if '"' in value or "\n" in value:
        raise ExportError(f"--format ollama: stop sequence {value!r} holds a quote or a line break, which a "
                          f"Modelfile PARAMETER cannot")
    return f'"{value}"'


def modelfile(gguf_name: str, adapter_name: str | None, template: PromptTemplate, eos_token: str | None) -> str:
    body = go_template(template)
    if '"""' in body:
        raise ExportError('--format ollama: the prompt template holds """, which ends a Modelfile string')
    lines = [f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    lines.append(f'TEMPLATE """{body}"""')
    lines += [f"PARAMETER stop {quoted(stop)}" for stop in stop_sequences(template, eos_token)]
    return "\n".join(lines) + "\n"
