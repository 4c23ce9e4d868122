"""Reading checkpoints: a missing, truncated, foreign or corrupt file is refused naming it, by every
reader; init_from takes a checkpoint's encoder and refuses one that cannot fit the run."""

import numpy as np
import pytest
import ray
import torch

from groupdir import checkpoint
from groupdir.config import load_config
from groupdir.data import train_labels
from groupdir.driver import preflight
from groupdir.errors import CheckpointError
from groupdir.evaluation import load_model
from groupdir.model import DIRNet
from helpers import saved_checkpoint

LABELS = np.arange(20.0, 60.0)

# Every reader of a checkpoint.pt, each refusing a bad file with the same message.
READERS = {"load": checkpoint.load, "load_model": load_model,
           "init_from": lambda path: checkpoint.encoder_weights(path, "resnet18")}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real checkpoint.pt: Group-DIR with 4 groups over LABELS."""
    return saved_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt", LABELS, num_groups=4)


def test_init_from_loads_the_encoder_and_leaves_the_heads_fresh(real):
    torch.manual_seed(2)
    fresh = DIRNet("resnet18", 7, grouped=True)  # another group count than the checkpoint's 4
    heads = {key: value.clone() for key, value in fresh.state_dict().items() if not key.startswith("encoder.")}
    checkpoint.load_encoder(fresh, real, "resnet18")
    trained = torch.load(real, weights_only=True)["model"]
    for key, value in fresh.encoder.state_dict().items():
        assert torch.equal(value, trained[f"encoder.{key}"]), key
    assert all(torch.equal(fresh.state_dict()[key], value) for key, value in heads.items())


def foreign_files(folder, real) -> dict:
    """Files that are not a groupdir checkpoint.pt, by what is wrong with them."""
    half = folder / "half.pt"
    half.write_bytes(real.read_bytes()[:real.stat().st_size // 2])  # a copy cut off mid-way
    empty = folder / "empty.pt"
    empty.write_bytes(b"")
    text = folder / "text.pt"
    text.write_text("not a checkpoint")
    weights = folder / "weights.pt"
    torch.save({"weights": torch.ones(3)}, weights)
    state_dict = folder / "state_dict.pt"
    torch.save(DIRNet("resnet18", 4).state_dict(), state_dict)
    listed = folder / "list.pt"
    torch.save([1, 2], listed)
    pickled = folder / "pickled.pt"
    torch.save({"model": {}, "edges": np.linspace(0, 1, 3)}, pickled)  # objects weights_only refuses to build
    (folder / "run").mkdir()
    return {
        half: f"checkpoint {half} is truncated or not a torch file",
        empty: f"checkpoint {empty} is truncated or not a torch file",
        text: f"checkpoint {text} is truncated or not a torch file",
        weights: f"checkpoint {weights} is not a groupdir checkpoint.pt: it has no model, config, group_edges, "
                 f"train_labels (found: dict with keys weights)",
        state_dict: f"checkpoint {state_dict} is not a groupdir checkpoint.pt: it has no model, config, "
                    f"group_edges, train_labels (found: OrderedDict with keys encoder.conv1.weight, ",
        listed: f"checkpoint {listed} is not a groupdir checkpoint.pt: it has no model, config, group_edges, "
                f"train_labels (found: list)",
        pickled: f"checkpoint {pickled} holds objects other than tensors and plain containers (numpy.",
        folder / "run": f"checkpoint {folder / 'run'} is a folder; give the checkpoint.pt file in it",
        folder / "absent.pt": f"checkpoint {folder / 'absent.pt'} not found",
    }


@pytest.mark.parametrize("reader", READERS)
def test_a_truncated_or_foreign_file_is_refused_naming_it_and_the_mismatch(tmp_path, real, reader):
    for path, message in foreign_files(tmp_path, real).items():
        with pytest.raises(CheckpointError) as refused:
            READERS[reader](path)
        assert str(refused.value).startswith(message), (path.name, str(refused.value))
    READERS[reader](real)  # the real one reads


@pytest.mark.parametrize("reader", READERS)
def test_group_edges_that_do_not_fit_the_config_are_refused_as_corrupt(tmp_path, real, reader):
    saved = torch.load(real, weights_only=True)
    saved["config"]["num_groups"] = 5  # the edges cut 4
    torch.save(saved, tmp_path / "corrupt.pt")
    with pytest.raises(CheckpointError, match=f"^checkpoint {tmp_path / 'corrupt.pt'} is corrupt: its config has "
                                              f"num_groups=5, its group_edges cut 4 group"):
        READERS[reader](tmp_path / "corrupt.pt")


def test_weights_that_do_not_fit_the_config_are_refused_naming_the_file(tmp_path, real):
    saved = torch.load(real, weights_only=True)
    saved["config"]["num_groups"] = 5  # a config and edges of 5 groups, heads of 4
    saved["group_edges"] = [float(edge) for edge in np.linspace(20, 60, 6)]
    torch.save(saved, tmp_path / "heads.pt")
    with pytest.raises(CheckpointError, match=f"^checkpoint {tmp_path / 'heads.pt'}: its groupdir model weights do "
                                              f"not fit: .*size mismatch for classifier.weight"):
        load_model(tmp_path / "heads.pt")
    del saved["calibration"]  # one from before routes were calibrated
    torch.save(saved, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="old.pt has no route calibration"):
        load_model(tmp_path / "old.pt")


def test_init_from_refuses_another_backbone_and_an_encoder_that_does_not_fit(tmp_path, real):
    with pytest.raises(CheckpointError, match=f"^init_from={real} holds a resnet18 encoder; this run's backbone is resnet34"):
        checkpoint.encoder_weights(real, "resnet34")
    saved = torch.load(real, weights_only=True)
    del saved["model"]["encoder.layer4.1.bn2.weight"]  # a damaged encoder
    torch.save(saved, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match=f"^checkpoint {tmp_path / 'damaged.pt'}: its encoder weights do not "
                                              f"fit: .*Missing key.*layer4.1.bn2.weight"):
        checkpoint.load_encoder(DIRNet("resnet18", 4), tmp_path / "damaged.pt", "resnet18")


def test_preflight_takes_an_encoder_of_any_heads_and_refuses_one_that_cannot_fit(tiny_synth, tmp_path, real):
    """Only the encoder is loaded: a checkpoint of another method, group count, label range and
    image size starts the run (its heads start fresh); another backbone or a bad file is refused
    before Ray starts."""
    run = load_config(overrides={"data": str(tiny_synth), "num_groups": 10, "image_size": 32, "batch_size": 64})
    vanilla = saved_checkpoint(tmp_path / "vanilla.pt", LABELS, method="vanilla", image_size=16)
    assert preflight(run.replace(init_from=str(vanilla))) == "synth_age"  # the data set: its CSV's name
    assert preflight(run.replace(init_from=str(real))) == "synth_age"
    wider = saved_checkpoint(tmp_path / "resnet34.pt", train_labels(run), backbone="resnet34", num_groups=10)
    with pytest.raises(CheckpointError, match="holds a resnet34 encoder; this run's backbone is resnet18"):
        preflight(run.replace(init_from=str(wider)))
    half = tmp_path / "half.pt"
    half.write_bytes(real.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"checkpoint {half} is truncated or not a torch file"):
        preflight(run.replace(init_from=str(half)))
    assert not ray.is_initialized()
