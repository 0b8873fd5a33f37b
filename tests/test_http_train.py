"""POST /trainings on the real Cog server (coglet) in train mode, with the tiny random Llama as base.

Training data goes in as a data: URI and as an http URL served from a local file server; the
adapter comes back inside the TrainingOutput object as a data URI (a tar.gz that predict servers
take as COG_WEIGHTS: see test_http_predict.py).
"""

from __future__ import annotations

import json
import tarfile
import time

import pytest
from cog_server import (
    FAST_TRAINING,
    CogServer,
    LocalHTTP,
    data_uri,
    post_input,
    save_data_uri,
    tiny_env,
    wait_until_idle,
)
from conftest import TINY_RECORDS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with CogServer("train", env=tiny_env(tiny_model_dir)) as running:
        running.wait_ready()
        yield running


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("http_train_data")
    (directory / "data.json").write_text(json.dumps(TINY_RECORDS * 4))
    (directory / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_RECORDS * 4))
    (directory / "bad.json").write_text(json.dumps([{"instruction": "x", "output": ""}, {"instruction": 3}]))
    return directory


@pytest.fixture(scope="module")
def web(data_dir):
    with LocalHTTP(data_dir) as running:
        yield running


def train(server, **inputs):
    return post_input(server, "/trainings", inputs)


def archive_members(uri: str, tmp_path) -> dict[str, bytes]:
    path = save_data_uri(uri, tmp_path / "adapter.tar.gz")
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_ready_with_the_training_schema(server):
    assert server.health()["status"] == "READY"
    code, schema = server.request("GET", "/openapi.json")
    assert code == 200 and "/trainings" in schema["paths"]
    assert schema["components"]["schemas"]["TrainingInput"]["required"] == ["train_data"]


def test_training_with_a_data_uri(server, data_dir, tmp_path):
    body = train(server, train_data=data_uri(data_dir / "data.json"), **FAST_TRAINING)
    assert body["status"] == "succeeded", body.get("error")
    assert "step 4/4" in body["logs"] and "wrote" in body["logs"]
    members = archive_members(body["output"]["weights"], tmp_path)
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "training_config.json",
            "metrics.json"} <= set(members)
    settings = json.loads(members["training_config.json"])["settings"]
    assert settings["max_steps"] == 4 and settings["prompt_template"] == "alpaca_short"
    adapter_config = json.loads(members["adapter/adapter_config.json"])
    assert adapter_config["r"] == FAST_TRAINING["lora_rank"]


@pytest.mark.parametrize("inputs, field", [
    ({"max_steps": "many"}, "max_steps"),            # wrong type
    ({"train_on_inputs": "perhaps"}, "train_on_inputs"),
    ({"lora_rank": 0}, "lora_rank"),                 # out of range
    ({"learning_rate": 2.0}, "learning_rate"),
    ({"lr_scheduler": "bogus"}, "lr_scheduler"),     # not one of the choices
    ({"quantization": "2bit"}, "quantization"),
])
def test_invalid_training_inputs_are_refused_with_422(server, data_dir, inputs, field):
    code, body = server.post("/trainings", {"input": {"train_data": data_uri(data_dir / "data.json"), **inputs}})
    assert code == 422, body
    assert any(error["loc"] == ["body", "input", field] for error in body["detail"]), body


def test_missing_training_data_is_refused_with_422(server):
    code, body = server.post("/trainings", {"input": {"max_steps": 1}})
    assert code == 422 and body["detail"][0]["loc"] == ["body", "input", "train_data"], body


def test_no_training_input_opens_a_server_path(server, data_dir, tmp_path):
    import os

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # whoever opened it would block: the request would never be answered
    for given in ("/etc/passwd", str(fifo), str(tmp_path / "missing.json")):
        wait_until_idle(server)
        code, body = server.post("/trainings", {"input": {"train_data": given, **FAST_TRAINING}}, timeout=30)
        assert code == 200 and body["status"] == "failed", body
        assert body["error"].endswith("SettingsError: train_data: send the data file itself (a data: URI or an "
                                      "http(s) URL); a path on the server is not read"), body["error"]
        wait_until_idle(server)
        code, body = server.post("/trainings", {"input": {"train_data": data_uri(data_dir / "data.json"),
                                                          **FAST_TRAINING, "prompt_template": given}}, timeout=30)
        assert code == 200 and body["status"] == "failed", body
        assert f"prompt_template={given!r}: not a template name" in body["error"], body["error"]


def test_bad_records_fail_the_training_with_the_reason(server, data_dir):
    body = train(server, train_data=data_uri(data_dir / "bad.json"), **FAST_TRAINING)
    assert body["status"] == "failed"
    assert "record 0" in body["error"] and "record 1" in body["error"], body["error"]
    assert wait_until_idle(server, timeout=5)["status"] == "READY"


def test_cancel_a_training(server, data_dir, web):
    wait_until_idle(server)
    code, body = server.put("/trainings/train-cancel", {
        "input": {"train_data": data_uri(data_dir / "data.json"), **FAST_TRAINING, "max_steps": 100000},
        "webhook": web.url("/hook/train-cancel"), "webhook_events_filter": ["completed"]},
        headers={"Prefer": "respond-async"})
    assert code == 202, body
    server.wait_for(("BUSY",), timeout=30, poll=0.01)
    time.sleep(1.0)  # into the training loop (the tiny model loads in well under a second)
    assert server.post("/trainings/train-cancel/cancel")[0] == 200
    _, final = web.wait_for_post(lambda path, data: path == "/hook/train-cancel", timeout=60)
    assert final["status"] == "canceled", final
    wait_until_idle(server)


def test_training_with_an_http_url_after_a_cancel(server, web, tmp_path):
    body = train(server, train_data=web.url("data.jsonl"), **{**FAST_TRAINING, "max_steps": 2})
    assert body["status"] == "succeeded", body.get("error")
    assert "adapter/adapter_model.safetensors" in archive_members(body["output"]["weights"], tmp_path)
