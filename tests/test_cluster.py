"""Multi-node: the local multi-node script (cluster/local_cluster.py: a head with no CPUs and two
one-CPU nodes) so the two workers of a run must land on different nodes and still train to the end;
and the cluster manifests stay in step with the CLI."""

import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from groupdir.cli import build_parser, load_training_config
from groupdir.data.shards import Encoding, prepare, read_meta
from groupdir.driver import train
from helpers import steps_per_epoch

pytestmark = pytest.mark.slow

CLUSTER = Path(__file__).parents[1] / "cluster"


def start_local_cluster(nodes: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, str(CLUSTER / "local_cluster.py"), "--nodes", str(nodes)],
                               stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("address: "):
            return process, line.split()[1]
    raise AssertionError(f"local_cluster.py exited with {process.wait()} before printing its address")


def test_two_workers_on_two_nodes_train_to_completion(tiny_synth, tmp_path):
    shards = tmp_path / "shards"
    prepare(tiny_synth, shards, encoding=Encoding(max_resolution=32), workers=1, num_shards=2)
    process, address = start_local_cluster(nodes=2)
    try:
        cfg = load_training_config(None, ["workers=2", "placement=SPREAD", "epochs=1", "batch_size=64",
                                          "num_groups=5", "image_size=32",
                                          f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                                   data=str(shards), address=address)
        results = train(cfg, tmp_path / "run", progress="off")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    assert results["nodes"] == 2 and results["workers"] == 2
    assert results["predicted"]["n/all"] == read_meta(shards)["rows"]["test"]  # both nodes' slices, each row once
    assert json.loads((tmp_path / "run" / "history.json").read_text())[0]["steps"] == steps_per_epoch(64, workers=2)  # a shard each


def test_the_cluster_manifests_run_valid_train_commands():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["groupdir", "train"]
    args = build_parser().parse_args(command[1:])
    cfg = load_training_config(None, args.overrides, data=args.data, address=args.address)
    assert cfg.address == "auto" and cfg.workers == 8 and cfg.storage_path.startswith("/mnt/shared")
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("make setup" in command for command in launcher["setup_commands"])
