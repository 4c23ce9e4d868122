"""One typed, frozen config for a training run: defaults here, a YAML file over them, key=value over that.

The same object travels from the CLI to every Ray worker, so every knob lives here and nothing
downstream reads the environment behind its back. It is a frozen pydantic model: the field types
(Literal choices, bounds) are the validation, each field's docstring is its documentation
(`groupdir config --markdown` prints them as docs/config.md), and a changed copy comes from
`cfg.replace(key=value)`, which validates again.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from groupdir.errors import ConfigError
from groupdir.labels import FEW_SHOT, MANY_SHOT, SHOTS

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]

Dataset = Literal["auto", "synth", "imdb-wiki-dir", "agedb-dir"]
Backbone = Literal["resnet18", "resnet34", "resnet50"]
Backend = Literal["auto", "triton", "torch", "naive"]
Precision = Literal["ieee", "tf32", "bf16"]
Similarity = Literal["cosine", "euclidean"]
Route = Literal["predicted", "soft", "adjusted", "adjusted_soft"]
Method = Literal["groupdir", "vanilla", "ranksim", "balanced_mse", "conr", "rnc"]
Kernel = Literal["gaussian", "triang", "laplace"]

# The choices, for the modules that check their own arguments.
PRESET_CSV = {"synth": "synth_age.csv", "imdb-wiki-dir": "imdb_wiki.csv", "agedb-dir": "agedb.csv"}
BACKBONES = typing.get_args(Backbone)
BACKENDS = typing.get_args(Backend)
PRECISIONS = typing.get_args(Precision)
SIMILARITIES = typing.get_args(Similarity)
ROUTES = typing.get_args(Route)  # test-time routes (groupdir.evaluation)
WRITE_MODES = ("jpg", "raw", "smart", "proportion")  # FFCV's RGBImageField modes (groupdir prepare)
SELECT_METRICS = tuple(f"{metric}/{shot}" for metric in ("mae", "mse", "gm", "bmae") for shot in SHOTS)


class Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, validate_default=True)

    # --- data -------------------------------------------------------------------------------
    data: str = ""
    """FFCV shards (`groupdir prepare`) or a DIR data root: a CSV with columns age,path,split + the images."""
    dataset: Dataset = "auto"
    """Preset naming the CSV inside a data root; auto: the one preset CSV present."""
    csv: str = ""
    """CSV file name inside `data`; overrides the preset."""
    image_size: PositiveInt = 32
    """Side of the square network input, in pixels."""
    crop: Literal["pad", "random_resized"] = "pad"
    """Train crop: pad (the field's: resize, pad S/14, random crop) | random_resized."""
    loader_workers: NonNegativeInt = 0
    """Loader workers per Ray worker: DataLoader processes for a data root, FFCV threads for shards (at least 1)."""
    label_bin_width: Positive = 1.0
    """Labels are binned to this width for shots and bMAE (0.1 for STS-B)."""
    many_shot: NonNegativeInt = MANY_SHOT
    """A label bin is many-shot with more than this many training samples."""
    few_shot: NonNegativeInt = FEW_SHOT
    """... and few-shot with fewer than this many."""

    # --- method -----------------------------------------------------------------------------
    method: Method = "groupdir"
    """groupdir (paper) | vanilla (one regressor) | ranksim | balanced_mse | conr | rnc (encoder pretraining); docs/baselines.md."""
    num_groups: PositiveInt = 20
    """Ordered label groups (G)."""
    grouping: Literal["equal_width", "equal_frequency"] = "equal_width"
    """How the label range is cut into groups."""
    label_min: float | None = None
    """Equal-width range start; None takes it from the training labels."""
    label_max: float | None = None
    """Equal-width range end; give both or neither."""
    temperature: Positive = 2.5
    """t of paper Eq. 2."""
    similarity: Similarity = "cosine"
    """Feature similarity of the contrastive loss: cosine (paper) | euclidean (authors' code)."""
    loss_backend: Backend = "auto"
    """Contrastive loss implementation: auto (triton on CUDA, else torch) | triton | torch | naive."""
    loss_precision: Precision = "ieee"
    """Triton loss's matmul inputs (float32 accumulation): ieee (float32) | tf32 | bf16. torch and naive ignore it."""
    group_loss: Literal["soft", "ce", "soft_balanced", "ce_balanced"] = "soft"
    """Group classifier loss: soft (paper's soft labels) | ce | soft_balanced | ce_balanced (balanced softmax)."""
    soft_reduction: Literal["mean", "sum"] = "mean"
    """The group loss over the batch: mean | sum (the authors' code: about B x lambda_soft)."""
    beta: NonNegative = 1.0
    """Slope of the soft labels."""
    lambda_grc: NonNegative = 1.0
    """Weight of the contrastive term (1 in the paper; 0 turns it off)."""
    lambda_reg: NonNegative = 1.0
    """lambda_1 of paper Eq. 5 (regression)."""
    lambda_soft: NonNegative = 1.0
    """lambda_2 of paper Eq. 5 (group classifier)."""
    reg_loss: Literal["l1", "mse"] = "l1"
    """Regression loss."""
    reweight: Literal["none", "inverse", "sqrt_inv"] = "none"
    """Weights on the regression loss."""
    lds: bool = False
    """Label distribution smoothing of the re-weighting counts."""
    lds_kernel: Kernel = "gaussian"
    """LDS kernel."""
    lds_ks: PositiveInt = 5
    """LDS kernel size (odd)."""
    lds_sigma: NonNegative = 2.0
    """LDS kernel width."""

    # --- the field's baselines (docs/baselines.md; defaults from each original paper) ------------
    fds: bool = False
    """Feature distribution smoothing (Yang et al. 2021) of the features the heads see in training; any method but rnc."""
    fds_kernel: Kernel = "gaussian"
    """FDS smoothing kernel over label bins."""
    fds_ks: PositiveInt = 5
    """FDS kernel size (odd)."""
    fds_sigma: NonNegative = 2.0
    """FDS kernel width."""
    fds_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """Momentum of FDS's running per-bin statistics across epochs."""
    fds_start_smooth: NonNegativeInt = 1
    """First epoch (0-based) whose features FDS calibrates (it needs an epoch of statistics first)."""
    ranksim_weight: NonNegative = 100.0
    """method=ranksim: gamma, the weight of the ranking-similarity regulariser."""
    ranksim_interpolation: Positive = 2.0
    """method=ranksim: lambda, the blackbox ranking's interpolation strength."""
    balanced_mse: Literal["bmc", "gai"] = "bmc"
    """method=balanced_mse: bmc (batch Monte-Carlo) | gai (GMM analytic integration)."""
    noise_sigma: Positive = 1.0
    """method=balanced_mse: initial noise scale sigma (learned)."""
    noise_sigma_lr: Positive = 0.01
    """method=balanced_mse: learning rate of sigma."""
    gmm_components: PositiveInt = 8
    """method=balanced_mse, gai: components of the GMM fitted on the training labels."""
    conr_weight: NonNegative = 4.0
    """method=conr: beta, the weight of the ConR regulariser."""
    conr_threshold: NonNegative = 1.0
    """method=conr: w, labels (and predictions) within it are similar."""
    conr_temperature: Positive = 0.07
    """method=conr: temperature of the feature similarities."""
    conr_pushing_power: NonNegative = 0.01
    """method=conr: e, negatives are pushed with weight exp(e * label distance)."""
    rnc_temperature: Positive = 2.0
    """method=rnc: temperature of Rank-N-Contrast's -L2 similarity."""
    init_from: str = ""
    """A checkpoint.pt whose ENCODER starts this run (two-stage training, e.g. after method=rnc); heads start fresh."""
    freeze_encoder: bool = False
    """Train the heads only, on the encoder's features in evaluation mode (a linear probe with method=vanilla)."""

    # --- routing and calibration (after training, on validation only) -----------------------
    select_route: Literal["auto", "predicted", "soft", "adjusted", "adjusted_soft"] = "auto"
    """Headline route: auto (the best on validation) or one route."""
    la_target: Literal["val", "uniform"] = "val"
    """Logit adjustment's target group prior: val (the validation histogram) | uniform."""
    crt_epochs: NonNegativeInt = 0
    """Re-train the group classifier on frozen features with its balanced loss, for this many epochs."""

    # --- model ------------------------------------------------------------------------------
    backbone: Backbone = "resnet18"
    """Encoder, randomly initialised."""

    # --- optimisation -----------------------------------------------------------------------
    epochs: PositiveInt = 10
    """Training epochs."""
    batch_size: PositiveInt = 128
    """The global batch, split among the workers."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """adam | sgd (with `momentum`)."""
    lr: Positive = 1e-3
    """Learning rate."""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """SGD momentum (optimizer=sgd)."""
    weight_decay: NonNegative = 1e-4
    """Weight decay."""
    seed: int = 0
    """Initial weights, data order, augmentation."""
    select_metric: str = "bmae/all"
    """Validation metric that picks the best checkpoint and route (lower is better)."""
    threads: NonNegativeInt = 0
    """torch CPU threads per worker; 0: its CPUs (cpus_per_worker)."""

    # --- distributed (Ray Train) ------------------------------------------------------------
    workers: PositiveInt = 1
    """DDP workers (Ray Train actors)."""
    cpus_per_worker: NonNegative = 0.0
    """0: the local Ray's CPUs shared among the workers (1 on a joined cluster)."""
    gpus_per_worker: NonNegative = 1.0
    """Used when training on GPUs."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: GPUs if the Ray cluster has any."""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement strategy of the workers over nodes."""
    contrast_scope: Literal["local", "global"] = "global"
    """global: batch-defined losses (contrast, RankSim, BMC, ConR, RnC) see every worker's batch | local: each its own."""
    compile: bool = False
    """torch.compile the model in each worker."""
    address: str = ""
    """Ray cluster: "" starts a local one; auto or ray://host:10001 joins one."""
    storage_path: str = ""
    """Ray checkpoints; "" = the run folder; a shared path or s3:// on clusters."""
    max_failures: NonNegativeInt = 2
    """Worker failures survived by restarting from the last checkpoint."""

    # --- tracking (MLflow) ------------------------------------------------------------------
    tracking_uri: str = ""
    """MLflow store; "" = $MLFLOW_TRACKING_URI (read by the CLI), else sqlite:///mlflow.db here."""
    experiment: str = "groupdir"
    """MLflow experiment name."""
    log_every: NonNegativeInt = 20
    """Rank 0 logs the loss terms, learning rate and images/s every this many optimizer steps (0: per epoch only)."""
    tracking_patience: NonNegative = 600
    """Seconds a finished run keeps retrying an unreachable MLflow server before leaving its results to a rerun."""

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.method == "groupdir" and self.num_groups < 2:
            raise ValueError("method=groupdir needs num_groups >= 2 (one group is plain regression: "
                             "use method=vanilla)")
        if self.few_shot > self.many_shot:
            raise ValueError(f"few_shot={self.few_shot} must not exceed many_shot={self.many_shot}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size} must be >= 2 (the contrastive loss needs pairs)")
        if self.batch_size % self.workers or self.batch_size // self.workers < 2:
            raise ValueError(f"batch_size={self.batch_size} (the global batch) must split evenly into at least "
                             f"2 samples for each of the workers={self.workers}")
        if self.lds and self.reweight == "none":
            raise ValueError("lds=true smooths the re-weighting counts: set reweight=inverse or sqrt_inv")
        for key in ("lds_ks", "fds_ks"):
            if getattr(self, key) % 2 == 0:
                raise ValueError(f"{key}={getattr(self, key)} must be an odd number >= 1")
        if self.freeze_encoder and not self.init_from:
            raise ValueError("freeze_encoder=true trains heads on a fixed encoder: give it one with init_from=RUN/checkpoint.pt")
        if self.method == "rnc" and (self.freeze_encoder or self.fds or self.reweight != "none"):
            raise ValueError("method=rnc trains the encoder alone: freeze_encoder, fds and reweight do not apply")
        if self.freeze_encoder and (self.method in ("ranksim", "conr") or (self.method == "groupdir" and self.lambda_grc > 0)):
            raise ValueError(f"freeze_encoder=true fixes the features, so method={self.method}'s feature loss would "
                             f"train nothing: use method=vanilla (a linear probe) or groupdir with lambda_grc=0")
        if self.method == "rnc" and self.loss_backend == "triton":
            raise ValueError("method=rnc uses -L2 on raw features, which the Triton kernels do not take "
                             "(they L2-normalise): use loss_backend=auto or torch")
        if self.method == "balanced_mse" and self.reweight != "none":
            raise ValueError("method=balanced_mse balances the likelihood itself: keep reweight=none")
        if (self.label_min is None) != (self.label_max is None):
            raise ValueError("give both label_min and label_max, or neither")
        if self.label_min is not None and not self.label_min < self.label_max:
            raise ValueError(f"label_min={self.label_min} must be < label_max={self.label_max}")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric={self.select_metric!r} is not one of {', '.join(SELECT_METRICS)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes) -> "Config":
        """A validated copy with `changes` (the config itself never changes)."""
        return build(self.model_dump() | changes)


KEYS = tuple(Config.model_fields)
# Keys a resumed run or sweep may change: where Ray runs, how many crashes it survives, how it logs.
RESUME_MAY_CHANGE = ("address", "max_failures", "log_every", "tracking_patience")


def changed_settings(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys (as "key: old -> new") that keep a run or sweep from resuming with `current`."""
    return [f"{key}: {recorded.get(key)!r} -> {value!r}" for key, value in sorted(current.items())
            if recorded.get(key) != value and key not in RESUME_MAY_CHANGE]


def build(values: dict[str, Any]) -> Config:
    """A Config from typed values; a refusal names the key, its value and the rule."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(KEYS)}")
    try:
        return Config(**values)
    except pydantic.ValidationError as err:
        raise ConfigError(describe(err.errors()[0])) from None


def describe(error: dict, model: type[BaseModel] | None = None) -> str:
    """pydantic's error as one line in groupdir's words: `key=value` and what is wrong (`model`:
    the model validated, Config by default; a nested key is written outer.inner)."""
    if not error["loc"]:  # a rule over several keys: its own message names them
        return str(error["ctx"]["error"]) if "error" in error.get("ctx", {}) else error["msg"]
    key, value, kind = ".".join(map(str, error["loc"])), error["input"], error["type"]
    field = field_at(model or Config, error["loc"])
    if kind == "literal_error" and field is not None:
        return f"{key}={value!r} is not one of {', '.join(map(str, typing.get_args(field.annotation)))}"
    if kind in ("greater_than", "greater_than_equal", "finite_number"):
        bounds = {name: getattr(item, name) for item in (field.metadata if field else []) for name in ("gt", "ge")
                  if getattr(item, name, None) is not None} | error.get("ctx", {})
        bound = f"> {bounds['gt']:g}" if "gt" in bounds else f">= {bounds.get('ge', 0):g}"
        number = "a finite number" if (field.annotation is float if field else not isinstance(value, int)) else "an integer"
        return f"{key}={value!r} must be {number} {bound}"
    if kind == "less_than":
        return f"{key}={value!r} must be < {error['ctx']['lt']:g}"
    expected = {"int": "an integer", "bool": "true or false", "float": "a number", "dict": "a mapping"}.get(kind.split("_")[0])
    if expected:
        return f"{key}={value!r}: expected {expected}"
    if kind == "extra_forbidden":
        return f"unknown key {key!r}"
    if kind == "too_short":
        return f"{key} must not be empty"
    return f"{key}={value!r}: {error['msg']}"


def field_at(model: type[BaseModel], loc: tuple):
    """The pydantic field at `loc` in `model` (through nested models), or None."""
    field = None
    for name in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or name not in model.model_fields:
            return None
        field = model.model_fields[name]
        model = field.annotation
    return field


def parse_value(key: str, text: Any) -> Any:
    """One config value from text (a key=value, an MLflow param), typed as the key's field; the
    model checks the type. YAML gives us bools, numbers and null for free."""
    if key not in Config.model_fields:
        return text  # build() names it as unknown
    annotation = Config.model_fields[key].annotation
    if not isinstance(text, str):
        return text
    if annotation is str or typing.get_origin(annotation) is Literal:
        return text  # no YAML here: an empty csv= stays "", not null
    value = yaml.safe_load(text)
    if isinstance(value, str) and annotation is not bool:  # YAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return value


def parse_overrides(items: list[str]) -> dict[str, str]:
    """["key=value", ...] -> {key: "value"}; the values are typed by `load_config`."""
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


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = config_path(path)
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value")
    # `extends: NAME` starts from another config (a data set's), so a method's file holds only its keys.
    base = loaded.pop("extends", None)
    return {**(read_config_file(base) if base else {}), **loaded}


def load_config(path: str | Path | list | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file(s) (paths or packaged configs' names, later ones over earlier ones, e.g.
    a data set's and then a method's) <- overrides ("key=value" strings or a dict), validated."""
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    values: dict[str, Any] = {}
    for each in paths:
        values.update(read_config_file(each))
    given = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    values.update({key: parse_value(key, text) for key, text in given.items()})
    # A YAML file may write a string key as a number (csv: 2024.csv is fine, experiment: 7 too).
    strings = {key for key, field in Config.model_fields.items() if field.annotation is str}
    return build({key: str(value) if key in strings and value is not None else value for key, value in values.items()})


def config_reference() -> str:
    """docs/config.md: every key with its type, default and docstring, in the model's order."""
    from groupdir.tables import markdown_table

    rows = []
    for key, field in Config.model_fields.items():
        annotation = field.annotation
        kind = (" \\| ".join(typing.get_args(annotation)) if typing.get_origin(annotation) is Literal
                else getattr(annotation, "__name__", str(annotation)).replace("|", "\\|"))
        rows.append([f"`{key}`", kind, f"`{field.default!r}`", (field.description or "").replace("|", "/")])
    return "\n".join(["# Config keys", "", "Generated by `groupdir config --markdown` from `groupdir/config.py`; "
                      "every key works in a YAML file (`--config`) and as `key=value`.", "",
                      *markdown_table(["key", "type", "default", "meaning"], rows, text_columns=4)]) + "\n"
