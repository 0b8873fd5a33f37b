"""Export: the base (+ a trained adapter) written for other programs.

    hf          merged model as Hugging Face safetensors (transformers, vLLM, weights/, train.py)
    meta        consolidated.NN.pth + params.json, Meta's layout (convert_weights.py reads it back)
    gguf        a llama GGUF for llama.cpp and Ollama, f32/f16/bf16/q8_0
    gguf-lora   the adapter alone as a GGUF LoRA (llama.cpp --lora, Ollama ADAPTER)
    ollama      a Modelfile beside a GGUF (and the GGUF LoRA when there is an adapter)

Every format reads the base one tensor at a time and writes into a staging folder that becomes
the output only once it is complete (run.py).
"""

from ..errors import UserError
from ..settings import EXPORT_FORMATS as FORMATS  # noqa: F401  (one list, also train.py's input)


class ExportError(UserError):
    """The export cannot be made; the message names the input and what is wrong."""
