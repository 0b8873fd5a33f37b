"""Cog predictor: the base model plus a trained adapter, answering instructions as a stream.

    cog predict -i prompt="Tell me about alpacas."
    COG_WEIGHTS=outputs/run/adapter.tar.gz python predict.py --prompt "Tell me about alpacas."

Thin on purpose: Cog Inputs / command-line flags -> GenerateSettings -> alpaca_tune.serving.
"""

import asyncio
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from cog import AsyncConcatenateIterator, BasePredictor, concurrent, streaming

from alpaca_tune.cli import run_or_exit, setup_logging
from alpaca_tune.serving.instruct import InstructModel
from alpaca_tune.serving.limits import concurrency
from alpaca_tune.settings import GenerateSettings, build_parser, validate
from cog_inputs import cog_input, filled_in

G = GenerateSettings
# Requests served at once, batched into each decode step (serving/scheduler.py). `cog build`
# writes it into the image as COG_MAX_CONCURRENCY, the only place coglet reads it from;
# scripts/serve.py sets that variable from this same function.
CONCURRENCY = concurrency()


class Predictor(BasePredictor):
    def setup(self, weights: str | None = None) -> None:
        """weights (COG_WEIGHTS): an adapter archive or directory, an http(s) URL to an archive, or the
        archive as a data: URI."""
        setup_logging()
        self.model = InstructModel.load(weights)
        self.scheduler = self.model.batching(CONCURRENCY)
        # threads that wait for the scheduler, one per slot (asyncio's default pool has min(32, cores + 4))
        self.waits = ThreadPoolExecutor(CONCURRENCY + 1, thread_name_prefix="predict-wait")

    # @streaming: `cog build` (and scripts/cog_schema.py) then mark POST /predictions with
    # x-cog-streaming, so the server answers `Accept: text/event-stream` with chunks as they come.
    # Async, so that coglet runs up to CONCURRENCY of them at once; the model steps run on the
    # scheduler's own thread, never on coglet's event loop. It returns a plain iterator rather than
    # being an async generator: coglet 0.23.1 pulls a returned iterator on a thread of its own and
    # streams each chunk as it comes, but collects an async generator's chunks until its end.
    @concurrent(max=CONCURRENCY)
    @streaming
    async def predict(
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
        lora_weights: str = cog_input(G, "lora_weights"),
    ) -> AsyncConcatenateIterator[str]:
        inputs = filled_in(locals())
        del inputs["self"]
        loop = asyncio.get_running_loop()
        # bad input fails here, before the request is queued; off the event loop, since a new
        # lora_weights is downloaded and unpacked here
        stream = await loop.run_in_executor(self.waits, self.model.submit, self.scheduler, GenerateSettings(**inputs))
        try:
            # Until its first chunk (in the queue, or its prompt being read) a cancel reaches this
            # coroutine and takes the request out at once; once the answer streams from the
            # returned iterator coglet delivers none (docs/SERVING.md).
            await loop.run_in_executor(self.waits, stream.first)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        return self._relay(stream, self.scope)

    @staticmethod
    def _relay(stream, scope) -> Iterator[str]:
        try:
            yield from stream
        finally:  # the answer ended, failed, or its reader went away: leave the batch at the next step
            stream.cancel()
            scope.record_metric("input_token_count", stream.input_tokens)
            scope.record_metric("output_token_count", stream.output_tokens)
            scope.record_metric("queue_time", round(stream.queue_time, 4))
            if stream.time_to_first_token is not None:
                scope.record_metric("time_to_first_token", round(stream.time_to_first_token, 4))


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
