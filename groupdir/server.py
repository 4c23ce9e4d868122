"""`groupdir mlflow-server`: the MLflow tracking server a team shares.

One `mlflow server` process: runs, params and metrics in a sqlite file, artifacts (checkpoints,
plots) in a folder, both under one store folder, and artifacts proxied: clients send and fetch them
over HTTP, so a training node needs no access to the store's disk. It binds 127.0.0.1 unless told
otherwise (docs/distributed.md: a cluster's nodes reach it through --host and --allowed-hosts).
Tests start the same server, on a free loopback port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DATABASE = "mlflow.db"
ARTIFACTS = "artifacts"
# MLflow 3 starts a job runner and a dozen worker processes for its GenAI features (LLM judges,
# prompt optimisation) that groupdir never calls: they cost memory and start-up time.
SERVER_ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_command(store: Path, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    store = Path(store).resolve()
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store / DATABASE}",
            "--artifacts-destination", str(store / ARTIFACTS), "--serve-artifacts",
            "--host", host, "--port", str(port), "--workers", str(workers)]


def server_uri(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


class MlflowServer:
    """A tracking server process on `store` (created if missing): start, wait until it answers, stop."""

    def __init__(self, store: str | Path, host: str = "127.0.0.1", port: int = 5000, workers: int = 1):
        self.store, self.host, self.port, self.workers = Path(store).resolve(), host, port, workers
        self.uri = server_uri(host, port)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0, log=None) -> "MlflowServer":
        """Start the server and return once it answers; its output goes to `log` (a file), or to
        store/server.log."""
        self.store.mkdir(parents=True, exist_ok=True)
        log = log or open(self.store / "server.log", "ab")
        # Its own process group: stop() ends the server and the web workers it starts.
        self.process = subprocess.Popen(server_command(self.store, self.host, self.port, self.workers),
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, **SERVER_ENVIRONMENT})
        self.wait_until_up(timeout)
        return self

    def wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {self.process.returncode} "
                                   f"(its log: {self.store / 'server.log'})")
            if answers(self.uri):
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server on {self.uri} did not answer within {timeout:g} s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s: the web server would otherwise wait for its clients'
        keep-alive connections to close (every write is committed per request)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def answers(uri: str, timeout: float = 2.0) -> bool:
    """Whether the tracking server at `uri` answers its health check."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
