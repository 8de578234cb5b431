"""Experiment configs: YAML files that name a base and hold only what they change, validated by a schema.

    base.yaml  <-  ablations/cross_attn.yaml (base: ../base.yaml)  <-  --set train.lr=3e-4

Nested keys deep-merge, lists are replaced. The merged result is checked against `ExperimentConfig`;
an unknown key, a wrong type, an out-of-range value or a config that cannot be built is one line naming
the dotted key and the file that set it. What the config points at (the tracking store, the data root, an
evaluator, the run folder) is checked by lab/checks.py, before a run and in a dry run alike. Nothing here
loads torch.
"""
import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, WrapValidator, field_validator

from lab.errors import UserError
from lab.stores import tracking_uri_problem
from lab.model_zoo import CFG_NULLS, CONDITIONING, UNETS, attention_problem, conditioning_problem, size_problem
from lab.schedules import (BETA_SCHEDULES, FLOW_SAMPLERS, LOSS_WEIGHTINGS, OBJECTIVES, PREDICTION_TYPES, SAMPLERS,
                           sampler_steps_problem)


def choice(registry):
    """A name of `registry` (a dict or tuple of names): a Literal of its names, so that model_json_schema() lists
    them; anything else fails listing them."""
    names = tuple(registry)

    def check(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"unknown name {value!r}; choose one of: {', '.join(names)}") from None
    return Annotated[Literal[names], WrapValidator(check)]


class Section(BaseModel):
    # inf and nan are no setting: .inf guidance drew non-finite samples
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            try:
                seen.add(key)
            except TypeError:  # an unhashable key: YAML's own constructor says so
                pass
        return super().construct_mapping(node, deep)


def plain_name(name):
    """A name that becomes one folder (`<output_dir>/<run_name>/`), never a path that leads elsewhere."""
    if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name):
        raise ValueError(f"must be a plain name, not a path (got {name!r})")
    return name


def inside_root(path):
    """A file or folder of the data root: relative and without `..`, so it stays in data.root."""
    if path is None:  # eval.heldout_split: null turns the held-out split off
        return path
    parts = PurePosixPath(path).parts
    if not parts or PurePosixPath(path).is_absolute() or ".." in parts:
        raise ValueError(f"must be a path inside data.root, not {path!r}")
    return path


def _tracking_uri(uri):
    problem = uri and tracking_uri_problem(uri)
    if problem:
        raise ValueError(problem)
    return uri


# Validation metrics that can choose best.pt (eval.select_by) and score a sweep's trials (sweep.metric).
SELECTION_METRICS = ("val_accuracy", "val_exact_accuracy")


class DataConfig(Section):
    root: Optional[str] = None           # an i-CLEVR root; null = the synthetic set, rendered once into the cache
    image_size: int = Field(64, ge=8, le=512)
    image_dir: str = "iclevr"            # image folder inside the root
    synthetic_scenes: int = Field(6003, ge=1)  # size of the synthetic default (3 images a scene)
    synthetic_seed: int = 0
    hflip: bool = False                  # random horizontal flips (labels have no left/right)
    on_device: bool = True               # keep the uint8 training set resident on the GPU (augment there)
    check_image_dir = field_validator("image_dir")(inside_root)


class ModelConfig(Section):
    unet: choice(UNETS) = "reference"
    conditioning: choice(CONDITIONING) = "time_add"
    overrides: dict = {}                 # extra diffusers UNet kwargs (e.g. block_out_channels)
    patch_size: int = Field(1, ge=1, le=16)  # the UNet works on p x p pixel patches (3p^2 channels at size/p)
    width: float = Field(1.0, gt=0, le=8)  # channels x width (the UNet axis at any scale: 0.5 smaller, 1.5 wider)
    attention_resolutions: Optional[list[int]] = None  # UNet feature-map sizes with self-attention; null: the variant's
    cfg_dropout: float = Field(0.0, ge=0, lt=1)  # label dropout to the learned null condition (CFG)
    cfg_null: choice(CFG_NULLS) = "learned"  # count: the null also knows how many labels were asked for
    self_conditioning: bool = False      # the model also reads its own x0 estimate (lab/diffusion.py)


class DiffusionConfig(Section):
    objective: choice(OBJECTIVES) = "denoising"  # flow_matching: rectified flow (beta_schedule, prediction_type unused)
    beta_schedule: choice(BETA_SCHEDULES) = "cosine"
    num_train_timesteps: int = Field(1000, ge=2, le=10000)
    prediction_type: choice(PREDICTION_TYPES) = "epsilon"
    loss_weighting: choice(LOSS_WEIGHTINGS) = "uniform"  # min_snr: Min-SNR-gamma; logit_normal: flow only (SD3)
    snr_gamma: float = Field(5.0, gt=0)  # min_snr's cap


class EmaConfig(Section):
    enabled: bool = True
    decay: float = Field(0.9999, gt=0, lt=1)
    warmup: bool = True                  # diffusers' EMA warm-up: short runs still get useful EMA weights
    # more EMA lengths kept beside this one, as multiples of its 1/(1 - decay); after training, validation
    # chooses among their final weights and the checkpoints (the length chosen after training, EDM2's question)
    candidates: list[Annotated[float, Field(gt=0)]] = []


class TrainConfig(Section):
    epochs: int = Field(100, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)  # stop early after this many optimizer steps
    max_minutes: Optional[float] = Field(None, gt=0)  # wall-clock budget of training and its validations, then score
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0, le=1)
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_accum: int = Field(1, ge=1)     # micro-batches per optimizer step
    grad_clip: Optional[float] = Field(1.0, gt=0)
    ema: EmaConfig = EmaConfig()
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # auto = bf16 autocast on GPU and native-bf16 CPUs
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the UNet; auto = on GPU
    fast_path: bool = True               # on GPU: channels_last, TF32 matmuls, fused optimizer
    log_every: int = Field(50, ge=1)     # steps between loss/lr/throughput points
    checkpoint_every: int = Field(1, ge=1)  # epochs between "latest" checkpoints

    @field_validator("mixed_precision", "compile", mode="before")
    @classmethod
    def yaml_booleans_are_words(cls, value, info):
        """YAML reads `no`, `on` and `off` as booleans: `--set train.compile=off` means the word."""
        if isinstance(value, bool):
            return {"mixed_precision": {False: "no"}, "compile": {True: "on", False: "off"}}[info.field_name].get(value, value)
        return value


class EvalConfig(Section):
    every_epochs: int = Field(5, ge=1)   # validation sampling + evaluator score
    split: str = "val.json"              # label sets for model selection (never the test sets)
    sampler: choice({**SAMPLERS, **FLOW_SAMPLERS}) = "ddim"  # the objective's own (lab.schedules.OBJECTIVES)
    steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0, le=1)
    guidance_scale: float = Field(1.0, ge=0, le=100)  # beyond it samples overflow; useful scales are 1-10
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guided only at noise levels t/T within it (1: pure noise)
    batch_size: int = Field(64, ge=1)
    evaluator: Optional[str] = None      # the course's checkpoint.pth; null = ours for the data root
    test_splits: list[str] = ["test.json", "new_test.json"]
    heldout_split: Optional[str] = "heldout_test.json"  # scored at the end too where the root has it (synthetic
                                         # roots do): label pairs never seen together in training
    val_seeds: int = Field(3, ge=1)      # sampling seeds per validation; their mean of `select_by` selects best.pt
    select_by: Literal[SELECTION_METRICS] = "val_accuracy"  # the course's rule; val_exact_accuracy: the strict judge's
    final_seeds: int = Field(1, ge=1)    # sampling seeds for the final test scores (mean ± std)
    check_split = field_validator("split", "heldout_split")(inside_root)

    @field_validator("test_splits")
    @classmethod
    def splits_inside_root(cls, names):
        return [inside_root(name) for name in names]

    @field_validator("guidance_interval")
    @classmethod
    def interval_within_trajectory(cls, interval):
        low, high = interval
        if not 0 <= low < high <= 1:
            raise ValueError(f"[{low}, {high}] is not an interval within [0, 1] (low < high; 1 is pure noise)")
        return interval

    @field_validator("eta")
    @classmethod
    def eta_is_ddims(cls, eta, info):
        if eta and info.data.get("sampler") != "ddim":
            raise ValueError(f"only the ddim sampler takes eta; '{info.data.get('sampler')}' does not")
        return eta


class ExperimentConfig(Section):
    experiment: str = Field("ddpm-lab", min_length=1)  # MLflow experiment name
    run_name: Optional[str] = None       # default: the config file's stem
    preset: str = "base"                 # the scale (base, quickstart, cpu): ablations inherit it; tables never mix two
    ablation: str = "base"               # the axis this file varies (a tag for compare.py)
    seed: int = 0
    seeds: Optional[list[int]] = None    # repeat the experiment over these seeds (one run each)
    tracking_uri: Optional[str] = None   # default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    output_dir: str = "runs"             # checkpoints go to OUTPUT_DIR/<run name>/
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    check_run_name = field_validator("run_name")(plain_name)
    check_tracking_uri = field_validator("tracking_uri")(_tracking_uri)
    # Where each dotted key was set (a file or --set) and the file to name otherwise: errors found later about
    # what the config points at (lab/checks.py) name the file a user must edit.
    _origin: dict = PrivateAttr(default_factory=dict)
    _default_source: str = PrivateAttr("")

    def source_of(self, dotted):
        """The file (or --set) that set `dotted` or the section holding it."""
        return _source(dotted, self._origin, self._default_source)


def cross_checks(config):
    """(dotted key, problem) for a config that cannot be built: a patch size or image size the UNet cannot
    halve enough, attention at a size the UNet does not have, more sampler steps than training timesteps. UNet
    overrides are asked of diffusers itself (lab/checks.py)."""
    model = config.model
    if config.data.image_size % model.patch_size:
        return [("model.patch_size", f"{model.patch_size} does not divide data.image_size {config.data.image_size}")]
    problem = size_problem(model.unet, config.data.image_size, model.overrides, model.patch_size)
    if problem:
        return [("data.image_size", problem)]
    problem = attention_problem(model.unet, config.data.image_size, model.patch_size, model.attention_resolutions,
                                model.overrides)
    if problem:
        return [("model.attention_resolutions", problem)]
    problem = conditioning_problem(model.unet, model.conditioning)
    if problem:
        return [("model.unet", problem)]
    ema = config.train.ema
    if ema.candidates and not ema.enabled:
        return [("train.ema.candidates", "candidate EMA lengths need train.ema.enabled: true")]
    if len(set(ema.candidates)) < len(ema.candidates) or 1 in ema.candidates:
        return [("train.ema.candidates", f"{ema.candidates}: each length must differ from the others and from "
                                         "the main EMA's (1)")]
    too_short = [length for length in ema.candidates if (1 - ema.decay) / length >= 1]
    if too_short:
        return [("train.ema.candidates", f"{too_short[0]:g} times train.ema.decay {ema.decay:g}'s length is under "
                                         "one step (a decay of at most 0)")]
    diffusion = config.diffusion
    if diffusion.objective == "flow_matching" and diffusion.loss_weighting == "min_snr":
        return [("diffusion.objective", "flow_matching takes diffusion.loss_weighting: uniform or logit_normal "
                                        "(min_snr weights a noise schedule's SNR)")]
    if diffusion.objective == "denoising" and diffusion.loss_weighting == "logit_normal":
        return [("diffusion.loss_weighting", "logit_normal draws flow matching's timesteps; "
                                             "diffusion.objective: denoising takes uniform or min_snr")]
    problem = sampler_steps_problem(config.eval.sampler, config.eval.steps, diffusion.num_train_timesteps,
                                    diffusion.objective)
    if problem:
        key = "eval.steps" if config.eval.sampler in OBJECTIVES[diffusion.objective] else "eval.sampler"
        return [(key, problem)]
    return []


def read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(path, "config file not found")
    try:
        content = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # SafeLoader's: no Python objects
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(path, f"not a readable YAML text file ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise UserError(path, f"malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if content is None:
        raise UserError(path, "empty config file (a config names at least its base or one key)")
    if not isinstance(content, dict):
        raise UserError(path, "expected a mapping of config keys at the top level")
    return content


def deep_merge(base, override, origin, source, prefix=""):
    """Merge `override` into a copy of `base`, recording in `origin` which source set each dotted key."""
    merged = dict(base)
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "overrides":
            merged[key] = deep_merge(merged[key], value, origin, source, dotted + ".")
        else:
            merged[key] = value
            origin[dotted] = source
    return merged


def load_layers(path, origin, seen=()):
    """A config file merged over the chain of bases it names (`base:` relative to the file)."""
    path = Path(path).resolve()
    if path in seen:
        raise UserError(path, "base chain loops back to this file")
    content = read_yaml(path)
    base = content.pop("base", None)
    merged = {}
    if base is not None:
        if not isinstance(base, str):
            raise UserError(path, f"base: expected a file path, got {base!r}")
        merged = load_layers(path.parent / base, origin, (*seen, path))
    return deep_merge(merged, content, origin, path)


def parse_set(assignment):
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003): values parse as YAML scalars."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UserError("--set", f"expected key=value, got {assignment!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UserError("--set", f"{key}: value {raw!r} is not valid YAML") from None
    return key.split("."), value


def nested(keys, value):
    for key in reversed(keys):
        value = {key: value}
    return value


def describe_error(error, raw):
    """A pydantic ValidationError on `raw` (a config or sweep file) as (dotted key, one-line message)."""
    first = error.errors()[0]
    loc, node = [], raw
    for part in first["loc"]:
        if isinstance(node, dict) and part not in node and part in (node.get("type"), node.get("name")):
            continue  # a tagged union's tag, not a key
        loc.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    kind = first["type"]
    if kind == "extra_forbidden":
        message = "unknown key (a typo?)"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        message = "type: expected float, int or categorical"  # the only tagged union: a sweep's search space
    else:
        message = first["msg"].removeprefix("Value error, ")
        if "input" in first and kind not in ("missing", "value_error"):
            message += f" (got {first['input']!r})"
    return ".".join(loc), message


def validate(raw, origin, default_source):
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        dotted, message = describe_error(e, raw)
        raise UserError(_source(dotted, origin, default_source), f"{dotted}: {message}") from None
    for dotted, message in cross_checks(config):
        raise UserError(_source(dotted, origin, default_source), f"{dotted}: {message}")
    config._origin, config._default_source = origin, str(default_source)
    return config


def _source(dotted, origin, default_source):
    """The file (or --set) that set `dotted` or the section holding it."""
    return next((origin[k] for k in _prefixes(dotted) if k in origin), default_source)


def _prefixes(dotted):
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def load_config(path, overrides=(), base=None):
    """Resolve a config file, its bases and `--set` overrides into a validated ExperimentConfig. `base`
    replaces the base the file names: an ablation's delta applied to another preset (e.g. cpu.yaml)."""
    origin = {}
    if base is None:
        raw = load_layers(path, origin)
    else:
        content = read_yaml(path)
        content.pop("base", None)
        raw = deep_merge(load_layers(base, origin), content, origin, Path(path).resolve())
    for assignment in overrides:
        keys, value = parse_set(assignment)
        raw = deep_merge(raw, nested(keys, value), origin, "--set")
    if "run_name" not in raw or raw["run_name"] is None:
        raw["run_name"] = Path(path).stem
    return validate(raw, origin, Path(path))


# Keys that change how a trained model is sampled and scored, not how it trains; and the run's bookkeeping.
SAMPLING_KEYS = {"eval.sampler", "eval.steps", "eval.eta", "eval.guidance_scale", "eval.guidance_interval",
                 "eval.batch_size", "eval.val_seeds", "eval.final_seeds", "eval.test_splits", "eval.heldout_split"}
BOOKKEEPING_KEYS = {"experiment", "run_name", "preset", "ablation", "seeds", "tracking_uri", "output_dir"}


def training_key(config):
    """A digest of everything that decides what a run trains (seed included): two configs with the same key
    differ only in sampling, scoring or bookkeeping, so one training serves both (lab/trainer.py, rescore)."""
    kept = {k: v for k, v in flatten(config).items() if k not in SAMPLING_KEYS | BOOKKEEPING_KEYS}
    return hashlib.blake2b(json.dumps(kept, sort_keys=True).encode(), digest_size=8).hexdigest()


def to_yaml(config):
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(config, prefix=""):
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}: MLflow params and table columns."""
    items = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    flat = {}
    for key, value in items.items():
        if isinstance(value, dict) and value and key != "overrides":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
