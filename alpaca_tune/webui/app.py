"""The Gradio page: Ask, Compare, Train, Export, on the same library as predict.py and train.py.

Every generation input is built from GenerateSettings (its range and default), every training
input from TrainSettings, so the page cannot drift from the API. Answers stream through
InstructModel.stream, the Predictor's own path; Stop cancels the event, which closes the stream
and ends decoding. Mistakes (a bad data file or archive, a value out of range, a prompt too long)
come back as the library's own message on the page, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

from ..base_model import PROJECT_ROOT
from ..data.records import load_records
from ..errors import UserError
from ..settings import GenerateSettings, TrainSettings, default_of
from .models import BASE, ModelChoices
from .training_job import TrainingJob

ASK_SKIP = {"prompt", "input", "lora_weights", "prompt_template_file"}
TRAIN_FIELDS = ("num_train_epochs", "max_steps", "learning_rate", "lora_rank", "lora_alpha", "lora_target_modules",
                "cutoff_len", "prompt_template", "val_set_size")
PREFERENCES = "preferences.jsonl"


def field_of(cls, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def setting_component(cls, name: str):
    """The input for one setting: its label, help, range and default from the settings class."""
    import gradio as gr

    f = field_of(cls, name)
    meta, default, kind = f.metadata, default_of(cls, name), str(f.type)
    common = {"label": name, "info": meta["help"], "value": default, "elem_id": f"setting-{name}"}
    if meta.get("choices"):
        return gr.Dropdown(choices=list(meta["choices"]), **common)
    if kind in ("int", "float") and meta.get("ge") is not None and meta.get("le") is not None \
            and meta["le"] - meta["ge"] <= 10_000:
        step = 1 if kind == "int" else (0.01 if meta["le"] <= 10 else 0.1)
        return gr.Slider(minimum=meta["ge"], maximum=meta["le"], step=step, **common)
    if kind in ("int", "float"):
        return gr.Number(minimum=meta.get("ge"), maximum=meta.get("le"), precision=0 if kind == "int" else None,
                         **common)
    if kind == "bool":
        return gr.Checkbox(label=name, info=meta["help"], value=default, elem_id=f"setting-{name}")
    return gr.Textbox(**common)


def typed(cls, names, values) -> dict:
    """Component values -> setting values of the field's type (Gradio numbers come as floats)."""
    out = {}
    for name, value in zip(names, values):
        kind = str(field_of(cls, name).type)
        out[name] = int(value) if kind == "int" and value is not None else (
            float(value) if kind == "float" and value is not None else value)
    return out


def page_error(err: Exception):
    import gradio as gr

    return gr.Error(str(err), print_exception=False)


class WebUI:
    def __init__(self, choices: ModelChoices, outputs_dir: Path = PROJECT_ROOT / "outputs"):
        self.choices, self.outputs_dir = choices, Path(outputs_dir)
        self.job: TrainingJob | None = None
        self.ask_names = [f.name for f in dataclasses.fields(GenerateSettings) if f.name not in ASK_SKIP]

    # -- Ask / Compare ---------------------------------------------------------------------------
    def settings(self, instruction: str, context: str, values) -> GenerateSettings:
        try:
            return GenerateSettings(prompt=instruction, input=context, **typed(GenerateSettings, self.ask_names, values))
        except (TypeError, ValueError) as err:
            raise page_error(err) from None

    def stream(self, label: str, settings: GenerateSettings):
        try:
            model = self.choices.model(label)
            prompt = model.template_for(settings).render(settings.prompt, settings.input)
            return prompt, model.stream(settings)
        except UserError as err:
            raise page_error(err) from None

    def ask(self, label, instruction, context, *values):
        prompt, chunks = self.stream(label, self.settings(instruction, context, values))
        answer = ""
        yield answer, prompt
        try:
            for chunk in chunks:
                answer += chunk
                yield answer, prompt
        except UserError as err:
            raise page_error(err) from None

    def compare(self, label_a, label_b, instruction, context, *values):
        settings = self.settings(instruction, context, values)
        if settings.seed == -1:  # one seed for both sides, so only the model differs
            settings = dataclasses.replace(settings, seed=random.randrange(2**31 - 1))
        _, chunks_a = self.stream(label_a, settings)
        _, chunks_b = self.stream(label_b, settings)
        answers, live = ["", ""], [iter(chunks_a), iter(chunks_b)]
        yield answers[0], answers[1], f"seed {settings.seed}"
        try:
            while any(live):
                for side, chunks in enumerate(live):
                    if chunks is None:
                        continue
                    chunk = next(chunks, None)
                    if chunk is None:
                        live[side] = None
                    else:
                        answers[side] += chunk
                yield answers[0], answers[1], f"seed {settings.seed}"
        except UserError as err:
            raise page_error(err) from None

    def prefer(self, choice: str, label_a, label_b, instruction, answer_a, answer_b) -> str:
        if not (answer_a or answer_b):
            raise page_error(ValueError("compare two answers first"))
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "instruction": instruction, "a": label_a,
                  "b": label_b, "answer_a": answer_a, "answer_b": answer_b, "preferred": choice}
        with open(self.outputs_dir / PREFERENCES, "a", encoding="utf-8") as out:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        return self.tally()

    def tally(self) -> str:
        path = self.outputs_dir / PREFERENCES
        if not path.is_file():
            return "no preferences recorded yet"
        wins: dict[str, int] = {}
        count = 0
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            count += 1
            key = "tie" if record["preferred"] == "tie" else record["a" if record["preferred"] == "A" else "b"]
            wins[key] = wins.get(key, 0) + 1
        parts = ", ".join(f"{name}: {n}" for name, n in sorted(wins.items(), key=lambda kv: -kv[1]))
        return f"{count} preference(s) in {path}: {parts}"

    # -- Train -----------------------------------------------------------------------------------
    def check_data(self, path) -> str:
        if not path:
            return ""
        try:
            records = load_records(path)
        except UserError as err:
            return f"**{Path(path).name}**: {err}"
        return f"**{Path(path).name}**: {len(records)} records, ready to train on"

    def start_training(self, path, *values) -> str:
        import gradio as gr

        if self.job is not None and self.job.running:
            gr.Warning("a training is already running; cancel it or wait for it to end")
            return self.job.status()
        if not path:
            raise page_error(ValueError("upload a training data file (JSON or JSONL) first"))
        try:
            load_records(path)
            arguments = typed(TrainSettings, TRAIN_FIELDS, values)
            TrainSettings(train_data=path, **arguments)  # settings errors now, not in the child
        except (UserError, TypeError, ValueError) as err:
            raise page_error(err) from None
        if self.choices.base_model:
            arguments["base_model"] = self.choices.base_model
        output_dir = self.outputs_dir / time.strftime("ui-%Y%m%d-%H%M%S")
        self.job = TrainingJob.start({"train_data": path, **arguments}, output_dir)
        return self.job.status()

    def training_view(self):
        """(status, progress bar, log, loss plot rows, archive) for the timer."""
        import gradio as gr
        import pandas as pd

        if self.job is None:
            return "no training yet", "", "", pd.DataFrame({"step": [], "loss": []}), None, gr.update()
        job = self.job
        bar = (f'<progress id="train-progress" value="{job.fraction():.3f}" max="1" style="width:100%"></progress>'
               f"<div>{job.status()}</div>")
        plot = pd.DataFrame({"step": [s for s, _ in job.steps], "loss": [loss for _, loss in job.steps]})
        archive = str(job.archive) if job.archive else None
        refreshed = gr.update(choices=self.choices.labels()) if archive else gr.update()
        return job.status(), bar, "\n".join(job.lines[-60:]), plot, archive, refreshed

    def cancel_training(self) -> str:
        if self.job is None or not self.job.running:
            return "nothing is training"
        self.job.cancel()
        return self.job.status()

    # -- Export ----------------------------------------------------------------------------------
    def export(self, label, formats, outtype):
        from ..export.run import ExportOptions, export

        if not formats:
            raise page_error(ValueError("pick at least one format"))
        weights = self.choices.path_of(label)
        # under outputs/, which the page may serve files from (and where the user finds them again)
        out = self.outputs_dir / "exports" / time.strftime("%Y%m%d-%H%M%S")
        try:
            files = export(formats, out, weights, self.choices.base_model,
                           ExportOptions(outtype=outtype, progress=False))
        except UserError as err:
            raise page_error(err) from None
        return [str(p) for p in files]

    def upload_adapter(self, path):
        import gradio as gr

        if not path:
            return gr.update(), gr.update()
        label = self.choices.add_upload(path)
        try:
            self.choices.model(label)
        except UserError as err:
            self.choices.extra.pop(label, None)
            raise page_error(err) from None
        labels = self.choices.labels()
        return gr.update(choices=labels, value=label), gr.update(choices=labels)

    # -- Layout ----------------------------------------------------------------------------------
    def build(self):
        import gradio as gr

        labels = self.choices.labels()
        with gr.Blocks(title="alpaca-tune") as page:
            gr.Markdown("# alpaca-tune\nAsk your fine-tune, compare it side by side, train on your own data, "
                        "export it.")
            with gr.Tab("Ask"):
                with gr.Row():
                    with gr.Column(scale=2):
                        model = gr.Dropdown(choices=labels, value=self.choices.default(), label="model",
                                            elem_id="ask-model")
                        upload = gr.File(label="or upload an adapter archive (adapter.tar.gz)", type="filepath",
                                         elem_id="ask-upload",
                                         file_types=[".gz", ".tar"], height=110)
                        instruction = gr.Textbox(label="instruction", lines=3, elem_id="ask-instruction")
                        context = gr.Textbox(label="input (optional)", lines=2, elem_id="ask-input")
                        with gr.Row():
                            submit = gr.Button("Submit", variant="primary", elem_id="ask-submit")
                            stop = gr.Button("Stop", elem_id="ask-stop")
                        answer = gr.Textbox(label="answer", lines=10, elem_id="ask-answer", interactive=False)
                        with gr.Accordion("prompt as the model saw it", open=False):
                            prompt_seen = gr.Textbox(show_label=False, lines=8, elem_id="ask-prompt",
                                                     interactive=False)
                    with gr.Column(scale=1):
                        ask_inputs = [setting_component(GenerateSettings, name) for name in self.ask_names]
            with gr.Tab("Compare"):
                with gr.Row():
                    model_a = gr.Dropdown(choices=labels, value=BASE, label="A", elem_id="compare-a")
                    model_b = gr.Dropdown(choices=labels, value=self.choices.default(), label="B", elem_id="compare-b")
                compare_instruction = gr.Textbox(label="instruction", lines=2, elem_id="compare-instruction")
                compare_context = gr.Textbox(label="input (optional)", lines=1)
                compare_button = gr.Button("Compare", variant="primary", elem_id="compare-submit")
                seed_used = gr.Markdown()
                with gr.Row():
                    answer_a = gr.Textbox(label="A's answer", lines=10, interactive=False, elem_id="compare-answer-a")
                    answer_b = gr.Textbox(label="B's answer", lines=10, interactive=False, elem_id="compare-answer-b")
                with gr.Row():
                    prefer = {choice: gr.Button(text, elem_id=f"prefer-{choice.lower()}")
                              for choice, text in (("A", "A is better"), ("tie", "Tie"), ("B", "B is better"))}
                tally = gr.Markdown(self.tally(), elem_id="compare-tally")
            with gr.Tab("Train"):
                data_file = gr.File(label="training data (JSON array or JSONL of Alpaca records)", type="filepath",
                                    file_types=[".json", ".jsonl"], elem_id="train-data", height=140)
                data_check = gr.Markdown(elem_id="train-data-check")
                with gr.Row():
                    train_inputs = [setting_component(TrainSettings, name) for name in TRAIN_FIELDS]
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="train-start")
                    cancel = gr.Button("Cancel", elem_id="train-cancel")
                status = gr.Markdown(elem_id="train-status")
                progress = gr.HTML(elem_id="train-progress-box")
                loss_plot = gr.LinePlot(x="step", y="loss", title="training loss", elem_id="train-loss")
                archive = gr.File(label="adapter archive", interactive=False, elem_id="train-archive")
                log_box = gr.Textbox(label="log", lines=12, max_lines=12, interactive=False, elem_id="train-log")
                timer = gr.Timer(1.0)
            with gr.Tab("Export"):
                export_model = gr.Dropdown(choices=labels, value=self.choices.default(), label="model")
                formats = gr.CheckboxGroup(choices=["hf", "meta", "gguf", "gguf-lora", "ollama"], value=["gguf"],
                                           label="formats")
                outtype = gr.Dropdown(choices=["f32", "f16", "bf16", "q8_0"], value="f16", label="gguf outtype")
                export_button = gr.Button("Export", variant="primary", elem_id="export-submit")
                exported = gr.File(label="files", file_count="multiple", interactive=False, elem_id="export-files")

            asked = submit.click(self.ask, [model, instruction, context, *ask_inputs], [answer, prompt_seen])
            stop.click(None, None, None, cancels=[asked])
            upload.upload(self.upload_adapter, [upload], [model, model_b])
            compare_button.click(self.compare, [model_a, model_b, compare_instruction, compare_context, *ask_inputs],
                                 [answer_a, answer_b, seed_used])
            for choice, button in prefer.items():
                button.click(lambda a, b, i, x, y, c=choice: self.prefer(c, a, b, i, x, y),
                             [model_a, model_b, compare_instruction, answer_a, answer_b], [tally])
            data_file.change(self.check_data, [data_file], [data_check])
            start.click(self.start_training, [data_file, *train_inputs], [status])
            cancel.click(self.cancel_training, None, [status])
            timer.tick(self.training_view, None, [status, progress, log_box, loss_plot, archive, model])
            export_button.click(self.export, [export_model, formats, outtype], [exported])
        return page
