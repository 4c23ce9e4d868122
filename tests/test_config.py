import pytest

from pathlib import Path

from groupdir.config import Config, ConfigError, changed_settings, config_reference, load_config, packaged_configs


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_groups: 10\ntemperature: 1.5\nlds: true\nreweight: sqrt_inv\n")
    cfg = load_config(path, ["num_groups=25", "label_min=0", "label_max=100", "method=vanilla"])
    assert cfg.num_groups == 25 and cfg.temperature == 1.5 and cfg.lds is True
    assert cfg.label_min == 0.0 and isinstance(cfg.label_min, float) and cfg.method == "vanilla"
    assert load_config().to_dict() == Config().to_dict()
    assert load_config(overrides=["lr=1e-3"]).lr == 1e-3  # YAML alone would read 1e-3 as a string


@pytest.mark.parametrize("override, message", [
    ("num_grups=3", "unknown config key.*num_grups"),
    ("method=ranksum", "method='ranksum' is not one of"),
    ("freeze_encoder=true", "freeze_encoder=true trains heads on a fixed encoder"),
    ("method=rnc|loss_backend=triton", "method=rnc uses -L2 on raw features"),
    ("method=rnc|fds=true", "method=rnc trains the encoder alone"),
    ("method=balanced_mse|reweight=inverse", "method=balanced_mse balances the likelihood itself"),
    ("fds_ks=4", "fds_ks=4 must be an odd number"),
    ("method=rnc|reweight=inverse", "method=rnc trains the encoder alone"),
    ("method=ranksim|init_from=x.pt|freeze_encoder=true", "fixes the features, so method=ranksim's feature loss"),
    ("method=groupdir|init_from=x.pt|freeze_encoder=true", "fixes the features, so method=groupdir's"),
    ("fds_momentum=1", "fds_momentum=1 must be"),
    ("optimizer=lamb", "optimizer='lamb' is not one of adam, sgd"),
    ("num_groups=0", "num_groups=0 must be an integer > 0"),
    ("num_groups=2.5", "num_groups=2.5: expected an integer"),
    ("lds=yes please", "lds='yes please': expected true or false"),
    ("temperature=-1", "temperature=-1 must be a finite number > 0"),
    ("batch_size=1", "batch_size=1 must be >= 2"),
    ("lds=true", "lds=true smooths the re-weighting counts"),
    ("label_min=5", "give both label_min and label_max"),
    ("epochs", "not of the form key=value"),
    ("similarity=dot", "similarity='dot'"),
    ("crop=center", "crop=.center. is not one of"),
    ("select_metric=mae/al", "select_metric='mae/al' is not one of"),
    ("temperature=.inf", "must be a finite number > 0"),
    ("workers=0", "workers=0 must be an integer > 0"),
    ("contrast_scope=all", "contrast_scope='all' is not one of local, global"),
    ("device=tpu", "device='tpu' is not one of"),
    ("max_failures=-1", "max_failures=-1 must be an integer >= 0"),
    ("lr=abc", "lr='abc': expected a number"),
])
def test_bad_settings_are_refused_with_the_key_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=override.split("|"))  # "|" joins several keys into one case


def test_unreadable_or_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


@pytest.mark.parametrize("overrides", [["workers=4", "batch_size=2"], ["workers=2", "batch_size=3"],
                                       ["workers=3", "batch_size=3"]])
def test_a_global_batch_that_cannot_feed_every_worker_is_refused(overrides):
    with pytest.raises(ConfigError, match="must split evenly into at least 2 samples for each of the workers"):
        load_config(overrides=overrides)
    assert load_config(overrides=["workers=2", "batch_size=4"]).workers == 2


def test_the_config_is_frozen_and_a_changed_copy_is_validated():
    cfg = load_config(overrides=["num_groups=5"])
    with pytest.raises(Exception, match="frozen"):
        cfg.num_groups = 6
    assert cfg.replace(num_groups=6).num_groups == 6 and cfg.num_groups == 5
    with pytest.raises(ConfigError, match="needs num_groups >= 2"):
        cfg.replace(num_groups=1)  # groupdir needs two groups: a copy is checked like a new config


def test_a_resume_names_each_changed_setting_but_not_where_ray_runs():
    before = load_config(overrides=["num_groups=5"]).to_dict()
    after = load_config(overrides=["num_groups=6", "address=auto", "max_failures=0"]).to_dict()
    assert changed_settings(before, after) == ["num_groups: 5 -> 6"]


def test_docs_config_page_is_the_generated_reference():
    """docs/config.md is `groupdir config --markdown`: a key added to Config without a docstring, or
    the page not regenerated, fails here."""
    reference = config_reference()
    for key, field in Config.model_fields.items():
        assert field.description, f"{key} has no docstring"
        assert f"| `{key}` |" in reference
    page = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert page.read_text() == reference, "regenerate: groupdir config --markdown > docs/config.md"


@pytest.mark.parametrize("name", packaged_configs())
def test_every_packaged_config_is_valid(name):
    # a linear probe needs the pretrained run it probes
    cfg = load_config(name, {"init_from": "runs/rnc/checkpoint.pt"} if name.endswith("rnc-linear") else {})
    assert cfg.method in ("groupdir", "vanilla", "ranksim", "balanced_mse", "conr", "rnc")


def test_a_method_config_extends_its_data_sets_and_later_files_win(tmp_path):
    ranksim = load_config("agedb-dir-ranksim")
    assert (ranksim.dataset, ranksim.backbone, ranksim.method, ranksim.batch_size) == ("agedb-dir", "resnet50", "ranksim", 64)
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: agedb-dir-ranksim\nranksim_weight: 5\n")
    layered = load_config([mine, "demo"], ["epochs=2"])
    assert (layered.ranksim_weight, layered.method, layered.epochs, layered.dataset) == (5, "groupdir", 2, "agedb-dir")
