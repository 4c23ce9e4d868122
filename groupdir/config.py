"""One typed config for a training run: defaults here, a YAML file over them, key=value over that.

The same object travels from the CLI to the training loop (and later to every Ray worker), so
every knob lives here and nothing downstream reads the environment behind its back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from groupdir.errors import ConfigError

# Choices shared with the modules that use them; kept here so that reading a config stays light.
PRESET_CSV = {"synth": "synth_age.csv", "imdb-wiki-dir": "imdb_wiki.csv", "agedb-dir": "agedb.csv"}
BACKBONES = ("resnet18", "resnet34", "resnet50")
BACKENDS = ("auto", "triton", "torch", "naive")
SIMILARITIES = ("cosine", "euclidean")
SHOTS = ("all", "many", "median", "few")
DEVICES = ("auto", "cpu", "cuda")
CONTRAST_SCOPES = ("local", "global")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies
CROPS = ("pad", "random_resized")
WRITE_MODES = ("jpg", "raw", "smart", "proportion")  # FFCV's RGBImageField modes
GROUP_LOSSES = ("soft", "ce", "soft_balanced", "ce_balanced")
ROUTES = ("predicted", "soft", "adjusted", "adjusted_soft")  # test-time routes (groupdir.evaluation)


@dataclass
class Config:
    # --- data -------------------------------------------------------------------------------
    data: str = ""                 # DIR data root: a CSV with columns age,path,split + the images
    dataset: str = "auto"          # preset naming the CSV: auto | synth | imdb-wiki-dir | agedb-dir
    csv: str = ""                  # CSV file name inside `data`; overrides the preset
    image_size: int = 32           # side of the square network input, in pixels
    crop: str = "pad"              # train crop: pad (the field's: resize, pad S/14, random crop) | random_resized
    loader_workers: int = 0        # DataLoader worker processes
    label_bin_width: float = 1.0   # labels are binned to this width for shots and bMAE (0.1 for STS-B)
    many_shot: int = 100           # a bin is many-shot with more than this many training samples
    few_shot: int = 20             # ... and few-shot with fewer than this many

    # --- method -----------------------------------------------------------------------------
    method: str = "groupdir"       # groupdir | vanilla
    num_groups: int = 20
    grouping: str = "equal_width"  # equal_width | equal_frequency
    label_min: float | None = None  # equal-width range; None takes it from the training labels
    label_max: float | None = None
    temperature: float = 2.5       # t of paper Eq. 2
    similarity: str = "cosine"     # cosine (paper) | euclidean (authors' code)
    loss_backend: str = "auto"     # auto (triton on CUDA, else torch) | triton | torch | naive
    group_loss: str = "soft"       # soft (paper's soft labels) | ce | soft_balanced | ce_balanced (balanced softmax)
    soft_reduction: str = "mean"   # the group loss over the batch: mean | sum (the authors' code: ~B x lambda_soft)
    beta: float = 1.0              # slope of the soft labels
    lambda_grc: float = 1.0        # weight of the contrastive term (1 in the paper; 0 turns it off)
    lambda_reg: float = 1.0        # lambda_1 of paper Eq. 5
    lambda_soft: float = 1.0       # lambda_2 of paper Eq. 5
    reg_loss: str = "l1"           # l1 | mse
    reweight: str = "none"         # none | inverse | sqrt_inv  (weights on the regression loss)
    lds: bool = False              # label distribution smoothing of the re-weighting counts
    lds_kernel: str = "gaussian"   # gaussian | triang | laplace
    lds_ks: int = 5
    lds_sigma: float = 2.0

    # --- routing and calibration (after training, on validation only) -----------------------
    select_route: str = "auto"     # headline route: auto (best on validation) | predicted | soft | adjusted | adjusted_soft
    la_target: str = "val"         # logit adjustment's target group prior: val (the validation histogram) | uniform
    crt_epochs: int = 0            # re-train the group classifier on frozen features with its balanced loss (epochs)

    # --- model ------------------------------------------------------------------------------
    backbone: str = "resnet18"     # resnet18 | resnet34 | resnet50 (random init)

    # --- optimisation -----------------------------------------------------------------------
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    select_metric: str = "bmae/all"  # validation metric that picks the best checkpoint (lower is better)
    threads: int = 0               # torch CPU threads per worker; 0: its CPUs (cpus_per_worker)

    # --- distributed (Ray Train) ------------------------------------------------------------
    workers: int = 1               # DDP workers (Ray Train actors); batch_size is split among them
    cpus_per_worker: float = 0.0   # 0: the local Ray's CPUs shared among the workers (1 on a joined cluster)
    gpus_per_worker: float = 1.0   # used when training on GPUs
    device: str = "auto"           # auto (GPUs if the Ray cluster has any) | cpu | cuda
    placement: str = "PACK"        # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (workers over nodes)
    contrast_scope: str = "global"  # global: the loss sees every worker's batch | local: each its own
    compile: bool = False          # torch.compile the model in each worker
    address: str = ""              # Ray cluster: "" starts a local one, "auto" or "ray://host:10001" joins
    storage_path: str = ""         # Ray checkpoints; "" = the run folder; a shared path or s3:// on clusters
    max_failures: int = 2          # worker failures survived by restarting from the last checkpoint
    fail_at_step: int = -1         # debug: the last worker exits at this optimizer step, once (for tests)

    # --- tracking (MLflow) ------------------------------------------------------------------
    tracking_uri: str = ""         # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    experiment: str = "groupdir"   # MLflow experiment name

    def validate(self) -> "Config":
        choices = {
            "dataset": ("auto", *PRESET_CSV),
            "crop": CROPS,
            "method": ("groupdir", "vanilla"),
            "grouping": ("equal_width", "equal_frequency"),
            "similarity": SIMILARITIES,
            "loss_backend": BACKENDS,
            "group_loss": GROUP_LOSSES,
            "soft_reduction": ("mean", "sum"),
            "select_route": ("auto", *ROUTES),
            "la_target": ("val", "uniform"),
            "reg_loss": ("l1", "mse"),
            "reweight": ("none", "inverse", "sqrt_inv"),
            "lds_kernel": ("gaussian", "triang", "laplace"),
            "backbone": BACKBONES,
            "device": DEVICES,
            "placement": PLACEMENTS,
            "contrast_scope": CONTRAST_SCOPES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        positive = ("image_size", "label_bin_width", "temperature", "epochs", "batch_size", "lr", "workers")
        for key in positive:
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{key}={value!r} must be a finite number > 0")
        non_negative = ("loader_workers", "beta", "lambda_grc", "lambda_reg", "lambda_soft",
                        "weight_decay", "threads", "few_shot", "lds_sigma", "cpus_per_worker", "gpus_per_worker",
                        "max_failures", "crt_epochs")
        for key in non_negative:
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{key}={value!r} must be a finite number >= 0")
        if self.num_groups < 1:
            raise ConfigError(f"num_groups={self.num_groups} must be >= 1")
        if self.method == "groupdir" and self.num_groups < 2:
            raise ConfigError("method=groupdir needs num_groups >= 2 (one group is plain regression: "
                              "use method=vanilla)")
        if self.few_shot > self.many_shot:
            raise ConfigError(f"few_shot={self.few_shot} must not exceed many_shot={self.many_shot}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 2 (the contrastive loss needs pairs)")
        if self.batch_size % self.workers or self.batch_size // self.workers < 2:
            raise ConfigError(f"batch_size={self.batch_size} (the global batch) must split evenly into at least "
                              f"2 samples for each of the workers={self.workers}")
        if self.lds and self.reweight == "none":
            raise ConfigError("lds=true smooths the re-weighting counts: set reweight=inverse or sqrt_inv")
        if self.lds_ks < 1 or self.lds_ks % 2 == 0:
            raise ConfigError(f"lds_ks={self.lds_ks} must be an odd number >= 1")
        if (self.label_min is None) != (self.label_max is None):
            raise ConfigError("give both label_min and label_max, or neither")
        if self.label_min is not None and not self.label_min < self.label_max:
            raise ConfigError(f"label_min={self.label_min} must be < label_max={self.label_max}")
        metrics = [f"{m}/{shot}" for m in ("mae", "mse", "gm", "bmae") for shot in SHOTS]
        if self.select_metric not in metrics:
            raise ConfigError(f"select_metric={self.select_metric!r} is not one of {', '.join(metrics)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_value(key: str, text: Any) -> Any:
    """One config value from text (an MLflow param, a key=value), typed as the key's field."""
    return _parse_value(key, text, {f.name: str(f.type) for f in fields(Config)}[key])


def _parse_value(key: str, text: Any, annotation: str) -> Any:
    """Convert one override to the field's type; YAML gives us bools, numbers and null for free."""
    if annotation == "str":
        return str(text)  # no YAML here: an empty csv= stays "", not null
    value = yaml.safe_load(text) if isinstance(text, str) else text
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{key} may not be null")
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={text!r}: expected true or false")
        return value
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={text!r}: expected an integer")
        return value
    if annotation.startswith("float"):
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={text!r}: expected a number")
        return float(value)
    return str(value)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """["key=value", ...] -> {key: "value"}; the values are converted by `load_config`."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        values[key.strip()] = text
    return values


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def packaged_configs() -> list[str]:
    """The names `--config NAME` accepts besides a file path (groupdir/configs/NAME.yaml)."""
    return sorted(path.stem for path in PACKAGED_CONFIGS.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A config file path as given, or the packaged config of that name."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    packaged = PACKAGED_CONFIGS / f"{path}.yaml"
    if not packaged.is_file():
        raise ConfigError(f"no config file {path} and no packaged config of that name; packaged: "
                          f"{', '.join(packaged_configs())}")
    return packaged


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file (a path, or a packaged config's name) <- overrides ("key=value" strings
    or a dict); then validate."""
    types = {f.name: str(f.type) for f in fields(Config)}
    values: dict[str, Any] = {}
    if path is not None:
        path = config_path(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value")
        values.update(loaded)
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides or []))
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(types)}")
    parsed = {k: _parse_value(k, v, types[k]) for k, v in values.items()}
    return Config(**parsed).validate()
