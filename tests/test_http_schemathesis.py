"""Schemathesis against the real Cog server: requests generated from the served OpenAPI schema,
valid and invalid, never get a 5xx, and schema-valid requests are accepted.

Bounded: a fixed seed, a fixed number of examples per operation and a time budget; predictions
are cut by the server's own time limit. The train server gets random strings for train_data, which
it refuses unread (a path on the server is never opened).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from cog_server import CogServer, tiny_env

pytestmark = pytest.mark.slow

CHECKS = "not_a_server_error,positive_data_acceptance"


@pytest.mark.parametrize("mode", ["predict", "train"])
def test_generated_requests_get_no_server_error(mode, tiny_model_dir, tmp_path):
    env = {**tiny_env(tiny_model_dir), "ALPACA_TUNE_MAX_PREDICT_SECONDS": "2"}
    with CogServer(mode, env=env) as server:
        server.wait_ready()
        result = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"http://127.0.0.1:{server.port}/openapi.json",
             "--checks", CHECKS, "--max-examples", "15", "--seed", "1", "--max-time", "45",
             "--phases", "examples,coverage,fuzzing", "--request-timeout", "30", "--workers", "1",
             "--generation-database", "none", "--no-color", "--suppress-health-check", "all"],
            cwd=tmp_path, capture_output=True, text=True, timeout=400)
        report = result.stdout[-6000:] + result.stderr[-2000:]
        assert result.returncode == 0, report
        assert server.health()["status"] in ("READY", "BUSY"), server.log()[-3000:]
