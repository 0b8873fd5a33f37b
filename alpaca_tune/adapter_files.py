"""The names of the files a training run writes and serving reads, defined once.

    adapter.tar.gz                     what train.py returns; COG_WEIGHTS for predict.py
      adapter/adapter_config.json      a plain PEFT adapter (PeftModel.from_pretrained loads it)
      adapter/adapter_model.safetensors
      model/                           instead of adapter/ with finetune_method=full: the whole model
      training_config.json             the resolved settings, base model, prompt template, what ran
      metrics.json                     loss per step, eval loss, tokens/s, wall time
      loss.png                         the loss curve
      export/<format>/                 with export_formats: the run exported (scripts/export.py)
"""

ARCHIVE_NAME = "adapter.tar.gz"
ADAPTER_SUBDIR = "adapter"
MODEL_SUBDIR = "model"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.json"
PLOT_FILE = "loss.png"
EXPORT_SUBDIR = "export"
