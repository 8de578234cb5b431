"""What a run refuses before it trains, in one place: `check_run` is called by a run before anything is written
and by `--dry-run` alone, so a dry run refuses exactly what a run would, with the same one line, and a refused
config leaves nothing behind (no MLflow run or store file, no run folder).

The config's own schema (lab/config.py) has already checked every key, type, range and name; this module checks
what the config points at: the tracking store, a data root and its label files and images, UNet overrides
(asked of diffusers), an evaluator file, the run folder and the resume state in it. Torch loads only for the
checks that need it (overrides, an evaluator, a resume state), so a plain dry run stays light.
"""
import importlib
from pathlib import Path

from lab.config import to_yaml
from lab.data.roots import is_synthetic, resolve_root
from lab.data.synthetic import synthetic_root_path
from lab.data.labels import image_paths, load_objects, read_label_sets, read_train_table
from lab.errors import UserError
from lab.model_zoo import build_model
from lab.stores import check_reachable, resolve_uri

NUM_LABELS = 24  # the models and the evaluator are built for i-CLEVR's 24 labels


def check_run(config, fresh=False):
    """Everything a run checks before it loads data or writes anything; raises UserError naming the file. With
    `fresh` the run folder's old state is not read: the run starts over."""
    check_reachable(resolve_uri(config.tracking_uri), "tracking_uri" if config.tracking_uri else "MLFLOW_TRACKING_URI")
    if not is_synthetic(config.data.root):  # the synthetic default is rendered (correct) on first use
        check_root(resolve_root(config.data.root), config)
    if config.model.overrides:
        problem = unet_problem(config)
        if problem:
            raise UserError(config.source_of("model.overrides"), f"model.overrides: {problem}")
    if config.eval.evaluator:
        importlib.import_module("lab.eval").load_evaluator(config.eval.evaluator)  # torch: only for a given file
    if config.eval.select_by != "val_accuracy":
        check_strict_judge(config)
    check_run_folder(config, fresh)


def check_strict_judge(config):
    """Selecting by the strict judge's figures needs one for the run's images (lab.evaluator_cache)."""
    root = None
    if not is_synthetic(config.data.root):
        root = resolve_root(config.data.root)
    elif synthetic_root_path(config.data.synthetic_seed, config.data.synthetic_scenes).is_dir():
        root = synthetic_root_path(config.data.synthetic_seed, config.data.synthetic_scenes)
    # torch: only when a run selects by exact scenes
    if not importlib.import_module("lab.evaluator_cache").strict_judge_expected(root, config.eval.evaluator):
        raise UserError(config.source_of("eval.select_by"),
                        f"eval.select_by: {config.eval.select_by} needs a strict judge, and this run has none: "
                        f"{config.eval.evaluator or 'our evaluator'} has no count head for {root or 'this root'} "
                        "(python -m lab.eval train --root ROOT trains ours)")


def check_root(root, config):
    """A real root: its labels (24, a bijection), train.json's entries and images, and the label-set files the
    config scores on, every label known."""
    names = load_objects(root)
    if len(names) != NUM_LABELS:
        raise UserError(root, f"{len(names)} labels in objects.json; the models expect {NUM_LABELS}")
    image_paths(root, read_train_table(root)[0], config.data.image_dir)
    for name in [config.eval.split, *config.eval.test_splits]:
        if not (root / name).is_file():
            raise UserError(root / name, "label-set file not found (eval.split / eval.test_splits)")
        read_label_sets(root, name)


def unet_problem(config):
    """Why diffusers refuses to build the config's UNet with its overrides, or None: built on the meta device
    (no memory, no time)."""
    torch = importlib.import_module("torch")  # only for overrides: diffusers alone knows which kwargs it takes
    m = config.model
    try:
        with torch.device("meta"):
            build_model(m.unet, m.conditioning, image_size=config.data.image_size, patch_size=m.patch_size,
                        width=m.width, attention_resolutions=m.attention_resolutions, cfg_null=m.cfg_null,
                        self_conditioning=m.self_conditioning, **m.overrides)
    except UserError as e:
        return e.message
    return None


def check_run_folder(config, fresh=False):
    """`output_dir/run_name` is a folder or absent, and a run already there is this config's (a resume)."""
    out = Path(config.output_dir) / config.run_name
    for folder in (Path(config.output_dir), out):
        if folder.exists() and not folder.is_dir():
            raise UserError(folder, "is not a folder (output_dir / run_name: the run's checkpoints go there)")
    if not fresh and out.is_dir() and any(out.iterdir()):
        # torch: only where a resume state lies, which the run would read
        importlib.import_module("lab.run_folder").load_previous(out, to_yaml(config))
