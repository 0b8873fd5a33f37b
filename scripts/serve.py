"""Serve this model over Cog's HTTP API on this machine, without Docker: the real server (coglet).

    python scripts/serve.py --port 5000 --weights outputs/run/adapter.tar.gz   # POST /predictions
    python scripts/serve.py --train --port 5001                                 # POST /trainings
    make serve PORT=5000 COG_WEIGHTS=outputs/run/adapter.tar.gz ;  make serve-train PORT=5001

It writes .cog/openapi_schema.json (what `cog build` would bake into the image; without it coglet
validates nothing and refuses SSE), then replaces itself with `python -m cog.server.http` started
in the project root, with the predictor or trainer ref from cog.yaml in COG_PREDICT_TYPE_STUB /
COG_TRAIN_TYPE_STUB and the adapter in COG_WEIGHTS (handed to Predictor.setup as is: a file, a
directory or an http(s) URL). In predict mode it sets COG_MAX_CONCURRENCY, the only place coglet
reads its number of slots from outside `cog build` (default 16, as predict.py declares; a value
already set is kept). The rest of the environment passes through (ALPACA_TUNE_BASE=DIR serves
another base model). Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(1, str(ROOT))

import cog_schema  # noqa: E402

from alpaca_tune.serving.limits import CONCURRENCY_ENV, DEFAULT_CONCURRENCY  # noqa: E402


def server_command(train: bool = False, host: str = "127.0.0.1", upload_url: str | None = None,
                   python: str = sys.executable) -> list[str]:
    command = [python, "-m", "cog.server.http", "--host", host]
    if train:
        command += ["--x-mode", "train"]
    if upload_url:
        command += ["--upload-url", upload_url]
    return command


def python_first_on_path(path: str, python: str = sys.executable) -> str:
    """coglet starts its worker as plain `python` from PATH: make that this interpreter (the venv's
    even when it is not activated, as under `make`)."""
    bin_dir = Path(python).parent
    candidate = bin_dir / "python"
    if not candidate.exists() or candidate.resolve() != Path(python).resolve():
        bin_dir = Path(tempfile.mkdtemp(prefix="cog-python-"))
        (bin_dir / "python").symlink_to(python)
    return f"{bin_dir}{os.pathsep}{path}" if path else str(bin_dir)


def server_env(train: bool = False, port: int = 5000, weights: str | None = None,
               base_env: dict | None = None, root: Path = ROOT) -> dict[str, str]:
    """The environment coglet reads: PORT, the ref of the mode it serves, COG_WEIGHTS, its
    concurrency (predict mode; train() is synchronous: one training at a time); PATH."""
    env = dict(os.environ if base_env is None else base_env)
    predict_ref, train_ref = cog_schema.read_refs(root)
    env["PORT"] = str(port)
    env["PATH"] = python_first_on_path(env.get("PATH", ""))
    if train:
        env["COG_TRAIN_TYPE_STUB"] = train_ref
        env.pop(CONCURRENCY_ENV, None)  # coglet refuses more than one slot for a synchronous train()
    else:
        env["COG_PREDICT_TYPE_STUB"] = predict_ref
        env.setdefault(CONCURRENCY_ENV, str(DEFAULT_CONCURRENCY))
    if weights:
        env["COG_WEIGHTS"] = str(weights)
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the model with Cog's HTTP server (coglet).")
    parser.add_argument("--train", action="store_true", help="serve POST /trainings instead of /predictions")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--weights", default=os.environ.get("COG_WEIGHTS", ""),
                        help="adapter archive, directory or URL for Predictor.setup (default: $COG_WEIGHTS)")
    parser.add_argument("--upload-url", default=None,
                        help="PUT a returned top-level file there instead of inlining it as a data URI")
    args = parser.parse_args(argv)
    if args.weights and not args.weights.startswith(("http://", "https://", "data:")):
        args.weights = str(Path(args.weights).resolve())  # the server runs in the project root
    cog_schema.write_schema(ROOT)
    command = server_command(args.train, args.host, args.upload_url)
    env = server_env(args.train, args.port, args.weights or None)
    print(f"serving {'POST /trainings' if args.train else 'POST /predictions'} on http://{args.host}:{args.port}"
          f"{' with COG_WEIGHTS=' + args.weights if args.weights and not args.train else ''}", file=sys.stderr)
    os.chdir(ROOT)  # coglet imports the refs and reads .cog/openapi_schema.json from its cwd
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
