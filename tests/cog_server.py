"""Run the real Cog server (coglet) on this project for tests and benchmarks, and talk to it.

    with CogServer("predict", env={"ALPACA_TUNE_BASE": str(tiny)}, weights=archive) as server:
        server.wait_ready()
        code, body = server.post("/predictions", {"input": {"prompt": "Hi"}})

Each server gets a free loopback port and its own process group, and is always stopped (SIGTERM,
then SIGKILL of its group) when the `with` block or the fixture ends. Only the standard library:
http.client for JSON and server-sent events, http.server for a local file/webhook server.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import serve  # noqa: E402  (scripts/serve.py: the same command and environment as `make serve`)

TERMINAL = {"succeeded", "failed", "canceled"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerError(RuntimeError):
    pass


class CogServer:
    """`python -m cog.server.http` in the project root, in predict or train mode."""

    def __init__(self, mode: str = "predict", env: dict | None = None, weights: str | Path | None = None,
                 log_dir: Path | None = None):
        assert mode in ("predict", "train")
        self.mode = mode
        self.port = free_port()
        self.extra_env = dict(env or {})
        self.weights = str(weights) if weights else None
        self.log_path = Path(tempfile.mkstemp(prefix=f"coglet-{mode}-", suffix=".log", dir=log_dir)[1])
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> CogServer:
        train = self.mode == "train"
        base_env = {k: v for k, v in os.environ.items() if k != "COG_WEIGHTS"}
        base_env.update(self.extra_env)
        base_env.setdefault("PYTHONUNBUFFERED", "1")
        env = serve.server_env(train, self.port, self.weights, base_env=base_env)
        command = serve.server_command(train, "127.0.0.1")
        self.started_at = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server (it stops its worker), then SIGKILL whatever is left of its group."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the worker child, if it lingers
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()

    def __enter__(self) -> CogServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- health ------------------------------------------------------------------------------
    def health(self) -> dict | None:
        try:
            code, body = self.request("GET", "/health-check", timeout=5)
        except OSError:
            return None  # not listening yet
        return body if code == 200 and isinstance(body, dict) else None

    def wait_for(self, statuses=("READY",), timeout: float = 180.0, poll: float = 0.05) -> dict:
        """Poll /health-check until its status is one of `statuses` (or the server dies)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise ServerError(f"coglet exited ({self.process and self.process.returncode}):\n{self.log()[-3000:]}")
            last = self.health()
            if last and last.get("status") in statuses:
                return last
            if (last or {}).get("status") == "STARTING" and "No module named 'coglet'" in self.log():
                raise ServerError(f"coglet's worker cannot start (it runs `python` from PATH):\n{self.log()[-3000:]}")
            time.sleep(poll)
        raise ServerError(f"no status in {statuses} after {timeout} s (last: {last and last.get('status')}):\n"
                          f"{self.log()[-3000:]}")

    def wait_ready(self, timeout: float = 180.0) -> dict:
        health = self.wait_for(("READY", "SETUP_FAILED"), timeout)
        if health["status"] != "READY":
            raise ServerError(f"setup failed:\n{health.get('setup', {}).get('logs', '')[-3000:]}")
        return health

    # -- requests ----------------------------------------------------------------------------
    def connection(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                timeout: float = 300.0) -> tuple[int, object]:
        """(status, parsed JSON body or text); body may be a dict (sent as JSON) or raw bytes/str."""
        all_headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            all_headers.setdefault("Content-Type", "application/json")
        connection = self.connection(timeout)
        try:
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            raw = response.read().decode("utf-8", errors="replace")
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return response.status, raw

    def post(self, path: str, body=None, headers: dict | None = None, timeout: float = 300.0):
        return self.request("POST", path, body, headers, timeout)

    def put(self, path: str, body=None, headers: dict | None = None, timeout: float = 300.0):
        return self.request("PUT", path, body, headers, timeout)

    def events(self, path: str, body: dict, timeout: float = 300.0):
        """POST with `Accept: text/event-stream`; yield (event, data, monotonic arrival time).

        The first item is ("http", {"status": code, "content_type": ...}, t) so callers can check
        the response before reading events.
        """
        connection = self.connection(timeout)
        try:
            connection.request("POST", path, body=json.dumps(body),
                               headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
            response = connection.getresponse()
            yield "http", {"status": response.status, "content_type": response.getheader("Content-Type", "")}, \
                time.monotonic()
            if response.status != 200:
                return
            event, data = "message", []
            while True:
                line = response.readline()  # decodes chunked framing; b"" at the end
                if not line:
                    return
                line = line.decode("utf-8").rstrip("\r\n")
                if not line:  # a blank line ends one event
                    if data:
                        text = "\n".join(data)
                        try:
                            payload = json.loads(text)
                        except json.JSONDecodeError:
                            payload = text
                        yield event, payload, time.monotonic()
                    event, data = "message", []
                elif line.startswith(":"):
                    continue
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
        finally:
            connection.close()


class LocalHTTP:
    """A loopback HTTP server: GET serves files from `directory`; POST bodies (webhooks) are kept."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.posts: list[tuple[str, object]] = []
        self._cond = threading.Condition()
        owner = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(owner.directory), **kwargs)

            def do_POST(self):  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    body = raw.decode("utf-8", errors="replace")
                with owner._cond:
                    owner.posts.append((self.path, body))
                    owner._cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def wait_for_post(self, predicate, timeout: float = 60.0):
        """The first (path, body) POSTed so far or within `timeout` s for which predicate is true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for path, body in self.posts:
                    if predicate(path, body):
                        return path, body
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching POST in {timeout} s; got {[p for p, _ in self.posts]}")
                self._cond.wait(left)

    def __enter__(self) -> LocalHTTP:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def run_clients(client, count: int, timeout: float = 300.0) -> float:
    """Run client(0) ... client(count - 1) on threads at once; the wall time until all ended
    (AssertionError if one is still running after `timeout`)."""
    threads = [threading.Thread(target=client, args=(number,)) for number in range(count)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, started + timeout - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), f"clients still running after {timeout:.0f} s"
    return time.monotonic() - started


def wait_until_idle(server: CogServer, timeout: float = 30.0):
    """coglet answers a request a few milliseconds before it frees its one slot: a request sent in
    that window gets 409. A client that must not see it waits for READY (or retries)."""
    return server.wait_for(("READY",), timeout, poll=0.005)


def setup_logs_with(server: CogServer, text: str, timeout: float = 10.0) -> dict:
    """The health-check once setup.logs contains text: coglet forwards the worker's log lines
    asynchronously, so a line can arrive just after READY / SETUP_FAILED is reported."""
    deadline = time.monotonic() + timeout
    health = server.health()
    while text not in health["setup"]["logs"] and time.monotonic() < deadline:
        time.sleep(0.1)
        health = server.health()
    return health


def post_input(server: CogServer, path: str, inputs: dict) -> dict:
    """POST {"input": inputs} once the server is idle; the request must be accepted (200)."""
    wait_until_idle(server)
    code, body = server.post(path, {"input": inputs})
    assert code == 200, body
    return body


def data_uri(path: Path, mime: str = "application/json") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def save_data_uri(uri: str, target: Path) -> Path:
    """Decode a `data:...;base64,...` output (how coglet returns a file inside an object) to a file."""
    import base64

    header, _, payload = uri.partition(",")
    assert header.startswith("data:") and header.endswith(";base64"), header[:80]
    target.write_bytes(base64.b64decode(payload))
    return target


def tiny_env(tiny_model_dir: Path) -> dict[str, str]:
    """Server environment for the tiny test model: it as the base, one torch thread (its matmuls are
    too small for a second one to help, and on a loaded 2-core machine OpenMP threads spin)."""
    return {"ALPACA_TUNE_BASE": str(tiny_model_dir), "OMP_NUM_THREADS": "1"}


# Small, fast training settings for the tiny test model (a second or two of training).
FAST_TRAINING = {"max_steps": 4, "learning_rate": 0.01, "warmup_steps": 0, "train_batch_size": 4,
                 "gradient_accumulation_steps": 1, "val_set_size": 0, "lora_rank": 4,
                 "prompt_template": "alpaca_short", "seed": 1, "logging_steps": 1}

_trained: dict[str, Path] = {}


def train_over_http(tiny_model_dir: Path, workdir: Path, records: list) -> Path:
    """An adapter archive made by POST /trainings on a train server (made once per test session)."""
    key = str(tiny_model_dir)
    if key not in _trained:
        data = workdir / "train.json"
        data.write_text(json.dumps(records))
        with CogServer("train", env=tiny_env(tiny_model_dir)) as server:
            server.wait_ready()
            code, body = server.post("/trainings", {"input": {"train_data": data_uri(data), **FAST_TRAINING}})
            assert code == 200 and body["status"] == "succeeded", (code, body)
        _trained[key] = save_data_uri(body["output"]["weights"], workdir / "adapter.tar.gz")
    return _trained[key]
