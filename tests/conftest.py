import pytest
import ray

from groupdir.data.shards import Encoding, prepare
from groupdir.data.synth import SynthSpec, write_synth
from groupdir.server import MlflowServer
from helpers import TRAIN_ROWS, free_port


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A small synthetic DIR data root shared by the data, training and CLI tests."""
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synth(root, SynthSpec(train=TRAIN_ROWS, eval_cap=3, eval_min=1, image_size=32, seed=1))
    return root


@pytest.fixture(scope="session")
def shards(tiny_synth, tmp_path_factory):
    """tiny_synth as FFCV shards (one per split)."""
    out = tmp_path_factory.mktemp("shards") / "synth"
    prepare(tiny_synth, out, encoding=Encoding(max_resolution=32), workers=1)
    return out


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for a test module's runs (`train` and `tune` use a connected Ray)."""
    ray.init(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, proxied artifacts) on a free loopback port,
    shared by the test session; the runs log to it over HTTP, as a team's runs do."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server"), port=free_port()) as server:
        yield server
