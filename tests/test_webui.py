"""The web page driven in a real browser: headless Chromium (Debian's package, through Playwright's
Python API) against scripts/webui.py on tiny models. Screenshots of each tab land in
$WEBUI_SCREENSHOTS (default: the test's temp dir), for a person to look at."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RECORDS

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, tiny_tokenizer):
    """A random Llama with an 8192-token context and enough width that a long answer takes seconds
    (what Stop is tested on)."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    directory = tmp_path_factory.mktemp("long_llama")
    torch.manual_seed(0)
    config = tiny_llama_config(len(tiny_tokenizer), hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                               max_position_embeddings=8192)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tiny_tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, long_model_dir):
    from export_fixtures import make_adapter

    run = tmp_path_factory.mktemp("ui_adapter")
    make_adapter(long_model_dir, run, target_modules=["q_proj", "v_proj"])
    return run


@pytest.fixture(scope="module")
def page_server(tmp_path_factory, long_model_dir, adapter_run):
    outputs = tmp_path_factory.mktemp("ui_outputs")
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "webui.py"), "--port", str(port),
                               "--base_model", str(long_model_dir), "--weights", str(adapter_run),
                               "--outputs", str(outputs)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, server.stdout.read()
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert time.monotonic() < deadline, "the page did not come up"
            time.sleep(0.5)
    yield url, outputs
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make install puts it there with apt-get)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, page_server):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    tab = context.new_page()
    tab.goto(page_server[0])
    tab.wait_for_selector("#ask-submit")
    yield tab
    context.close()


def screenshot(tab, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("WEBUI_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def set_number(tab, elem_id: str, value) -> None:
    field = tab.locator(f"#{elem_id} input[type=number]").first
    field.fill(str(value))
    field.press("Enter")


def textbox(tab, elem_id: str):
    return tab.locator(f"#{elem_id} textarea").first


def test_ask_streams_the_predictors_greedy_answer_and_shows_the_prompt(page, long_model_dir, adapter_run, tmp_path):
    from alpaca_tune.serving.instruct import InstructModel
    from alpaca_tune.settings import GenerateSettings

    settings = GenerateSettings(prompt="Tell me about alpacas.", temperature=0, max_new_tokens=16)
    served = InstructModel.load(str(adapter_run), base_model=str(long_model_dir))
    expected = "".join(served.stream(settings))
    textbox(page, "ask-instruction").fill(settings.prompt)
    set_number(page, "setting-temperature", 0)
    set_number(page, "setting-max_new_tokens", 16)
    page.click("#ask-submit")
    page.wait_for_function("e => document.querySelector('#ask-answer textarea').value === e", arg=expected,
                           timeout=60_000)
    page.get_by_text("prompt as the model saw it").click()
    prompt = textbox(page, "ask-prompt").input_value()
    assert prompt == served.template_for(settings).render(settings.prompt)
    screenshot(page, "ask", tmp_path)


def test_stop_ends_a_long_generation(page):
    textbox(page, "ask-instruction").fill("Write a very long story.")
    set_number(page, "setting-temperature", 0)
    set_number(page, "setting-max_new_tokens", 8000)
    page.click("#ask-submit")
    page.wait_for_function("() => document.querySelector('#ask-answer textarea').value.length > 20", timeout=60_000)
    page.click("#ask-stop")
    time.sleep(1.5)
    stopped = textbox(page, "ask-answer").input_value()
    time.sleep(2)
    assert textbox(page, "ask-answer").input_value() == stopped  # nothing more arrives
    assert len(stopped) < 4000  # stopped long before its 8000 tokens


def test_compare_shows_two_answers_and_records_a_preference(page, page_server, tmp_path):
    page.get_by_role("tab", name="Compare").click()
    textbox(page, "compare-instruction").fill("Name three colours.")
    page.click("#compare-submit")
    page.wait_for_function(
        "() => ['a', 'b'].every(s => document.querySelector(`#compare-answer-${s} textarea`).value.length > 0)",
        timeout=120_000)
    time.sleep(1)
    page.wait_for_function("() => !document.querySelector('#compare-submit').disabled")
    page.click("#prefer-a")
    page.wait_for_function("() => document.querySelector('#compare-tally').innerText.includes('1 preference')",
                           timeout=30_000)
    records = [json.loads(line) for line in (page_server[1] / "preferences.jsonl").read_text().splitlines()]
    assert records[-1]["preferred"] == "A" and records[-1]["a"] == "base model alone"
    assert records[-1]["answer_a"] and records[-1]["answer_b"]
    screenshot(page, "compare", tmp_path)


def test_train_from_an_uploaded_file_shows_the_loss_and_the_archive(page, tmp_path):
    page.get_by_role("tab", name="Train").click()
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": ""}]')
    page.set_input_files("#train-data input[type=file]", str(bad))
    page.wait_for_function("() => document.querySelector('#train-data-check').innerText.includes(\"field 'output' "
                           "is empty\")", timeout=30_000)
    page.click("#train-start")
    page.get_by_text("field 'output' is empty").first.wait_for(timeout=30_000)  # refused on the page too
    good = tmp_path / "data.json"
    good.write_text(json.dumps(TINY_RECORDS * 4))
    page.click("#train-data button[aria-label=Clear]")
    page.set_input_files("#train-data input[type=file]", str(good))
    page.wait_for_function("() => document.querySelector('#train-data-check').innerText.includes('16 records')",
                           timeout=30_000)
    set_number(page, "setting-max_steps", 6)
    set_number(page, "setting-val_set_size", 2)
    page.click("#train-start")
    page.wait_for_function("() => document.querySelector('#train-status').innerText.startsWith('done')",
                           timeout=180_000)
    assert page.locator("#train-loss canvas, #train-loss svg").count() > 0
    assert page.locator("#train-archive a").count() > 0  # the download link
    assert "step 6/6" in textbox(page, "train-log").input_value()
    screenshot(page, "train", tmp_path)
    page.get_by_role("tab", name="Ask").click()
    page.click("#ask-model input")  # the new adapter is offered
    page.locator("#ask-model [role=option]", has_text="(outputs/)").first.wait_for(timeout=15_000)


def test_export_offers_the_files_and_a_bad_archive_gets_a_message(page, page_server, tmp_path):
    page.get_by_role("tab", name="Export").click()
    page.get_by_label("gguf-lora").check()
    page.get_by_label("gguf", exact=True).uncheck()
    page.click("#export-submit")
    page.locator("#export-files", has_text="adapter").first.wait_for(timeout=60_000)
    assert list((page_server[1] / "exports").glob("*/adapter.gguf"))
    screenshot(page, "export", tmp_path)
    page.get_by_role("tab", name="Ask").click()
    bad = tmp_path / "adapter.tar.gz"
    bad.write_bytes(b"not an archive")
    page.set_input_files("#ask-upload input[type=file]", str(bad))
    page.get_by_text("not a readable adapter archive").first.wait_for(timeout=30_000)
