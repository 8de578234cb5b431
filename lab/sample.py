"""`python -m lab.sample CHECKPOINT` (entry point `ddpm-lab-sample`): draw from a trained model what a course user
hands in, and score it.

    python -m lab.sample runs/quickstart/best.pt --labels test.json new_test.json \\
        --prompt "red sphere, cyan cylinder, cyan cube"

CHECKPOINT is a best.pt (or latest.pt), a folder written by `save_pretrained`, an MLflow run id or `runs:/RUN_ID`.
For every label-set file and sampling seed it writes each image as its own 64x64 PNG, a grid of them (8 per row,
torchvision's make_grid as the course's script saves it) and a labelled grid (the asked labels under each tile,
the strict judge's verdict as its frame), and scores the PNGs as written, read back from disk: the course's rule
pooled over the whole file, and the strict judge's figures where one is trained for these images. For every
--prompt: --n images, their grids, and the denoising process as one row of frames from noise to the image.
Everything lands in --out (written beside it and renamed into place: whole or absent), with summary.json holding
every figure and setting; --log also puts the grids and figures on the checkpoint's MLflow run.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from pydantic import ValidationError
from torchvision.utils import save_image

from lab import build, run_folder
from lab.config import ExperimentConfig, describe_error
from lab.data.iclevr import decode, multi_hot, normalize, to_uint8
from lab.data.labels import label_indices, read_json
from lab.errors import UserError, reports_user_errors
from lab.eval import EVALUATOR_SIZE, judge_samples, over_seeds, resize
from lab.grids import label_names_of, labelled_grid, titled_rows
from lab.pipeline import load_pipeline, multi_hot_of
from lab.sampling import denoising_strip, generate
from lab.stores import check_reachable, resolve_uri
from lab.tracking import log_samples, run_checkpoint

RUN_ID = re.compile(r"[0-9a-f]{32}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lab.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a best.pt, a save_pretrained folder, an MLflow run id or runs:/RUN_ID")
    parser.add_argument("--labels", nargs="+", default=[], metavar="FILE",
                        help="label-set files (test.json, new_test.json, any JSON list of label lists)")
    parser.add_argument("--prompt", action="append", default=[], metavar="LABELS",
                        help='a label set, e.g. "red sphere, cyan cylinder, cyan cube" (repeatable)')
    parser.add_argument("--n", type=positive, default=8, help="images per --prompt (default: %(default)s)")
    parser.add_argument("--frames", type=positive, default=10, help="frames of a prompt's denoising process")
    parser.add_argument("--seeds", type=positive, default=3, help="sampling seeds per label file (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="the first sampling seed (default: 0)")
    parser.add_argument("--out", help="output folder (default: samples/ beside the checkpoint)")
    parser.add_argument("--root", help="data root whose labels and evaluator to use (default: the checkpoint's)")
    parser.add_argument("--evaluator", help="an evaluator checkpoint, e.g. the course's checkpoint.pth")
    parser.add_argument("--sampler", help="ddpm, ddim or dpmsolver++; euler or dpmsolver++ for flow matching "
                                          "(default: the run's)")
    parser.add_argument("--steps", type=positive, help="sampler steps (default: the run's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the run's)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="guide only at noise levels t/T within [LOW, HIGH], 1 being pure noise "
                             "(default: the run's)")
    parser.add_argument("--batch-size", type=positive, help="images per sampling batch (default: the run's)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--tracking-uri", help="the MLflow store of a run id and of --log (default: "
                                               "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--log", action="store_true", help="also log the grids and figures to the checkpoint's "
                                                           "MLflow run (images under sample/, sample/* metrics)")
    args = parser.parse_args(argv)
    if not args.labels and not args.prompt:
        parser.error("nothing to draw: give --labels FILE ... and/or --prompt LABELS")
    return args


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def resolve_checkpoint(spec, tracking_uri, tmp):
    """(a local checkpoint path or pipeline folder, the MLflow run id it belongs to or None)."""
    run_id = spec.removeprefix("runs:/").split("/")[0] if spec.startswith("runs:/") else None
    if run_id is None and RUN_ID.fullmatch(spec) and not Path(spec).exists():
        run_id = spec
    if run_id is not None:
        uri = resolve_uri(tracking_uri)
        check_reachable(uri, "--tracking-uri")
        return run_checkpoint(MlflowClient(uri), run_id, tmp), run_id
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(path, "no such checkpoint file or pipeline folder (nor an MLflow run id)")
    record = run_folder.read_record(path.parent) if path.is_file() else None
    return path, record and record["run_id"]


def with_overrides(config, args):
    """The checkpoint's config with the command line's data root, evaluator and sampler settings."""
    raw = config.model_dump(mode="json")
    changes = {("data", "root"): args.root, ("eval", "evaluator"): args.evaluator, ("eval", "sampler"): args.sampler,
               ("eval", "steps"): args.steps, ("eval", "guidance_scale"): args.guidance,
               ("eval", "guidance_interval"): args.guidance_interval, ("eval", "batch_size"): args.batch_size}
    for (section, key), value in changes.items():
        if value is not None:
            raw[section][key] = value
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        dotted, message = describe_error(e, raw)
        raise UserError(f"--{dotted.split('.')[-1].replace('_', '-')}", message) from None


def read_label_file(path, names, root=None):
    """A label-set file (a JSON list of label lists) as multi-hot rows; bad entries name file and entry. A name
    that is no file here is looked up in the data root (`--labels test.json` draws the run's own test set)."""
    path = Path(path).expanduser()
    if not path.exists() and root is not None and (Path(root) / path).is_file():
        path = Path(root) / path
    sets = read_json(path)
    if not isinstance(sets, list) or not sets:
        raise UserError(path, "expected a non-empty JSON list of label lists")
    indices = label_indices(sets, names, path)
    for row, labels in enumerate(indices):
        if len(set(labels)) != len(labels):
            raise UserError(path, f"entry {row} names a label twice; a label set names each label once")
    return multi_hot(indices, len(names))


def write_pngs(images, folder):
    """Each image as a 64x64 PNG (upsampled as the evaluator reads it); their paths."""
    folder.mkdir(parents=True)
    paths = []
    for i, image in enumerate(to_uint8(resize(images.float().cpu(), EVALUATOR_SIZE))):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


def read_pngs(paths):
    """The PNGs as written, read back from disk into [-1, 1] (as ToTensor and Normalize(0.5, 0.5) would)."""
    return normalize(torch.from_numpy(np.stack([decode(path, EVALUATOR_SIZE) for path in paths])))


def draw_file(name, labels, setup, seeds, out):
    """Every label set of one file under each sampling seed: PNGs, grids, and the figures of the PNGs."""
    stem = Path(name).stem
    judgements, per_seed, grids = [], {}, []
    for seed in seeds:
        images = generate(setup.model, labels, setup, seed=seed, desc=f"{stem}, seed {seed}")
        pngs = read_pngs(write_pngs(images, out / stem / f"seed{seed}"))
        judged = judge_samples(pngs, labels, setup.evaluator, setup.strict_judge)
        judgements.append(judged)
        per_seed[seed] = judged.metrics()
        save_image(pngs.add(1).div(2), out / stem / f"grid_seed{seed}.png", nrow=8)  # the course's make_grid
        labelled_grid(pngs, label_names_of(labels, setup.label_names), verdicts=judged.verdicts).save(
            out / stem / f"labelled_seed{seed}.png")
        grids += [out / stem / f"grid_seed{seed}.png", out / stem / f"labelled_seed{seed}.png"]
    return {"file": str(name), "label_sets": len(labels), **over_seeds(judgements), "per_seed": per_seed}, grids


def draw_prompt(index, prompt, row, setup, args, out):
    """--n images of one label set, their grids and figures, and its denoising process."""
    folder = out / f"prompt{index}"
    labels = row.expand(args.n, -1)
    images = generate(setup.model, labels, setup, seed=args.seed, desc=f"prompt {index}")
    pngs = read_pngs(write_pngs(images, folder / "images"))
    judged = judge_samples(pngs, labels, setup.evaluator, setup.strict_judge)
    save_image(pngs.add(1).div(2), folder / "grid.png", nrow=8)
    labelled_grid(pngs, label_names_of(labels, setup.label_names), verdicts=judged.verdicts).save(
        folder / "labelled.png")
    cfg = setup.config.eval
    with build.autocast(setup.config, setup.device):
        frames = denoising_strip(setup.model, row.to(setup.device), frames=args.frames,
                                 train_scheduler=setup.noise_scheduler, sampler=cfg.sampler, steps=cfg.steps,
                                 eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                                 guidance_interval=cfg.guidance_interval,
                                 generator=torch.Generator(setup.device).manual_seed(args.seed),
                                 image_size=setup.config.data.image_size)
    titled_rows(frames.float().transpose(0, 1), [prompt]).save(folder / "denoising.png")
    return {"prompt": prompt, "images": args.n, **judged.metrics()}, [folder / "labelled.png", folder / "denoising.png"]


def default_out(path):
    return (path.parent if path.is_file() else path) / "samples"


@reports_user_errors
def main(argv=None):
    args = parse_args(argv)
    device = build.pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="lab-sample-") as tmp:
        path, run_id = resolve_checkpoint(args.checkpoint, args.tracking_uri, tmp)
        if args.log and run_id is None:
            raise UserError("--log", f"{path} belongs to no MLflow run that this machine knows (no run.json beside it)")
        pipe = load_pipeline(path)
        if pipe.experiment_yaml is None:
            raise UserError(path, "has no experiment.yaml: its data root and evaluator are unknown")
        config = with_overrides(ExperimentConfig.model_validate(yaml.safe_load(pipe.experiment_yaml)), args)
        setup = build.sampling_setup(pipe.model.to(device).eval(), config, device, splits=[])
        files = {name: read_label_file(name, setup.label_names, setup.root) for name in args.labels}  # all checked first
        prompts = [(prompt, multi_hot_of(prompt, setup.label_names)) for prompt in args.prompt]
        out = Path(args.out).expanduser() if args.out else default_out(path)
        if out.exists() and not out.is_dir():
            raise UserError(out, "is not a folder (--out)")
        partial = out.with_name(f".{out.name}.partial{os.getpid()}")
        try:
            summary, images = write_all(files, prompts, setup, args, partial)
            summary.update(checkpoint=str(args.checkpoint), run_id=run_id, device=str(device),
                           settings={"sampler": config.eval.sampler, "steps": config.eval.steps,
                                     "guidance_scale": config.eval.guidance_scale, "data_root": config.data.root,
                                     "evaluator": config.eval.evaluator or "ours for the data root",
                                     "strict_judge": setup.strict_judge is not None,
                                     "seeds": list(range(args.seed, args.seed + args.seeds))})
            (partial / "summary.json").write_text(json.dumps(summary, indent=1))
            if out.exists():
                shutil.rmtree(out)
            os.replace(partial, out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    for line in summary_lines(summary):
        print(line)
    print(f"written to {out}")
    if args.log:
        metrics = {f"sample/{Path(f['file']).stem}_{key}": value for f in summary["files"]
                   for key, value in f.items() if isinstance(value, float)}
        log_samples(MlflowClient(resolve_uri(args.tracking_uri or config.tracking_uri)), run_id, metrics,
                    [out / path.relative_to(partial) for path in images] + [out / "summary.json"])
        print(f"logged to MLflow run {run_id} (images under sample/, metrics sample/*)")
    return 0


def write_all(files, prompts, setup, args, out):
    out.mkdir(parents=True)
    summary, images = {"files": [], "prompts": []}, []
    seeds = range(args.seed, args.seed + args.seeds)
    for name, labels in files.items():
        figures, grids = draw_file(name, labels, setup, seeds, out)
        summary["files"].append(figures)
        images += grids
    for index, (prompt, row) in enumerate(prompts):
        figures, grids = draw_prompt(index, prompt, row, setup, args, out)
        summary["prompts"].append(figures)
        images += grids
    return summary, images


def summary_lines(summary):
    lines = []
    for f in summary["files"]:
        exact = (f"; exact scenes {f['exact_accuracy']:.4f} ± {f['exact_accuracy_std']:.4f}, extra objects "
                 f"{f['extra_objects']:.3f}, missing objects {f['missing_objects']:.3f}" if "exact_accuracy" in f else
                 "; no strict judge for these images")
        seeds = ", ".join(f"{m['accuracy']:.4f}" for m in f["per_seed"].values())
        lines.append(f"{f['file']}: accuracy {f['accuracy']:.4f} ± {f['accuracy_std']:.4f} over "
                     f"{len(f['per_seed'])} seeds ({seeds}){exact}")
    for p in summary["prompts"]:
        exact = f", exact scenes {p['exact_accuracy']:.3f}" if "exact_accuracy" in p else ""
        lines.append(f"prompt \"{p['prompt']}\": accuracy {p['accuracy']:.3f} on {p['images']} images{exact}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
