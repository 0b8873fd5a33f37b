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
LONG = {"prompt": "Tell me about alpacas.", "max_new_tokens": 2000, **GREEDY}  # seconds of tokens


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, tiny_model_dir):
    """A directory holding adapter.tar.gz, as returned by POST /trainings."""
    workdir = tmp_path_factory.mktemp("http_weights")
    archive = train_over_http(tiny_model_dir, workdir, TINY_RECORDS * 4)
    return archive.parent


@pytest.fixture(scope="module")
def server(weights_dir, tiny_model_dir):
    with CogServer("predict", env=tiny_env(tiny_model_dir),
                   weights=weights_dir / "adapter.tar.gz") as running:
        running.wait_ready()
        yield running


@pytest.fixture(scope="module")
def web(weights_dir):
    """Serves the adapter archive over http and records webhook POSTs."""
    with LocalHTTP(weights_dir) as running:
        yield running


def predict(server, **inputs):
    return post_input(server, "/predictions", inputs)


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


def test_streaming_sends_chunks_before_completion(server):
    events = []
    busy_after_first_chunk = None
    wait_until_idle(server)
    for event, data, at in server.events("/predictions", {"input": {**LONG, "max_new_tokens": 300}}):
        if event == "http":
            assert data["status"] == 200 and data["content_type"].startswith("text/event-stream"), data
            continue
        events.append((event, data, at))
        if event == "output" and busy_after_first_chunk is None:
            # the first chunk is here while the model is still generating the rest
            busy_after_first_chunk = server.health()["status"]
    kinds = [event for event, _, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "completed", kinds
    outputs = [(data, at) for event, data, at in events if event == "output"]
    completed, completed_at = events[-1][1], events[-1][2]
    assert len(outputs) > 10, f"the tiny model stopped after {len(outputs)} chunks"
    assert busy_after_first_chunk == "BUSY"
    assert outputs[0][1] < completed_at
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


def test_cancel_during_streamed_generation(server):
    chunks, last = 0, None
    wait_until_idle(server)
    for event, data, _ in server.events("/predictions", {"id": "cancel-stream", "input": LONG}):
        if event == "output":
            chunks += 1
            if chunks == 3:
                assert server.post("/predictions/cancel-stream/cancel")[0] == 200
        last = (event, data)
    assert last[0] == "completed" and last[1]["status"] == "canceled", last
    assert chunks < 200  # stopped between tokens, long before max_new_tokens
    wait_until_idle(server)
    assert text_of(predict(server, prompt="Hi", max_new_tokens=4, **GREEDY))


def test_cancel_during_sync_prediction(server):
    result = {}
    wait_until_idle(server)
    thread = threading.Thread(target=lambda: result.update(
        answer=server.put("/predictions/cancel-sync", {"input": LONG})))
    thread.start()
    server.wait_for(("BUSY",), timeout=30, poll=0.01)
    started = time.monotonic()
    assert server.post("/predictions/cancel-sync/cancel")[0] == 200
    thread.join(60)
    code, body = result["answer"]
    assert code == 200 and body["status"] == "canceled", body
    assert time.monotonic() - started < 10
    assert server.post("/predictions/unknown-id/cancel")[0] == 404
    wait_until_idle(server)
    assert text_of(predict(server, prompt="Hi", max_new_tokens=4, **GREEDY))


def test_one_prediction_at_a_time_a_second_gets_409(server):
    """The Predictor declares no @concurrent: one slot; a second request is refused, never queued."""
    wait_until_idle(server)
    code, body = server.put("/predictions/long-one", {"input": LONG}, headers={"Prefer": "respond-async"})
    assert code == 202 and body["status"] == "starting", body
    try:
        server.wait_for(("BUSY",), timeout=30, poll=0.01)
        code, body = server.post("/predictions", {"input": {"prompt": "Hi"}})
        assert code == 409, body
        second_stream = list(server.events("/predictions", {"input": {"prompt": "Hi"}}))
        assert second_stream[0][1]["status"] == 409
    finally:
        server.post("/predictions/long-one/cancel")
    wait_until_idle(server)
    assert text_of(predict(server, prompt="Hi", max_new_tokens=4, **GREEDY))


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
