"""POST /predictions on the real Cog server (coglet), with an adapter trained over POST /trainings.

The base is the tiny random Llama (ALPACA_TUNE_BASE); the weights come back from a train server as
a data URI and are handed to predict servers as COG_WEIGHTS: a local file, an http URL, the URI.
Servers listen on free loopback ports and are always stopped (tests/cog_server.py).
"""

from __future__ import annotations

import threading
import time

import pytest
from cog_server import (
    CogServer,
    LocalHTTP,
    data_uri,
    post_input,
    setup_logs_with,
    tiny_env,
    train_over_http,
    wait_until_idle,
)
from conftest import TINY_RECORDS

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0.0, "prompt_template": "alpaca_short"}
LONG = {"prompt": "Tell me about alpacas.", "max_new_tokens": 3000, **GREEDY}  # seconds of tokens (long_base)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, tiny_model_dir):
    """A directory holding adapter.tar.gz, as returned by POST /trainings."""
    workdir = tmp_path_factory.mktemp("http_weights")
    archive = train_over_http(tiny_model_dir, workdir, TINY_RECORDS * 4)
    return archive.parent


@pytest.fixture(scope="module")
def long_base(tmp_path_factory, tiny_model_dir):
    """The tiny model read with a context of 8192 positions, so that a request can run for
    seconds (cancels, concurrency): the tiny model decodes a token in well under a millisecond."""
    import json
    import shutil

    directory = tmp_path_factory.mktemp("long_base") / "model"
    shutil.copytree(tiny_model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return directory


@pytest.fixture(scope="module")
def server(weights_dir, long_base):
    with CogServer("predict", env=tiny_env(long_base),
                   weights=weights_dir / "adapter.tar.gz") as running:
        running.wait_ready()
        yield running


@pytest.fixture(scope="module")
def base_server(long_base):
    """The base alone, which answers LONG greedily for thousands of tokens (the adapter trained
    here ends its answers after a few dozen): for cancels mid-answer."""
    with CogServer("predict", env=tiny_env(long_base)) as running:
        running.wait_ready()
        yield running


@pytest.fixture(scope="module")
def web(weights_dir):
    """Serves the adapter archive over http and records webhook POSTs."""
    with LocalHTTP(weights_dir) as running:
        yield running


def predict(server, **inputs):
    return post_input(server, "/predictions", inputs)


def at_once(target, calls: list[tuple], timeout: float = 120) -> None:
    """target(*args) for every args of `calls`, each on its own thread, all started together."""
    threads = [threading.Thread(target=target, args=args) for args in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


def text_of(body) -> str:
    assert body["status"] == "succeeded", body
    return "".join(body["output"])


def test_ready_with_the_adapter_and_schema(server):
    health = setup_logs_with(server, "adapter loaded from")
    assert health["status"] == "READY"
    assert "adapter loaded from" in health["setup"]["logs"]
    code, schema = server.request("GET", "/openapi.json")
    assert code == 200 and schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True


def test_sync_prediction(server):
    body = predict(server, prompt="Tell me about alpacas.", max_new_tokens=12, **GREEDY)
    # a ConcatenateIterator comes back as its list of chunks; the answer is their concatenation
    assert isinstance(body["output"], list) and all(isinstance(c, str) for c in body["output"])
    text = text_of(body)
    assert text and "### Instruction" not in text and "Tell me about alpacas." not in text
    assert body["metrics"]["predict_time"] > 0
    again = predict(server, prompt="Tell me about alpacas.", max_new_tokens=12, **GREEDY)
    assert text_of(again) == text  # greedy: deterministic


def test_streaming_sends_chunks_before_completion(base_server):
    events = []
    wait_until_idle(base_server)
    started = time.monotonic()
    for event, data, at in base_server.events("/predictions", {"input": {**LONG, "max_new_tokens": 1500}}):
        if event == "http":
            assert data["status"] == 200 and data["content_type"].startswith("text/event-stream"), data
            continue
        events.append((event, data, at))
    kinds = [event for event, _, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "completed", kinds
    outputs = [(data, at) for event, data, at in events if event == "output"]
    completed, completed_at = events[-1][1], events[-1][2]
    assert len(outputs) > 10, f"the tiny model stopped after {len(outputs)} chunks"
    # live: the first chunk comes long before the answer ends (coglet collects an async
    # generator's chunks until its end; predict returns a plain iterator, which it streams)
    assert outputs[0][1] - started < (completed_at - started) / 3, (outputs[0][1] - started, completed_at - started)
    assert [data["index"] for data, _ in outputs] == list(range(len(outputs)))
    assert completed["status"] == "succeeded"
    assert "".join(data["chunk"] for data, _ in outputs) == "".join(completed["output"])


def test_stop_sequences(server):
    inputs = dict(prompt="Name three colours.", max_new_tokens=20, **GREEDY)
    full = text_of(predict(server, **inputs))
    # a two-character stop that first occurs after the start (stop sequences are stripped of
    # surrounding spaces when parsed, so take one without whitespace)
    starts = [i for i in range(1, len(full) - 1)
              if not any(c.isspace() for c in full[i:i + 2]) and full.find(full[i:i + 2]) == i]
    if not starts:
        pytest.skip("the tiny model's answer has nothing to cut")
    stop = full[starts[0]:starts[0] + 2]
    expected = full[:starts[0]]
    assert text_of(predict(server, **inputs, stop_sequences=f"{stop},zzzz")) == expected
    wait_until_idle(server)
    streamed = [data["chunk"] for event, data, _ in server.events(
        "/predictions", {"input": {**inputs, "stop_sequences": f"{stop},zzzz"}}) if event == "output"]
    assert "".join(streamed) == expected


@pytest.mark.parametrize("inputs, field", [
    ({"prompt": "Hi", "max_new_tokens": "many"}, "max_new_tokens"),      # wrong type
    ({"prompt": "Hi", "temperature": "hot"}, "temperature"),             # wrong type
    ({"prompt": 42}, "prompt"),                                          # wrong type
    ({"prompt": "Hi", "top_p": 1.5}, "top_p"),                           # out of range
    ({"prompt": "Hi", "max_new_tokens": 0}, "max_new_tokens"),           # out of range
    ({"prompt": "Hi", "seed": -2}, "seed"),                              # out of range
    ({"input": "no prompt"}, "prompt"),                                  # missing required
    ({"prompt": ""}, "prompt"),                                          # empty (min_length 1)
    ({"prompt": "Hi", "top_k": None}, "top_k"),                          # explicit null: omit it instead
])
def test_invalid_inputs_are_refused_with_422(server, inputs, field):
    wait_until_idle(server)  # a 409 from the previous test's slot must not mask the 422
    code, body = server.post("/predictions", {"input": inputs})
    assert code == 422, body
    assert any(error["loc"] == ["body", "input", field] for error in body["detail"]), body


def test_malformed_requests_never_break_the_server(server):
    assert server.post("/predictions", b"{not json", {"Content-Type": "application/json"})[0] == 400
    assert server.post("/predictions", b"prompt=hi", {"Content-Type": "text/plain"})[0] == 415
    wait_until_idle(server)
    code, body = server.post("/predictions", {"input": {"prompt": "Hi", "unknown_field": 1, "max_new_tokens": 2}})
    assert code == 200 and body["status"] == "succeeded"  # unknown inputs are dropped, as on Replicate
    assert wait_until_idle(server, timeout=5)["status"] == "READY"


def test_a_failed_prediction_does_not_break_the_next(server):
    # valid for the schema, refused by the model: the run fails with the library's message
    failed = predict(server, prompt="Hi", prompt_template="no-such-template")
    assert failed["status"] == "failed" and "no-such-template" in failed["error"]
    assert text_of(predict(server, prompt="Hi", max_new_tokens=4, **GREEDY)) is not None


def _probe_paths(tmp_path):
    """Paths to probe with: a JSON template that exists (then is removed), and a FIFO, which would
    block whoever opened it, so a request that opened it would never be answered."""
    import json
    import os

    template = tmp_path / "secret.json"
    template.write_text(json.dumps({"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction}",
                                    "response_split": ""}))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    return template, fifo


def test_prompt_template_never_opens_a_server_path(server, tmp_path):
    template, fifo = _probe_paths(tmp_path)
    errors = {}
    for spec in (str(template), str(fifo), "/etc/passwd", "../../../../etc/passwd", "/proc/self/environ"):
        wait_until_idle(server)
        code, body = server.post("/predictions", {"input": {"prompt": "hi", "prompt_template": spec}}, timeout=30)
        assert code == 200 and body["status"] == "failed", body
        errors[spec] = body["error"]
        assert body["error"].endswith(": not a template name (alpaca, alpaca_short, none) nor an inline JSON "
                                      "template {\"prompt_input\": ..., \"prompt_no_input\": ..., \"response_split\": "
                                      "...}; a template file is given locally with --prompt_template_file"), body["error"]
    template.unlink()  # the same path, now missing: the same answer
    again = predict(server, prompt="hi", prompt_template=str(template))
    assert again["error"] == errors[str(template)]
    inline = '{"prompt_input": "{instruction} {input}", "prompt_no_input": "Q: {instruction}\\nA:", "response_split": ""}'
    assert text_of(predict(server, prompt="Hi", max_new_tokens=4, temperature=0.0, prompt_template=inline)) is not None


def test_a_prediction_past_the_server_time_limit_fails_with_a_message(tiny_model_dir):
    env = {**tiny_env(tiny_model_dir), "ALPACA_TUNE_MAX_PREDICT_SECONDS": "1e-6"}  # past it at the first token
    with CogServer("predict", env=env) as limited:
        limited.wait_ready()
        body = predict(limited, prompt="Tell me about alpacas.", max_new_tokens=8192, **GREEDY)
        assert body["status"] == "failed", body
        assert "TimeLimitError: stopped after 1e-06 s and 0 tokens: the server's time limit" in body["error"], body
        assert "Traceback" not in body["error"] and "Traceback" not in body["logs"]
        assert wait_until_idle(limited, timeout=5)["status"] == "READY"


# coglet 0.23.1 acknowledges a cancel of an async prediction at once, but goes on pulling the
# answer's iterator to its end before it reports the prediction canceled (it delivers no cancel
# into the iterator): the request keeps its place in the batch until its answer ends
# (max_new_tokens, EOS, or the server's time limit). These tests hold what the server promises:
# the cancel is taken, the prediction ends "canceled", and the next request is served normally.
def test_cancel_during_streamed_generation(base_server):
    chunks, last = 0, None
    wait_until_idle(base_server)
    for event, data, _ in base_server.events("/predictions", {"id": "cancel-stream", "input": LONG}):
        if event == "output":
            chunks += 1
            if chunks == 3:
                assert base_server.post("/predictions/cancel-stream/cancel")[0] == 200
        last = (event, data)
    assert last[0] == "completed" and last[1]["status"] == "canceled", last
    assert base_server.post("/predictions/cancel-stream/cancel")[0] == 404  # ended: nothing left to cancel
    wait_until_idle(base_server)
    assert text_of(predict(base_server, prompt="Hi", max_new_tokens=4, **GREEDY))


def test_cancel_during_sync_prediction(base_server):
    result = {}
    wait_until_idle(base_server)
    thread = threading.Thread(target=lambda: result.update(
        answer=base_server.put("/predictions/cancel-sync", {"input": LONG})))
    thread.start()
    time.sleep(0.5)  # into the generation (one slot of 16 busy: the server still says READY)
    assert base_server.post("/predictions/cancel-sync/cancel")[0] == 200
    thread.join(60)
    code, body = result["answer"]
    assert code == 200 and body["status"] == "canceled", body
    assert base_server.post("/predictions/unknown-id/cancel")[0] == 404
    wait_until_idle(base_server)
    assert text_of(predict(base_server, prompt="Hi", max_new_tokens=4, **GREEDY))


def test_concurrent_requests_are_answered_together_each_as_alone(base_server):
    """Below the declared concurrency no request gets 409, and each answer is the one the request
    gets alone: the batch scheduler decodes them in the same steps."""
    prompts = ["Tell me about alpacas.", "Name three colours.", "Hi", "Translate thank you to French, please."]
    alone = {p: text_of(predict(base_server, prompt=p, max_new_tokens=64, **GREEDY)) for p in prompts}
    results: dict[str, tuple] = {}

    def ask(prompt):
        results[prompt] = base_server.post("/predictions", {"input": {"prompt": prompt, "max_new_tokens": 64, **GREEDY}})

    wait_until_idle(base_server)
    at_once(ask, [(p,) for p in prompts * 2])  # 8 at once, below 16
    for prompt in prompts:
        code, body = results[prompt]
        assert code == 200, body
        assert text_of(body) == alone[prompt]
        assert body["metrics"]["output_token_count"] >= 1 and body["metrics"]["queue_time"] >= 0
        assert body["metrics"]["input_token_count"] > 3 and body["metrics"]["time_to_first_token"] > 0


def test_beyond_the_declared_concurrency_a_request_gets_409(long_base):
    with CogServer("predict", env={**tiny_env(long_base), "COG_MAX_CONCURRENCY": "2"}) as small:
        small.wait_ready()
        for name in ("long-1", "long-2"):
            code, body = small.put(f"/predictions/{name}", {"input": LONG}, headers={"Prefer": "respond-async"})
            assert code == 202, body
        try:
            deadline = time.monotonic() + 30
            code, body = small.post("/predictions", {"input": {"prompt": "Hi", "max_new_tokens": 1}})
            while code != 409 and time.monotonic() < deadline:  # until both slots are taken
                time.sleep(0.02)
                code, body = small.post("/predictions", {"input": {"prompt": "Hi", "max_new_tokens": 1}})
            assert code == 409, body
        finally:
            small.post("/predictions/long-1/cancel")
            small.post("/predictions/long-2/cancel")
        wait_until_idle(small)
        assert text_of(predict(small, prompt="Hi", max_new_tokens=4, **GREEDY))


def test_back_to_back_requests_succeed_once_the_server_says_ready(server):
    for _ in range(20):
        assert text_of(predict(server, prompt="Hi", max_new_tokens=2, **GREEDY)) is not None


def test_async_prediction_sends_the_terminal_state_to_the_webhook(server, web):
    inputs = dict(prompt="Tell me about alpacas.", max_new_tokens=12, **GREEDY)
    expected = text_of(predict(server, **inputs))
    wait_until_idle(server)
    code, body = server.post("/predictions", {"input": inputs, "webhook": web.url("/hook/async-1"),
                                              "webhook_events_filter": ["start", "completed"]},
                             headers={"Prefer": "respond-async"})
    assert code == 202 and body["status"] == "starting", body
    prediction_id = body["id"]
    _, final = web.wait_for_post(lambda path, data: path == "/hook/async-1" and isinstance(data, dict)
                                 and data.get("status") in ("succeeded", "failed", "canceled"))
    assert final["id"] == prediction_id and final["status"] == "succeeded"
    assert "".join(final["output"]) == expected
    wait_until_idle(server)


def test_weights_from_an_http_url_or_a_data_uri(server, web, weights_dir, tiny_model_dir):
    """COG_WEIGHTS as an http URL (downloaded in setup) or as the data: URI /trainings returned."""
    inputs = dict(prompt="Tell me about alpacas.", max_new_tokens=12, **GREEDY)
    from_file = text_of(predict(server, **inputs))
    env = tiny_env(tiny_model_dir)
    uri = data_uri(weights_dir / "adapter.tar.gz", "application/x-tar")
    with CogServer("predict", env=env, weights=web.url("adapter.tar.gz")) as by_url, \
            CogServer("predict", env=env, weights=uri) as by_uri:
        for other in (by_url, by_uri):
            other.wait_ready()
            assert text_of(predict(other, **inputs)) == from_file  # the same adapter


def test_corrupt_weights_fail_setup_clearly(tmp_path, tiny_model_dir):
    broken = tmp_path / "weights.tar.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with CogServer("predict", env=tiny_env(tiny_model_dir), weights=broken) as bad:
        health = bad.wait_for(("READY", "SETUP_FAILED"))
        assert health["status"] == "SETUP_FAILED"
        health = setup_logs_with(bad, f"{broken}: not a readable adapter archive")
        assert f"{broken}: not a readable adapter archive" in health["setup"]["logs"]
        code, body = bad.post("/predictions", {"input": {"prompt": "Hi"}})
        assert code == 503 and body["status"] == "failed", body
        assert bad.health()["status"] == "SETUP_FAILED"  # still up, still saying why


def test_lora_weights_chooses_the_adapter_per_request(server, base_server, weights_dir, tmp_path):
    """The base-only server given the adapter per request answers as the server that has it as
    COG_WEIGHTS; a server path is refused with one message, whatever exists there."""
    from alpaca_tune.serving.adapters import REFUSED

    uri = data_uri(weights_dir / "adapter.tar.gz", "application/gzip")
    for prompt in ("Tell me about alpacas.", "Name three colours."):
        inputs = dict(prompt=prompt, max_new_tokens=16, **GREEDY)
        assert text_of(predict(base_server, **inputs, lora_weights=uri)) == text_of(predict(server, **inputs))
    (tmp_path / "adapter.tar.gz").write_bytes((weights_dir / "adapter.tar.gz").read_bytes())
    for spec in (str(tmp_path / "adapter.tar.gz"), str(tmp_path / "missing.tar.gz"), "/etc/passwd"):
        failed = predict(base_server, prompt="Hi", lora_weights=spec)
        assert failed["status"] == "failed" and failed["error"].endswith(REFUSED), failed


def test_a_request_cancelled_while_it_waits_leaves_at_once(long_base):
    """A request waiting for room (here: the KV budget holds one LONG request) is still inside the
    coroutine coglet cancels: it ends "canceled" at once, while the one before it still runs."""
    env = {**tiny_env(long_base), "COG_MAX_CONCURRENCY": "4", "ALPACA_TUNE_KV_BUDGET_TOKENS": "4000"}
    with CogServer("predict", env=env) as small:
        small.wait_ready()
        code, body = small.put("/predictions/first", {"input": LONG}, headers={"Prefer": "respond-async"})
        assert code == 202, body
        result = {}
        waiting = threading.Thread(target=lambda: result.update(answer=small.put("/predictions/waiting",
                                                                                 {"input": LONG})))
        waiting.start()
        time.sleep(0.5)  # queued behind the first: 2 x 3026 positions do not fit 4000
        assert small.post("/predictions/waiting/cancel")[0] == 200
        waiting.join(30)
        code, body = result["answer"]
        assert code == 200 and body["status"] == "canceled", body
        assert small.post("/predictions/first/cancel")[0] == 200  # the first is still running


def test_the_transformers_path_batches_callers_with_their_own_adapters(tiny_qwen2_dir, tmp_path):
    """A base the lean path does not run (Qwen2) served by the real server: 9 callers at once,
    mixing two adapters trained here (lora_weights) and none, each answered as that adapter gives
    it served alone (merged, in-process); no 409 below the declared concurrency."""
    import json

    from alpaca_tune.serving.instruct import InstructModel
    from alpaca_tune.settings import GenerateSettings, TrainSettings
    from alpaca_tune.training.loop import run_training

    data = tmp_path / "data.json"
    data.write_text(json.dumps(TINY_RECORDS * 4))
    archives = {}
    for name, seed in (("one", 1), ("two", 2)):
        archives[name] = run_training(TrainSettings(
            train_data=str(data), base_model=str(tiny_qwen2_dir), output_dir=str(tmp_path / name), max_steps=6,
            learning_rate=2e-2, warmup_steps=0, train_batch_size=4, gradient_accumulation_steps=1, val_set_size=0,
            lora_target_modules="q_proj,v_proj", prompt_template="alpaca_short", seed=seed)).archive
    plan = [(prompt, name) for prompt in ("Tell me about alpacas.", "Name three colours.", "Hi")
            for name in ("one", "two", None)]
    alone = {}
    for name in ("one", "two", None):
        served = InstructModel.load(str(archives[name]) if name else None, base_model=str(tiny_qwen2_dir))
        for prompt, _ in plan:
            alone[prompt, name] = "".join(served.stream(GenerateSettings(prompt=prompt, max_new_tokens=24, **GREEDY)))
    results = {}
    with CogServer("predict", env=tiny_env(tiny_qwen2_dir)) as running:
        running.wait_ready()
        assert "serving through transformers" in running.health()["setup"]["logs"]

        def ask(prompt, name):
            inputs = {"prompt": prompt, "max_new_tokens": 24, **GREEDY}
            if name:
                inputs["lora_weights"] = data_uri(archives[name], "application/gzip")
            results[prompt, name] = running.post("/predictions", {"input": inputs})

        at_once(ask, plan)
    for item in plan:
        code, body = results[item]
        assert code == 200, body
        assert text_of(body) == alone[item], item
    assert len(set(alone.values())) > 3  # the adapters change the answers
