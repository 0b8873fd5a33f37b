"""Continuous batching: one thread owns the model and advances every running request by one
token per step, so that many callers share each pass over the weights.

Requests are submitted from any thread (coglet's event loop, a test) and wait in a FIFO queue
until there is a slot (at most `max_batch` run at once) and room in the KV-cache budget (each
request reserves its prompt plus max_new_tokens). A step then:
  - drops requests that were cancelled or ran past the time limit (their cache is freed at once);
  - admits waiting requests that fit, in arrival order;
  - feeds one piece (the decoder's prefill_chunk) of one admitted request's prompt, so that a long
    prompt holds the others back by at most one piece per step; when a prompt is in, its first
    token is picked;
  - feeds every decoding request's last token in one batched call (decoder.feed_batch where the
    decoder has it: LeanLlama reads each weight once for all rows), and picks each one's next.
    Where the decoder has feed_batch_and_piece, the prompt piece goes in that same call (LeanLlama:
    a short piece's rows ride in the decoding rows' pass over the weights).
Every log_every_s while busy (and when it falls idle) it logs one line: requests running and
waiting, the mean batch of the decode steps, tokens/s, and the KV-cache positions reserved.
Each request samples with its own TokenPicker (its settings and its own seeded generator) and
assembles its own text (TextAssembler: stop sequences), exactly as generation.stream_text does
for one request alone, so a request's answer does not depend on what else is in the batch
(tests/serving/test_scheduler.py).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .decoder import Decoder, stop_ids
from .generation import TextAssembler, TokenPicker, time_limit_error
from .sampling import SamplingParams

log = logging.getLogger(__name__)

_END = object()


class CapacityError(UserError):
    """A request can never fit the KV-cache budget."""


class Stream:
    """One request's answer as the scheduler makes it: text chunks, then the end or an error.
    Iterate it from any thread (`for chunk in stream`: each wait releases the GIL)."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._head: list = []  # an item first() took and __iter__ still owes
        self.cancelled = threading.Event()
        # metrics, filled in by the scheduler
        self.input_tokens = 0
        self.output_tokens = 0
        self.queue_time = 0.0
        self.time_to_first_token: float | None = None

    def cancel(self) -> None:
        """Leave the batch at the next step (a no-op once the answer ended)."""
        self.cancelled.set()

    def _put(self, item) -> None:
        self._queue.put(item)

    def first(self) -> bool:
        """Wait for the answer's first chunk (or its end, or its error, raised here); False when
        the answer is empty. The chunk is still the first that iterating gives."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._head.append(item)
        return item is not _END

    def __iter__(self):
        while (item := self._head.pop() if self._head else self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass
class _Request:
    prompt_ids: list[int]
    picker: TokenPicker
    text: TextAssembler
    stream: Stream
    capacity: int  # KV positions reserved: prompt + max_new_tokens
    adapter: object = None  # its own adapter's updates (the decoder's feeder applies them)
    shared_prefix: int = 0  # its prompt's first ids that many prompts share (the decoder may keep their KV)
    submitted: float = field(default_factory=time.monotonic)
    exits: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    feed: object = None
    fed: int = 0  # prompt positions fed so far
    token: int | None = None  # the last picked token, fed at the next step


@dataclass
class _Load:
    """What the scheduler did since its last load line."""
    since: float = field(default_factory=time.monotonic)
    steps: int = 0  # batched decode steps
    rows: int = 0  # requests advanced by them, summed
    tokens: int = 0  # tokens picked (a prompt's first token too)


class Scheduler:
    def __init__(self, decoder: Decoder, tokenizer, max_batch: int, kv_budget_tokens: int,
                 time_limit_s: float | None = None, log_every_s: float = 10.0):
        """log_every_s: how often, while busy, a line with the batch size and KV-cache use is
        logged (and once more when the scheduler falls idle)."""
        self.decoder, self.tokenizer = decoder, tokenizer
        self.max_batch, self.kv_budget_tokens, self.time_limit_s = max_batch, kv_budget_tokens, time_limit_s
        self.log_every_s = log_every_s
        self._load = _Load()
        self.eos_ids = stop_ids(decoder, tokenizer)
        self.prefill_chunk = getattr(decoder, "prefill_chunk", None)
        self._feed_batch_and_piece = getattr(decoder, "feed_batch_and_piece", None)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._reserved = 0
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="alpaca-tune-scheduler", daemon=True)
        self._thread.start()

    # -- any thread ------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_sequences: list[str],
               adapter=None, shared_prefix: int = 0) -> Stream:
        """Queue a request; `adapter`: its own unmerged adapter (the decoder's updates), if any;
        `shared_prefix`: as the decoder's feeder takes it."""
        capacity = len(prompt_ids) + params.max_new_tokens
        if capacity > self.kv_budget_tokens:
            raise CapacityError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                                f"needs {capacity} KV-cache positions; the server has {self.kv_budget_tokens} "
                                f"($ALPACA_TUNE_KV_BUDGET_TOKENS): ask for fewer max_new_tokens")
        stream = Stream()
        stream.input_tokens = len(prompt_ids)
        request = _Request(prompt_ids, TokenPicker(prompt_ids, params, self.eos_ids, self.decoder.device),
                           TextAssembler(self.tokenizer, stop_sequences), stream, capacity, adapter, shared_prefix)
        with self._wake:
            if self._closing:
                raise RuntimeError("the scheduler is closed")
            self._waiting.append(request)
            self._wake.notify()
        return stream

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def load(self) -> dict:
        """Requests running and waiting, and KV positions reserved (for logs and tests)."""
        with self._wake:
            return {"running": len(self._running), "waiting": len(self._waiting), "kv_reserved": self._reserved}

    # -- the scheduler's thread --------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._closing or self._waiting or self._running):
                    if self._load.steps or self._load.tokens:
                        self._log_load()  # the last line of a busy spell
                    self._wake.wait()
                if self._closing:
                    for request in [*self._waiting, *self._running]:
                        self._end(request, RuntimeError("the server is shutting down"))
                    self._waiting.clear()
                    return
            try:
                self._step()
            except Exception as err:  # a bug in a step: those requests fail, the server goes on
                log.exception("batch step failed")
                for request in list(self._running):
                    self._end(request, err)
            if time.monotonic() - self._load.since >= self.log_every_s:
                self._log_load()

    def _log_load(self) -> None:
        load, now = self._load, time.monotonic()
        with self._wake:
            running, waiting, reserved = len(self._running), len(self._waiting), self._reserved
        log.info("batch: %d running, %d waiting; %.1f requests a step over %d steps, %.1f tokens/s; KV cache "
                 "%d of %d positions reserved (%.0f%%)", running, waiting, load.rows / max(load.steps, 1),
                 load.steps, load.tokens / max(now - load.since, 1e-9), reserved, self.kv_budget_tokens,
                 100 * reserved / self.kv_budget_tokens)
        self._load = _Load(since=now)

    def _step(self) -> None:
        now = time.monotonic()
        for request in list(self._running):
            if request.stream.cancelled.is_set():
                self._end(request)
            elif self.time_limit_s is not None and now - request.submitted > self.time_limit_s:
                self._end(request, time_limit_error(self.time_limit_s, request.picker.generated))
        self._admit(now)
        prefilling = next((r for r in self._running if r.fed < len(r.prompt_ids)), None)
        decoding = [r for r in self._running if r.token is not None]
        if prefilling is not None and decoding and self._feed_batch_and_piece is not None:
            self._decode(decoding, prefilling)  # the piece goes with the decoding rows' pass
            return
        if prefilling is not None:
            try:
                self._prefill(prefilling)
            except Exception as err:  # its prompt or its adapter: that request fails alone
                log.exception("reading a prompt failed")
                self._end(prefilling, err)
        decoding = [r for r in self._running if r.token is not None]
        if decoding:
            self._decode(decoding)

    def _admit(self, now: float) -> None:
        with self._wake:
            if self.time_limit_s is not None:
                for request in [r for r in self._waiting if now - r.submitted > self.time_limit_s]:
                    self._waiting.remove(request)
                    self._finish(request, time_limit_error(self.time_limit_s, 0))
            while self._waiting and len(self._running) < self.max_batch:
                request = self._waiting[0]
                if request.stream.cancelled.is_set():
                    self._waiting.popleft()
                    self._finish(request)
                    continue
                if self._reserved + request.capacity > self.kv_budget_tokens:
                    break  # FIFO: later requests wait behind this one
                self._waiting.popleft()
                request.stream.queue_time = now - request.submitted
                try:
                    feeder = self.decoder.feeder(request.capacity, request.adapter, request.shared_prefix)
                    request.feed = request.exits.enter_context(feeder)
                except Exception as err:  # no cache for it: that request fails alone
                    log.exception("starting a request failed")
                    self._finish(request, err)
                    continue
                self._reserved += request.capacity
                self._running.append(request)

    def _piece_end(self, request: _Request) -> int:
        """Where the request's next prompt piece ends."""
        return len(request.prompt_ids) if self.prefill_chunk is None else \
            min(len(request.prompt_ids), request.fed + self.prefill_chunk)

    def _prefill(self, request: _Request) -> None:
        end = self._piece_end(request)
        logits = request.feed(request.prompt_ids[request.fed:end])
        request.fed = end
        if end == len(request.prompt_ids):
            self._picked(request, logits)

    def _decode(self, requests: list[_Request], prefilling: _Request | None = None) -> None:
        """One token for each of `requests`, and with them the next piece of `prefilling`'s
        prompt where given (the decoder's feed_batch_and_piece)."""
        self._load.steps += 1
        self._load.rows += len(requests)
        tokens = [r.token for r in requests]
        if prefilling is not None:
            end = self._piece_end(prefilling)
            try:
                logits, last = self._feed_batch_and_piece([r.feed for r in requests], tokens, prefilling.feed,
                                                          prefilling.prompt_ids[prefilling.fed:end])
            except Exception as err:  # taken for its prompt's: that request fails alone, the others step without it
                log.exception("reading a prompt failed")
                self._end(prefilling, err)
            else:
                prefilling.fed = end
                for request, row in zip(requests, logits):
                    self._picked(request, row)
                if end == len(prefilling.prompt_ids):
                    self._picked(prefilling, last)
                return
        feed_batch = getattr(self.decoder, "feed_batch", None)
        if feed_batch is not None:
            logits = feed_batch([r.feed for r in requests], tokens)
        else:
            logits = torch.stack([r.feed([token]) for r, token in zip(requests, tokens)])
        for request, row in zip(requests, logits):
            self._picked(request, row)

    def _picked(self, request: _Request, logits: torch.Tensor) -> None:
        """Pick the request's next token from its logits, hand on its text, end it if done."""
        token = request.picker.pick(logits)
        if token is None:
            self._end(request)
            return
        stream = request.stream
        self._load.tokens += 1
        if stream.time_to_first_token is None:
            stream.time_to_first_token = time.monotonic() - request.submitted
        stream.output_tokens += 1
        chunk = request.text.add(token)
        if chunk:
            stream._put(chunk)
        if request.text.stopped or request.picker.full:
            self._end(request)
        else:
            request.token = token

    def _end(self, request: _Request, error: BaseException | None = None) -> None:
        """Take the request out of the batch, free its cache, and end its stream."""
        with self._wake:
            if request in self._running:
                self._running.remove(request)
                self._reserved -= request.capacity
        request.token = None
        request.exits.close()
        if error is None and not request.stream.cancelled.is_set():
            chunk = request.text.finish()
            if chunk:
                request.stream._put(chunk)
        self._finish(request, error)

    @staticmethod
    def _finish(request: _Request, error: BaseException | None = None) -> None:
        if error is not None:
            request.stream._put(error)
        request.stream._put(_END)
