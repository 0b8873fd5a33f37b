"""alpaca_tune: Alpaca-LoRA done properly.

The library behind the Cog entry points (predict.py, train.py, convert_weights.py). Nothing in
this package imports cog, so every piece can be used and tested in-process.
"""
