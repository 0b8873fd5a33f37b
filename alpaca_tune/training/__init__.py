"""The LoRA training run: loop.py's run_training is the entry (train.py calls it).

    loop.py         the run, in order: settings, data, base, LoRA, steps, evaluation, outputs
    plan.py         which micro-batches make up each optimizer step
    steps.py        one optimizer step, evaluation
    loss.py         LM head + cross-entropy only where there are labels, in chunks
    precision.py    the frozen base's dtype (measured on CPUs)
    model.py        the frozen base (8/4-bit too) and LoRA attached to it
    fast_paths.py   the device/dtype speed-ups, switched on in one place
    checkpoint.py   resumable checkpoints
    progress.py     log lines and the loss plot
    adapter.py      the adapter saved and verified, the archive packed
    outputs.py      what a finished run writes
    cpu/            CPU kernels and patches of transformers/PEFT (attention, norm, dropout,
                    the shared preamble)
"""
