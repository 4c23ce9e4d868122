"""Search spaces: a YAML file of `fixed` config keys and a `space` of keys to search, checked
against the config before Ray starts (see groupdir/sweep/__init__.py for the format)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from groupdir.config import Config, NonNegativeInt, PositiveInt, describe, load_config, parse_overrides
from groupdir.errors import ConfigError

KINDS = ("choice", "grid", "uniform", "loguniform", "int")
# Where and how a trial runs, and what it is judged by: the same for every trial of a sweep.
NOT_SEARCHABLE = ("data", "dataset", "csv", "address", "storage_path", "tracking_uri", "experiment",
                  "select_metric", "workers", "cpus_per_worker", "gpus_per_worker", "device", "placement")


@dataclass
class Param:
    key: str
    kind: str       # one of KINDS
    values: list    # choice / grid: the values; uniform / loguniform / int: [low, high], both included
    bundles: dict[str, dict] | None = None  # a choice of named bundles: name -> {config key: value}

    def settings(self, value) -> dict:
        """The config keys a drawn value stands for."""
        return dict(self.bundles[value]) if self.bundles else {self.key: value}

    def domain(self):
        from ray import tune

        if self.kind in ("choice", "grid"):
            return tune.choice(self.values) if self.kind == "choice" else tune.grid_search(self.values)
        low, high = self.values
        if self.kind == "int":
            return tune.randint(low, high + 1)  # Tune's upper bound is exclusive
        return tune.uniform(low, high) if self.kind == "uniform" else tune.loguniform(low, high)

    def describe(self) -> str:
        if self.bundles:
            return f"{self.kind}(" + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in bundle.items())
                                               for name, bundle in self.bundles.items()) + ")"
        return f"{self.kind}({', '.join(map(str, self.values))})"


@dataclass
class SweepSpec:
    """A search space file plus the command line's sweep options."""
    space_file: str
    name: str
    params: list[Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    trials: int = 8             # samples drawn; with a grid, runs of the whole grid (default 1)
    seed: int = 0               # the searcher's seed (the training seed is the config key `seed`)
    grace_period: int = 1       # ASHA: epochs every trial gets before it may be stopped; 0: no ASHA
    reduction_factor: float = 2.0
    max_concurrent: int = 0     # trials at once; 0: as many as the cluster's CPUs (GPUs) hold

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params if p.kind == "grid")

    @property
    def total_trials(self) -> int:
        return self.trials * self.grid_size

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "params": {p.key: p.describe() for p in self.params}}


# ===================================== search spaces =====================================

class Asha(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    grace_period: NonNegativeInt = 1
    """Epochs every trial gets before it may be stopped; 0: no early stopping."""
    reduction_factor: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 2.0
    """At each rung ASHA keeps the best 1 / reduction_factor of the trials."""


class SpaceFile(BaseModel):
    """A search space file (tune/*.yaml), validated like a run's config."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    description: str = ""
    trials: PositiveInt | None = None
    """Samples drawn; with a grid, runs of the whole grid (default 8, or 1 with a grid)."""
    seed: NonNegativeInt = 0
    """The searcher's seed (the training seed is the config key `seed`)."""
    asha: Asha = Asha()
    """ASHA's settings, or false for no early stopping."""
    fixed: dict[str, Any] = {}
    """Config keys every trial gets."""
    space: dict[str, Any] = Field(min_length=1)
    """Config keys (or bundle names) to search, each one domain {KIND: values}."""


def load_space(path: str | Path, name: str = "", trials: int | None = None,
               max_concurrent: int | None = None) -> SweepSpec:
    """Read and check a space file (the values are checked against the config by `sweep_config`)."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read search space {path}: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a search space is a mapping with keys {', '.join(SpaceFile.model_fields)}")
    if loaded.get("asha") is False:
        loaded = {**loaded, "asha": {"grace_period": 0}}
    try:
        space_file = SpaceFile(**loaded)
    except pydantic.ValidationError as err:
        raise ConfigError(f"{path}: {describe(err.errors()[0], SpaceFile)}") from None
    if max_concurrent is not None and max_concurrent < 0:
        raise ConfigError(f"--max-concurrent={max_concurrent} must be >= 0")
    params = [_param(path, key, domain) for key, domain in space_file.space.items()]
    default_trials = 1 if any(p.kind == "grid" for p in params) else 8  # a grid runs once unless asked
    return SweepSpec(space_file=str(path), name=name or path.stem, params=params, fixed=space_file.fixed,
                     description=space_file.description, trials=trials or space_file.trials or default_trials,
                     seed=space_file.seed, grace_period=space_file.asha.grace_period,
                     reduction_factor=space_file.asha.reduction_factor, max_concurrent=max_concurrent or 0)


def _param(path: Path, key: str, domain) -> Param:
    where = f"{path}: space.{key}"
    if not isinstance(domain, dict) or len(domain) != 1:
        raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)}, e.g. {{choice: [5, 10]}}")
    (kind, values), = domain.items()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind in ("choice", "grid") and isinstance(values, dict) and values:
        if not all(isinstance(bundle, dict) and bundle for bundle in values.values()):
            raise ConfigError(f"{where}: a {kind} of bundles maps each name to a mapping of config keys")
        return Param(key, kind, [str(name) for name in values], {str(k): v for k, v in values.items()})
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list (or a mapping of named bundles)")
    if kind in ("choice", "grid"):
        return Param(key, kind, values)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {kind} needs [low, high], two numbers")
    low, high = values
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{where}: int needs integer bounds")
    if low > high or (kind != "int" and low == high):
        raise ConfigError(f"{where}: low={low} must be below high={high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0")
    return Param(key, kind, [low, high])


def sweep_config(spec: SweepSpec, overrides: list[str]) -> Config:
    """The config every trial starts from: defaults <- the space's `fixed` <- key=value; then every
    value the space can draw is checked against it, so a bad space fails before Ray starts."""
    command_line = parse_overrides(overrides)
    try:
        base = load_config(overrides={**spec.fixed, **command_line})
    except ConfigError as err:
        raise ConfigError(f"{spec.space_file} (fixed) with the command line: {err}") from None
    known = set(base.to_dict())
    searched: set[str] = set()
    for param in spec.params:
        where = f"{spec.space_file}: space.{param.key}"
        if param.bundles and param.key in known:
            raise ConfigError(f"{where}: a bundle's name must not be a config key; name it after what it bundles")
        keys = sorted({k for bundle in param.bundles.values() for k in bundle}) if param.bundles else [param.key]
        for key in keys:
            if key not in known:
                raise ConfigError(f"{where}: unknown config key {key!r}")
            if key in NOT_SEARCHABLE:
                raise ConfigError(f"{where}: {key} is the same for every trial; set it in 'fixed' or "
                                  f"on the command line")
            if key in spec.fixed or key in command_line:
                raise ConfigError(f"{where}: {key} is both searched and fixed "
                                  f"({'in fixed' if key in spec.fixed else 'on the command line'}); drop one")
            if key in searched:
                raise ConfigError(f"{where}: {key} is searched twice")
            searched.add(key)
        if param.bundles:
            continue
        kind_of_key = type(getattr(base, param.key))
        if param.kind == "int" and kind_of_key is not int:
            raise ConfigError(f"{where}: int ranges are for integer keys; {param.key} is {kind_of_key.__name__}")
        if param.kind in ("uniform", "loguniform") and kind_of_key is not float:
            raise ConfigError(f"{where}: {param.kind} is for real-valued keys; {param.key} is "
                              f"{kind_of_key.__name__} (use int or choice)")
    list(candidates(spec, base))  # building each candidate validates it
    return base


def candidates(spec: SweepSpec, base: Config):
    """(param, value, config) for each choice and both ends of each range: the configs that show a
    bad space. A value the config refuses raises, naming the file and the key."""
    for param in spec.params:
        for value in param.values:
            try:
                yield param, value, load_config(overrides={**base.to_dict(), **param.settings(value)})
            except ConfigError as err:
                raise refused(spec, param, value, err) from None


def refused(spec: SweepSpec, param: Param, value, err: Exception) -> ConfigError:
    return ConfigError(f"{spec.space_file}: space.{param.key}: the value {value!r} is refused: {err}")


def short(value) -> str:
    """A drawn value as printed in a trial's line and the trials table."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
