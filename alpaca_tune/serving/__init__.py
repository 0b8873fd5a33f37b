"""A base model plus an adapter, answering instructions (predict.py's Predictor uses instruct.py).

    instruct.py              InstructModel: load base + adapter, render the prompt, stream the answer
    decoder.py               the interface generation talks to (context length, EOS ids, a KV-cache feeder)
    generation.py            the token loop, stop sequences, streamed text
    sampling.py              repetition penalty, temperature, top-k, top-p
    tokenizer.py             tokenizer.json through `tokenizers` (no transformers import)
    weights.py               COG_WEIGHTS: archive, directory or URL -> the adapter directory
    transformers_decoder.py  the transformers backend (GPU, other architectures)
    cuda_graph.py            GPU decoding steps replayed as CUDA graphs
    lean/                    the CPU backend: a Llama in numpy/numba with the adapter merged in
"""
