"""Load and faults on the real Cog server: 32 clients x 10 requests at a server of 16 slots, with
cancels, malformed bodies, out-of-range inputs and clients that hang up mid-stream mixed in.
Zero 5xx; every answer the one its request gets alone (none lost, none mixed up); every
prediction ends in a terminal state; the server READY afterwards, its memory back near where the
first round left it. Loopback only, bounded in time.
"""

from __future__ import annotations

import random
import threading
import time

import psutil
import pytest
from cog_server import CogServer, run_clients, tiny_env, wait_until_idle

pytestmark = pytest.mark.slow

CLIENTS, REQUESTS = 32, 10
PROMPTS = ["Tell me about alpacas.", "Hi", "Name three colours.", "Why is the sky blue?", "Write a haiku.",
           "Translate to French: thank you.", "What is 2 + 2?", "Give me a word that rhymes with cat."]


def inputs(index: int) -> dict:
    return {"prompt": PROMPTS[index % len(PROMPTS)], "max_new_tokens": 8 + index % 24, "temperature": 0.0,
            "prompt_template": "alpaca_short"}


def worker_rss_mb(server: CogServer) -> float:
    children = psutil.Process(server.process.pid).children(recursive=True)
    return max(child.memory_info().rss for child in children) / 2**20


def post_retrying(server: CogServer, path: str, body, headers=None) -> tuple[int, object]:
    """A client's way with 409 (all slots busy): wait a little and try again."""
    while True:
        code, answer = server.post(path, body, headers, timeout=120)
        if code != 409:
            return code, answer
        time.sleep(random.uniform(0.01, 0.05))


def test_load_with_faults_mixed_in(tiny_model_dir):
    with CogServer("predict", env=tiny_env(tiny_model_dir)) as server:
        server.wait_ready()
        alone = {}
        for index in range(len(PROMPTS) * 24):  # every distinct request, alone
            code, body = server.post("/predictions", {"input": inputs(index)})
            assert code == 200 and body["status"] == "succeeded", body
            alone[index] = "".join(body["output"])
        warm_mb = worker_rss_mb(server)
        statuses, problems = [], []
        lock = threading.Lock()

        def client(number: int) -> None:
            rng = random.Random(number)
            for request in range(REQUESTS):
                index = (number * REQUESTS + request) % len(alone)
                kind = rng.choice(["plain"] * 6 + ["stream", "hang-up", "cancel", "malformed", "out-of-range"])
                if kind == "malformed":
                    code, _ = server.post("/predictions", b"{not json", {"Content-Type": "application/json"})
                    outcome = (kind, code, code == 400)
                elif kind == "out-of-range":
                    code, _ = post_retrying(server, "/predictions", {"input": {**inputs(index), "top_p": 7}})
                    outcome = (kind, code, code == 422)
                elif kind == "cancel":
                    prediction = f"load-{number}-{request}"
                    code, body = post_retrying(server, "/predictions", {"id": prediction, "input": inputs(index)},
                                               {"Prefer": "respond-async"})
                    cancel_code, _ = server.post(f"/predictions/{prediction}/cancel")
                    outcome = (kind, code, code == 202 and cancel_code in (200, 404))
                elif kind in ("stream", "hang-up"):
                    chunks, final, busy = [], None, True
                    while busy:  # 409: all slots busy; try again
                        busy = False
                        for event, data, _ in server.events("/predictions", {"input": inputs(index)}):
                            if event == "http" and data["status"] == 409:
                                busy = True
                                time.sleep(random.uniform(0.01, 0.05))
                                break
                            if event == "output":
                                chunks.append(data["chunk"])
                                if kind == "hang-up":
                                    break  # the client goes away mid-answer
                            if event == "completed":
                                final = data
                    ok = kind == "hang-up" or (final is not None and final["status"] == "succeeded"
                                               and "".join(chunks) == alone[index])
                    outcome = (kind, 200, ok)
                else:
                    code, body = post_retrying(server, "/predictions", {"input": inputs(index)})
                    outcome = (kind, code, code == 200 and body["status"] == "succeeded"
                               and "".join(body["output"]) == alone[index])
                with lock:
                    statuses.append(outcome[1])
                    if not outcome[2]:
                        problems.append(outcome)

        wall = run_clients(client, CLIENTS, timeout=300)
        assert len(statuses) == CLIENTS * REQUESTS
        assert not [code for code in statuses if code >= 500], statuses
        assert not problems, problems[:5]
        # cancelled and abandoned answers run to their (short) ends; then the server is idle again
        wait_until_idle(server, timeout=60)
        code, body = server.post("/predictions", {"input": inputs(0)})
        assert code == 200 and "".join(body["output"]) == alone[0]
        assert worker_rss_mb(server) < warm_mb + 100, (warm_mb, worker_rss_mb(server))
        print(f"{CLIENTS * REQUESTS} requests in {wall:.1f} s")
