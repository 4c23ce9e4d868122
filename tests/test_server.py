"""`groupdir mlflow-server`: a real server process on a free loopback port, started and stopped."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from groupdir.cli import main
from groupdir.server import answers
from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_server_command_serves_runs_and_artifacts_until_ctrl_c(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "groupdir.cli", "mlflow-server", "--port", str(port),
                                "--store", str(tmp_path / "store"), "--workers", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        first = process.stdout.readline()
        uri = f"http://127.0.0.1:{port}"
        assert first.startswith(f"MLflow tracking server on {uri}"), first
        assert answers(uri)
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("team"))
        (tmp_path / "note.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))  # proxied: sent over HTTP
        assert (tmp_path / "store" / "mlflow.db").is_file()
        assert list((tmp_path / "store" / "artifacts").rglob("note.txt"))  # stored in the server's store
    finally:
        process.send_signal(signal.SIGINT)
        output = first + process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    assert not answers(uri)  # its web workers are gone too


def test_a_port_already_served_is_refused(mlflow_server, capsys):
    assert main(["mlflow-server", "--port", mlflow_server.uri.rsplit(":", 1)[1]]) == 2
    assert f"something already answers on {mlflow_server.uri}" in capsys.readouterr().err
