"""The CPU serving backend: a Llama forward in numpy with numba kernels (llama.py, matvec.py)
over the base's safetensors with the adapter merged in (lora_merge.py); no transformers or PEFT
import, so the server is ready in about two seconds."""
