"""Cog trainer: Alpaca-format data in, a LoRA adapter archive out.

    cog train -i train_data=@alpaca_data_cleaned.json -i lora_rank=16
    python train.py --train_data alpaca_data_cleaned.json --lora_rank 16      # same, without Docker
    torchrun --nproc_per_node=2 train.py --train_data ...                      # one process per device

Thin on purpose: Cog Inputs / command-line flags -> TrainSettings -> alpaca_tune.training.
"""

import pathlib
import shutil
import sys
import tempfile

from cog import BaseModel, Input, Path  # noqa: F401  (Input: used through cog_input)

from alpaca_tune.cli import run_or_exit, setup_logging
from alpaca_tune.settings import SettingsError, TrainSettings, parse_args, to_args
from alpaca_tune.training.adapter import pack
from alpaca_tune.training.distributed import processes_wanted, relaunch_command
from alpaca_tune.training.loop import run_training
from alpaca_tune.training.outputs import TrainResult
from cog_inputs import cog_input, filled_in

T = TrainSettings


class TrainingOutput(BaseModel):
    weights: Path


def train(
    train_data: Path = cog_input(T, "train_data"),
    num_train_epochs: float = cog_input(T, "num_train_epochs"),
    max_steps: int = cog_input(T, "max_steps"),
    learning_rate: float = cog_input(T, "learning_rate"),
    lr_scheduler: str = cog_input(T, "lr_scheduler"),
    warmup_steps: int = cog_input(T, "warmup_steps"),
    warmup_ratio: float = cog_input(T, "warmup_ratio"),
    weight_decay: float = cog_input(T, "weight_decay"),
    max_grad_norm: float = cog_input(T, "max_grad_norm"),
    train_batch_size: int = cog_input(T, "train_batch_size"),
    gradient_accumulation_steps: int = cog_input(T, "gradient_accumulation_steps"),
    cutoff_len: int = cog_input(T, "cutoff_len"),
    val_set_size: float = cog_input(T, "val_set_size"),
    lora_rank: int = cog_input(T, "lora_rank"),
    lora_alpha: int = cog_input(T, "lora_alpha"),
    lora_dropout: float = cog_input(T, "lora_dropout"),
    lora_target_modules: str = cog_input(T, "lora_target_modules"),
    train_on_inputs: bool = cog_input(T, "train_on_inputs"),
    prompt_template: str = cog_input(T, "prompt_template"),
    precision: str = cog_input(T, "precision"),
    packing: bool = cog_input(T, "packing"),
    group_by_length: bool = cog_input(T, "group_by_length"),
    gradient_checkpointing: bool = cog_input(T, "gradient_checkpointing"),
    torch_compile: bool = cog_input(T, "torch_compile"),
    quantization: str = cog_input(T, "quantization"),
    logging_steps: int = cog_input(T, "logging_steps"),
    eval_steps: int = cog_input(T, "eval_steps"),
    save_steps: int = cog_input(T, "save_steps"),
    seed: int = cog_input(T, "seed"),
    finetune_method: str = cog_input(T, "finetune_method"),
    preset: str = cog_input(T, "preset"),
    sharding: str = cog_input(T, "sharding"),
    num_devices: int = cog_input(T, "num_devices"),
    export_formats: str = cog_input(T, "export_formats"),
) -> TrainingOutput:
    inputs = filled_in(locals())
    if isinstance(train_data, str):
        # coglet downloads a URL or data: URI and passes a Path; a plain string is a path on the
        # server, which no caller may make it read
        raise SettingsError("train_data: send the data file itself (a data: URI or an http(s) URL); "
                            "a path on the server is not read")
    inputs["train_data"] = str(inputs["train_data"])
    setup_logging()
    output_dir = tempfile.mkdtemp(prefix="train-")  # Cog uploads the archive from here when we return
    try:
        result = train_and_export(TrainSettings(**inputs, output_dir=output_dir))
    except BaseException:
        shutil.rmtree(output_dir, ignore_errors=True)  # a failed run leaves nothing behind
        raise
    return TrainingOutput(weights=Path(result.archive))


def train_and_export(settings: TrainSettings) -> TrainResult | None:
    """The run, then its export_formats (scripts/export.py's formats) packed into its archive. Under
    torchrun, rank 0 writes and returns the result; the other ranks return None. Several devices
    wanted outside torchrun: torchrun is started on this file with the same settings."""
    command = relaunch_command(__file__, to_args(settings), processes_wanted(settings.num_devices))
    if command is not None:
        return run_launched(command, settings)
    result = run_training(settings)
    if result is not None and settings.export_formats.strip():
        from alpaca_tune.export.run import export_run

        export_run(result.output_dir, settings.export_formats, settings.base_model)
        result.archive = pack(result.output_dir)
    return result


def run_launched(command: list[str], settings: TrainSettings) -> TrainResult:
    """torchrun's job, its log passed through; a failed job is an error naming its end."""
    import json
    import subprocess

    from alpaca_tune.adapter_files import ARCHIVE_NAME, METRICS_FILE
    from alpaca_tune.errors import UserError

    done = subprocess.run(command)
    output_dir = pathlib.Path(settings.output_dir)
    if done.returncode != 0 or not (output_dir / ARCHIVE_NAME).is_file():
        raise UserError(f"training on {processes_wanted(settings.num_devices)} processes failed (torchrun exit "
                        f"status {done.returncode}); the log above names the rank and the cause")
    metrics = json.loads((output_dir / METRICS_FILE).read_text())
    return TrainResult(output_dir, output_dir / ARCHIVE_NAME, output_dir / "adapter", metrics)


def main(argv=None) -> None:
    settings = parse_args(TrainSettings, argv, "Fine-tune a LoRA adapter on Alpaca-format data.")
    setup_logging()
    result = run_or_exit(train_and_export, settings)
    if result is not None:
        print(f"adapter archive: {result.archive}")


if __name__ == "__main__":
    main(sys.argv[1:])
