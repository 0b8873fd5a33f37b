"""Training speed-ups for CPUs, each swapped in by training/fast_paths.py and tested against
what it replaces: blockwise bf16 attention, RMSNorm in fewer passes, LoRA dropout drawn as gaps,
and the template's preamble computed once per optimizer step."""
