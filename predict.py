"""Cog predictor: the base model plus a trained adapter, answering instructions as a stream.

    cog predict -i prompt="Tell me about alpacas."
    COG_WEIGHTS=outputs/run/adapter.tar.gz python predict.py --prompt "Tell me about alpacas."

Thin on purpose: Cog Inputs / command-line flags -> GenerateSettings -> alpaca_tune.serving.
"""

import os
import sys

from cog import BasePredictor, ConcatenateIterator, streaming

from alpaca_tune.cli import run_or_exit, setup_logging
from alpaca_tune.serving.instruct import InstructModel
from alpaca_tune.settings import GenerateSettings, build_parser, validate
from cog_inputs import cog_input, filled_in

G = GenerateSettings


class Predictor(BasePredictor):
    def setup(self, weights: str | None = None) -> None:
        """weights (COG_WEIGHTS): an adapter archive or directory, an http(s) URL to an archive, or the
        archive as a data: URI."""
        setup_logging()
        self.model = InstructModel.load(weights)

    # @streaming: `cog build` (and scripts/cog_schema.py) then mark POST /predictions with
    # x-cog-streaming, so the server answers `Accept: text/event-stream` with chunks as they come.
    # No @concurrent: one request at a time (a second one gets 409 while this one runs).
    @streaming
    def predict(
        self,
        prompt: str = cog_input(G, "prompt"),
        input: str = cog_input(G, "input"),
        max_new_tokens: int = cog_input(G, "max_new_tokens"),
        temperature: float = cog_input(G, "temperature"),
        top_p: float = cog_input(G, "top_p"),
        top_k: int = cog_input(G, "top_k"),
        repetition_penalty: float = cog_input(G, "repetition_penalty"),
        stop_sequences: str = cog_input(G, "stop_sequences"),
        seed: int = cog_input(G, "seed"),
        prompt_template: str = cog_input(G, "prompt_template"),
    ) -> ConcatenateIterator[str]:
        inputs = filled_in(locals())
        del inputs["self"]
        yield from self.model.stream(GenerateSettings(**inputs))


def main(argv=None) -> None:
    parser = build_parser(GenerateSettings, "Answer an instruction with the base model + adapter.")
    parser.add_argument("--weights", default=os.environ.get("COG_WEIGHTS", ""),
                        help="adapter archive, directory or URL (default: $COG_WEIGHTS; none: base only)")
    parser.add_argument("--base_model", default="", help="base model directory (default: weights/)")
    args = vars(parser.parse_args(argv))
    weights, base_model = args.pop("weights"), args.pop("base_model")
    settings = GenerateSettings(**args)
    setup_logging()

    def answer():
        validate(settings)
        model = InstructModel.load(weights or None, base_model=base_model)
        for chunk in model.stream(settings):
            print(chunk, end="", flush=True)
        print()

    run_or_exit(answer)


if __name__ == "__main__":
    main(sys.argv[1:])
