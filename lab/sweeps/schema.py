"""A sweep file: its schema (`SweepSpec`, every key with a comment) and `load_sweep`, which checks it,
its base config and every search range against the config's schema before anything runs.

A sweep file holds one top-level key, `sweep:`. `sweep.space` maps dotted config keys to search ranges,
`sweep.set` fixes dotted keys for every trial; each trial resolves the base config with both.
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lab.config import SELECTION_METRICS, Section, describe_error, load_config, parse_set, plain_name, read_yaml
from lab.errors import UserError
from lab.stores import DEFAULT_STORAGE, display_storage

PER_TRIAL_KEYS = {"run_name": "set by the sweep for each trial", "seeds": "a sweep trains each trial once"}
PER_STUDY_KEYS = {"experiment", "tracking_uri", "output_dir"}  # one parent run and folder for the whole study


class FloatSpace(Section):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False                    # sample on a log scale (low > 0)
    step: Optional[float] = Field(None, gt=0)  # a discretised float (not with log)

    @model_validator(mode="after")
    def check_range(self):
        _check_range(self.low, self.high, self.log, self.step)
        return self


class IntSpace(Section):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def check_range(self):
        _check_range(self.low, self.high, self.log, self.step if self.step != 1 else None)
        return self


class CategoricalSpace(Section):
    type: Literal["categorical"]
    choices: list[Union[None, bool, int, float, str]] = Field(min_length=1)  # what Optuna can store


def _check_range(low, high, log, step):
    if low > high:
        raise ValueError("low > high")
    if log and low <= 0:
        raise ValueError("log scale needs low > 0")
    if log and step:
        raise ValueError("step and log cannot be combined")


Param = Annotated[Union[FloatSpace, IntSpace, CategoricalSpace], Field(discriminator="type")]


class SamplerSpec(Section):
    name: Literal["tpe", "random"] = "tpe"
    seed: Optional[int] = 0              # null: unseeded; a resumed study uses seed + its number of trials
    n_startup_trials: int = Field(10, ge=0)  # tpe: random trials before the model takes over

    @model_validator(mode="after")
    def only_tpe_options(self):
        if self.name != "tpe" and "n_startup_trials" in self.model_fields_set:
            raise ValueError("n_startup_trials is a tpe option")
        return self


PRUNER_OPTIONS = {"median": {"n_startup_trials", "n_warmup_steps", "interval_steps"},
                  "hyperband": {"min_resource", "max_resource", "reduction_factor"}, "none": set()}


class PrunerSpec(Section):
    """The pruner's step is the epoch of a validation (comparable when batch sizes differ)."""
    name: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(5, ge=0)   # median: COMPLETE trials before anything is pruned
    n_warmup_steps: int = Field(0, ge=0)     # median: epochs a trial trains before it can be pruned
    interval_steps: int = Field(1, ge=1)     # median: epochs between pruning checks
    min_resource: int = Field(1, ge=1)       # hyperband: epochs every trial gets
    max_resource: Union[int, Literal["auto"]] = "auto"  # hyperband: epochs of a full trial
    reduction_factor: int = Field(3, ge=2)   # hyperband: 1/reduction_factor of trials go on to the next rung

    @model_validator(mode="after")
    def only_own_options(self):
        foreign = sorted(self.model_fields_set - PRUNER_OPTIONS[self.name] - {"name"})
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: not an option of the {self.name} pruner")
        return self


class HeartbeatSpec(Section):
    """RDB storages only: a worker that dies leaves its trial RUNNING; the heartbeat turns it into FAIL."""
    interval: int = Field(60, ge=1)          # seconds between a running trial's heartbeats
    grace_period: Optional[int] = Field(None, ge=1)  # seconds of silence before FAIL (null: 2 x interval)
    max_retry: int = Field(2, ge=0)          # a trial failed that way is re-run with its parameters this often


class SweepSpec(Section):
    base: str                                # the experiment config, relative to the sweep file
    study_name: Optional[str] = None         # default: the sweep file's stem
    storage: Optional[str] = None            # null: sqlite:///optuna.db in the working directory (see make_storage)
    metric: Literal[SELECTION_METRICS] = "val_accuracy"  # a trial's value: the best of this validation metric
    direction: Literal["maximize", "minimize"] = "maximize"
    n_trials: int = Field(20, ge=1)          # finished (COMPLETE + PRUNED) trials the study aims for, in total
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    heartbeat: HeartbeatSpec = HeartbeatSpec()
    space: dict[str, Param] = Field(min_length=1)  # dotted config key -> its search range
    set: dict[str, Any] = {}                 # fixed dotted overrides for every trial
    check_study_name = field_validator("study_name")(plain_name)  # it names the trials' run folders


class SweepFile(Section):
    sweep: SweepSpec


@dataclass
class Sweep:
    """A validated sweep: its spec and everything resolved from it."""
    spec: SweepSpec
    path: Path                # the sweep file
    base: Path                # the experiment config it searches over
    fixed: list               # "key=value" overrides for every trial (sweep.set, then --set)
    study_name: str
    storage: str              # as given (relative paths: the working directory)
    storage_where: str        # where the storage was named, for errors
    n_trials: int
    config: object            # the base config with the fixed overrides (experiment, tracking, output_dir)


def load_sweep(path, overrides=(), n_trials=None, storage=None):
    """Read and check a sweep file: schema, base config, and every search range against the base's schema."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        spec = SweepFile.model_validate(raw).sweep
    except ValidationError as e:
        dotted, message = describe_error(e, raw)
        raise UserError(path, f"{dotted}: {message}") from None
    if n_trials is not None and n_trials < 0:
        raise UserError("--n-trials", f"expected a number >= 0, got {n_trials}")
    base = (path.parent / spec.base).resolve()
    if not base.is_file():
        raise UserError(path, f"sweep.base: {base} not found")
    for key in list(spec.space) + list(spec.set):
        section = "space" if key in spec.space else "set"
        if key in PER_TRIAL_KEYS:
            raise UserError(path, f"sweep.{section}.{key}: {PER_TRIAL_KEYS[key]}")
        if section == "space" and key in PER_STUDY_KEYS:
            raise UserError(path, f"sweep.space.{key}: one value for the whole study (use sweep.set)")
    for key in spec.space.keys() & spec.set.keys():
        raise UserError(path, f"sweep.set.{key}: also in sweep.space")
    if spec.set.get("eval.select_by", spec.metric) != spec.metric or "eval.select_by" in spec.space:
        raise UserError(path, f"eval.select_by: a trial's best.pt is chosen by the sweep's metric ({spec.metric})")
    # each trial keeps the checkpoint its value comes from: best.pt chosen by the metric the study maximises
    fixed = [as_override(k, v) for k, v in {"eval.select_by": spec.metric, **spec.set}.items()] + list(overrides)
    for assignment in overrides:
        if assignment.partition("=")[0] in spec.space:
            raise UserError("--set", f"{assignment.partition('=')[0]}: searched by the sweep (sweep.space)")
    config = _check_config(path, base, fixed, {}, "sweep.set" + (" / --set" if overrides else ""))
    # every range end and every choice must make a valid config: a typo fails now, not at trial 7
    for key, param in spec.space.items():
        for value in _values(param):
            _check_config(path, base, fixed, {key: value}, f"sweep.space.{key}")
    _check_config(path, base, fixed, {k: _values(p)[0] for k, p in spec.space.items()}, "sweep.space")
    return Sweep(spec=spec, path=path, base=base, fixed=fixed, study_name=spec.study_name or path.stem,
                 storage=storage or spec.storage or DEFAULT_STORAGE,
                 storage_where="--storage" if storage else f"{path}: sweep.storage",
                 n_trials=spec.n_trials if n_trials is None else n_trials, config=config)


def sweep_yaml(sweep):
    """The resolved sweep as a sweep file (what --dry-run prints and the parent run keeps as sweep.yaml)."""
    spec = sweep.spec.model_dump(mode="json")
    spec.update(base=str(sweep.base), study_name=sweep.study_name, storage=display_storage(sweep.storage),
                n_trials=sweep.n_trials, set=dict(_parsed(a) for a in sweep.fixed))
    spec["space"] = {k: {f: v for f, v in p.items() if v is not None} for k, p in spec["space"].items()}
    own = PRUNER_OPTIONS[sweep.spec.pruner.name] | {"name"}
    spec["pruner"] = {k: v for k, v in spec["pruner"].items() if k in own}
    if sweep.spec.sampler.name != "tpe":
        del spec["sampler"]["n_startup_trials"]
    return yaml.safe_dump({"sweep": spec}, sort_keys=False)


def _parsed(assignment):
    keys, value = parse_set(assignment)
    return ".".join(keys), value


def _values(param):
    return param.choices if param.type == "categorical" else [param.low, param.high]


def as_override(key, value):
    """A `--set` assignment whose value reads back as exactly `value` (1e-05 must stay a float)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("\n...\n").strip()
    return f"{key}={text}"


def _check_config(path, base, fixed, values, where):
    try:
        return load_config(base, fixed + [as_override(k, v) for k, v in values.items()])
    except UserError as e:
        if e.where != "--set":
            raise  # the base config's own fault: its message names its file
        detail = str(e).removeprefix("--set: ")
        if len(values) == 1:
            (key, value), = values.items()
            detail = detail.removeprefix(f"{key}: ")
            if "unknown key" not in detail:
                detail = f"{value!r} gives an invalid config: {detail}"
        raise UserError(path, f"{where}: {detail}") from None
