"""The batch scheduler: each request's answer in a batch is the one it gets alone, whatever joins,
leaves or is cancelled meanwhile; seeds hold per request; the KV budget queues, never crashes."""

import threading
import time

import pytest

from alpaca_tune.serving.generation import TimeLimitError
from alpaca_tune.serving.instruct import InstructModel
from alpaca_tune.serving.lean.llama import LeanLlama
from alpaca_tune.serving.scheduler import CapacityError, Scheduler
from alpaca_tune.settings import GenerateSettings

PROMPTS = ["Tell me about alpacas.", "Hi", "Name three colours and say why each one is nice to look at.",
           "Translate to French: thank you very much, my friend.", "Why?", "Write a short poem about the sea."]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    served = InstructModel.load(None, base_model=str(tiny_model_dir))
    assert isinstance(served.decoder, LeanLlama)
    return served


def settings(prompt, **change):
    return GenerateSettings(prompt=prompt, **{"temperature": 0.0, "max_new_tokens": 24,
                                              "prompt_template": "alpaca_short", **change})


@pytest.fixture
def scheduler(model):
    running = model.batching(8)
    yield running
    running.close()


def answer(model, scheduler, setting) -> str:
    return "".join(model.submit(scheduler, setting))


def alone(model, setting) -> str:
    """The request through a scheduler of its own, one slot."""
    single = model.batching(1)
    try:
        return answer(model, single, setting)
    finally:
        single.close()


def test_alone_in_the_scheduler_equals_the_one_sequence_loop(model):
    for prompt in PROMPTS[:3]:
        assert alone(model, settings(prompt)) == "".join(model.stream(settings(prompt)))


def test_a_batch_of_mixed_lengths_gives_each_its_answer_alone(model, scheduler):
    wanted = [settings(p, max_new_tokens=n) for p, n in zip(PROMPTS, [24, 5, 40, 12, 30, 1])]
    expected = [alone(model, s) for s in wanted]
    streams = [model.submit(scheduler, s) for s in wanted]  # all queued before the first step
    assert ["".join(stream) for stream in streams] == expected
    assert scheduler.load == {"running": 0, "waiting": 0, "kv_reserved": 0}


def test_requests_joining_and_leaving_mid_way(model, scheduler, monkeypatch):
    """Those that join while others decode read their prompts in the decoding rows' steps
    (feed_batch_and_piece) and still answer as alone."""
    first = [settings(PROMPTS[0], max_new_tokens=60), settings(PROMPTS[1], max_new_tokens=8)]
    later = [settings(p) for p in PROMPTS[2:5]]
    expected = [alone(model, s) for s in first + later]
    pieces = []
    inner = scheduler._feed_batch_and_piece
    monkeypatch.setattr(scheduler, "_feed_batch_and_piece", lambda feeds, tokens, feed, ids: (
        pieces.append((len(feeds), len(ids))), inner(feeds, tokens, feed, ids))[1])
    streams = [model.submit(scheduler, s) for s in first]
    chunks = iter(streams[0])
    head = [next(chunks), next(chunks)]  # the first request is decoding: the others join now
    streams += [model.submit(scheduler, s) for s in later]
    got = ["".join(head) + "".join(chunks)] + ["".join(stream) for stream in streams[1:]]
    assert got == expected
    assert len(pieces) >= len(later) and all(rows >= 1 and length >= 1 for rows, length in pieces)


def test_seeded_sampling_is_the_same_in_any_company(model, scheduler):
    sampled = settings(PROMPTS[0], temperature=0.9, top_k=20, top_p=0.8, repetition_penalty=1.2, seed=5)
    expected = alone(model, sampled)
    streams = [model.submit(scheduler, s) for s in (settings(PROMPTS[2]), sampled, settings(PROMPTS[3], seed=9))]
    assert "".join(streams[1]) == expected
    assert "".join(streams[0]) == alone(model, settings(PROMPTS[2]))


def test_a_cancelled_request_leaves_and_the_others_are_unchanged(model, scheduler):
    keep = [settings(PROMPTS[0], max_new_tokens=40), settings(PROMPTS[2], max_new_tokens=40)]
    expected = [alone(model, s) for s in keep]
    doomed = model.submit(scheduler, settings(PROMPTS[3], max_new_tokens=400, temperature=1.0, seed=1))
    streams = [model.submit(scheduler, s) for s in keep]
    chunks = iter(doomed)
    next(chunks)
    doomed.cancel()
    at_cancel = doomed.output_tokens
    list(chunks)  # what was already on its way, then the end
    assert doomed.output_tokens - at_cancel <= 1  # it left at the next step (one may be under way)
    assert ["".join(stream) for stream in streams] == expected


def test_a_small_kv_budget_queues_requests_in_order(model):
    tight = Scheduler(model.decoder, model.tokenizer, max_batch=8, kv_budget_tokens=100)
    try:
        wanted = [settings(p, max_new_tokens=30) for p in PROMPTS[:4]]  # 40-85 positions each: not all at once
        expected = [alone(model, s) for s in wanted]
        streams = [model.submit(tight, s) for s in wanted]
        seen_waiting = tight.load["waiting"]
        assert ["".join(stream) for stream in streams] == expected
        assert seen_waiting >= 1 and streams[-1].queue_time > 0
        with pytest.raises(CapacityError, match="needs .* KV-cache positions; the server has 100"):
            model.submit(tight, settings(PROMPTS[0], max_new_tokens=200))
    finally:
        tight.close()


def test_the_time_limit_ends_a_request_with_a_message(model):
    limited = Scheduler(model.decoder, model.tokenizer, max_batch=4, kv_budget_tokens=10_000, time_limit_s=1e-6)
    try:
        stream = model.submit(limited, settings(PROMPTS[0]))
        with pytest.raises(TimeLimitError, match="the server's time limit"):
            "".join(stream)
    finally:
        limited.close()


def test_requests_from_many_threads(model, scheduler):
    wanted = [settings(PROMPTS[i % len(PROMPTS)], max_new_tokens=10 + i) for i in range(12)]
    expected = [alone(model, s) for s in wanted]
    got = [None] * len(wanted)

    def ask(index):
        got[index] = answer(model, scheduler, wanted[index])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(wanted))]
    for thread in threads:
        thread.start()
        time.sleep(0.005)
    for thread in threads:
        thread.join(60)
    assert got == expected


@pytest.mark.slow
def test_a_soak_of_thousands_of_requests_leaves_nothing_behind(model):
    """3,000 short requests, a tenth of them cancelled: every one ends, nothing stays reserved,
    and the process's memory ends where the first few hundred left it."""
    import resource
    import threading as threads

    soak = model.batching(16)
    try:
        def run(count, offset):
            streams = []
            for index in range(offset, offset + count):
                stream = model.submit(soak, settings(PROMPTS[index % len(PROMPTS)], max_new_tokens=1 + index % 6,
                                                     temperature=0.8, seed=index))
                if index % 10 == 0:
                    stream.cancel()
                streams.append(stream)
            for stream in streams:
                list(stream)
            return streams

        run(500, 0)  # warm: caches, allocator pools, numba
        warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        before = threads.active_count()
        streams = run(2500, 500)
        assert all(stream.output_tokens <= 6 for stream in streams)
        assert soak.load == {"running": 0, "waiting": 0, "kv_reserved": 0}
        assert threads.active_count() == before
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - warm) / 1024
        assert grown_mb < 50, f"peak RSS grew {grown_mb:.0f} MB over 2,500 requests"
    finally:
        soak.close()


def test_a_busy_scheduler_logs_its_batch_and_kv_use(model, caplog):
    """One line per interval while busy, and one more when it falls idle: requests running and
    waiting, the mean batch of the decode steps, tokens/s, the KV-cache positions reserved."""
    import logging
    import re

    busy = Scheduler(model.decoder, model.tokenizer, max_batch=2, kv_budget_tokens=1000, log_every_s=0.0)
    try:
        with caplog.at_level(logging.INFO, logger="alpaca_tune.serving.scheduler"):
            streams = [model.submit(busy, settings(p, max_new_tokens=12)) for p in PROMPTS[:4]]
            for stream in streams:
                list(stream)
            deadline = time.monotonic() + 10
            while busy.load["running"] and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # its idle line
    finally:
        busy.close()
    pattern = re.compile(r"batch: (\d+) running, (\d+) waiting; ([\d.]+) requests a step over (\d+) steps, "
                         r"[\d.]+ tokens/s; KV cache (\d+) of 1000 positions reserved")
    lines = [pattern.search(r.getMessage()) for r in caplog.records if "batch:" in r.getMessage()]
    assert lines and all(lines)
    assert any(int(m[2]) > 0 for m in lines)  # 4 requests, 2 slots: some waited
    assert max(float(m[3]) for m in lines) == 2.0  # two rows a step while both slots decode
    assert max(int(m[5]) for m in lines) > 0
    assert (lines[-1][1], lines[-1][2], lines[-1][5]) == ("0", "0", "0")  # idle: nothing reserved


def test_a_request_whose_prompt_fails_fails_alone(model, scheduler):
    """An error while one request's prompt is read (here: an adapter object the decoder cannot
    apply) ends that request with the error; the others in the batch answer as alone."""
    keep = [settings(PROMPTS[0], max_new_tokens=30), settings(PROMPTS[2], max_new_tokens=30)]
    expected = [alone(model, s) for s in keep]
    streams = [model.submit(scheduler, s) for s in keep]
    prompt_ids, params, stops, _, _ = model.request(settings(PROMPTS[3]))
    broken = scheduler.submit(prompt_ids, params, stops, adapter=object())
    with pytest.raises(AttributeError):
        list(broken)
    assert ["".join(stream) for stream in streams] == expected
    assert scheduler.load == {"running": 0, "waiting": 0, "kv_reserved": 0}
