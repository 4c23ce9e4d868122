import pytest

from groupdir.data.synth import SynthSpec, write_synth


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A small synthetic DIR data root shared by the data, training and CLI tests."""
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synth(root, SynthSpec(train=600, eval_cap=3, eval_min=1, image_size=32, seed=1))
    return root
