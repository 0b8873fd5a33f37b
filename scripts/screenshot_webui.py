"""Refresh docs/webui.png, README's picture of the web page: the page started on the embedded model,
asked a question in headless Chromium, the Ask tab photographed and shrunk under 200 KB.

    python scripts/screenshot_webui.py                 # writes docs/webui.png
    python scripts/screenshot_webui.py --weights outputs/demo/adapter.tar.gz
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 200_000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="an adapter to show (default: the base alone)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "webui.png")
    parser.add_argument("--question", default="Give three tips for staying healthy.")
    args = parser.parse_args(argv)
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, str(ROOT / "scripts" / "webui.py"), "--port", str(port)]
    server = subprocess.Popen(command + (["--weights", args.weights] if args.weights else []), cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                                 headless=True, args=["--no-sandbox"])
            page = browser.new_context(viewport={"width": 1280, "height": 1080}).new_page()
            page.goto(url)
            page.wait_for_selector("#ask-submit")
            page.locator("#ask-instruction textarea").fill(args.question)
            field = page.locator("#setting-temperature input[type=number]").first
            field.fill("0")
            field.press("Enter")
            page.click("#ask-submit")
            answer = page.locator("#ask-answer textarea")
            page.wait_for_function("() => document.querySelector('#ask-answer textarea').value.length > 0",
                                   timeout=120_000)
            seen = None
            while seen != answer.input_value():  # until the answer has stopped growing
                seen = answer.input_value()
                time.sleep(2)
            png = page.screenshot(full_page=False)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    width = image.width
    while True:  # halve the colours, then the size, until it fits
        data = io.BytesIO()
        image.quantize(colors=64).save(data, format="PNG", optimize=True)
        if data.tell() <= LIMIT or width < 400:
            break
        width = int(width * 0.85)
        image = image.resize((width, int(image.height * 0.85)))
    args.output.write_bytes(data.getvalue())
    print(f"{args.output}: {image.width}x{image.height}, {data.tell() / 1000:.0f} KB")


if __name__ == "__main__":
    main(sys.argv[1:])
