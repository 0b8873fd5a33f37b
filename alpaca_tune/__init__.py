"""alpaca_tune: Alpaca-LoRA done properly.

The library behind the Cog entry points (predict.py, train.py, convert_weights.py). Nothing in
this package imports cog, so every piece can be used and tested in-process.

    data/         records, prompt templates, tokenization, micro-batches
    training/     the LoRA training run (training/cpu/: CPU kernels and patches)
    serving/      base + adapter answering instructions (serving/lean/: the numpy/numba Llama)
    conversion/   Meta's checkpoints -> Hugging Face models
    settings.py errors.py cli.py base_model.py device.py adapter_files.py allocator.py
                  shared by them: inputs, user errors, entry-point glue, which base model,
                  the machine, the names of the files training writes and serving reads, malloc

Arrows run one way: training and serving import data and the shared modules, never each other;
conversion imports only the shared modules.
"""
