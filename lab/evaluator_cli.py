"""`python -m lab.eval train|check|thresholds|bench` (entry point `ddpm-lab-eval`): train our evaluator on a root
and check it on freshly rendered held-out scenes, check any evaluator checkpoint, scan the strict judge's count
steps, or time the evaluator's training step."""
import argparse
import sys
from pathlib import Path

import torch

from lab.data.roots import resolve_root
from lab.errors import UserError, reports_user_errors
from lab.evaluator_cache import default_evaluator_path
from lab.evaluator_training import (RECIPE, THRESHOLD_SEED, heldout_check, step_benchmark, strict_check,
                                    summary_lines, threshold_scan, train_and_check)


@reports_user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lab.eval", description="train or check the evaluator")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train our evaluator on a root (default: the synthetic set) and check it")
    train.add_argument("--root", default=None, help="data root (default: the synthetic i-CLEVR set)")
    train.add_argument("--out", default=None, help="checkpoint path (default: the cache)")
    train.add_argument("--phases", default=None, metavar="SIZE:IMAGES:LR,...",
                       help="input size, images seen and peak learning rate per phase (default "
                            + ",".join(":".join(map(str, phase)) for phase in RECIPE["phases"]) + ")")
    train.add_argument("--tracking-uri", default=None,
                       help="MLflow store for the training run (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    check = sub.add_parser("check", help="score a checkpoint on freshly rendered held-out scenes: the course's rule, "
                                         "and the strict judge on correct, duplicated, extra and missing scenes")
    check.add_argument("checkpoint")
    thresholds = sub.add_parser("thresholds", help="the strict judge's verdicts per kind with its expected count "
                                                   "stepping from 1 to 2 at each value, on scenes of another seed")
    thresholds.add_argument("checkpoint")
    thresholds.add_argument("--two-at", type=float, nargs="+", default=[1.3, 1.35, 1.4, 1.45, 1.5])
    thresholds.add_argument("--seed", type=int, default=THRESHOLD_SEED, help="seed of the rendered scenes")
    thresholds.add_argument("--scenes", type=int, default=1000, help="scenes of each kind")
    bench = sub.add_parser("bench", help="training images/s of the evaluator's step, with and without the strict "
                                         "judge's count head, layer4 as oneDNN's "
                                         "convolution and as a matmul, side by side")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 96])
    bench.add_argument("--steps", type=int, default=60, help="timed steps per case, after 5 untimed")
    for command in (train, check):
        command.add_argument("--scenes", type=int, default=1000,
                             help="held-out scenes of 3 objects (3 images each; a fifth as many of 5 objects), and "
                                  "as many scenes of each kind for the strict judge")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.command == "bench":
        table = step_benchmark(args.batch_sizes, args.steps, device=device)
        print(f"evaluator training step, {torch.get_num_threads()} threads on {device}:")
        print(table.to_string(index=False, float_format="%.2f"))
        return 0
    if args.command == "thresholds":
        table = threshold_scan(args.checkpoint, args.two_at, args.scenes, args.seed, device=device)
        print(f"exact-scene verdict right per kind, scenes of seed {args.seed}:")
        print(table.to_string(index=False, float_format="%.3f"))
        return 0
    if args.command == "train":
        recipe = {"phases": parse_phases(args.phases)} if args.phases else None
        root = resolve_root(args.root)
        out = Path(args.out) if args.out else default_evaluator_path(root)
        results, strict = train_and_check(root, out, device, args.tracking_uri, recipe, scenes=args.scenes)
    else:
        results = heldout_check(args.checkpoint, scenes=args.scenes, device=device)
        strict = strict_check(args.checkpoint, per_kind=args.scenes, device=device)
    worst = min(results, key=lambda case: results[case]["accuracy"])
    print(f"per label, {worst}:")
    print(results[worst]["per_label"].to_string(index=False, float_format="%.3f"))
    print("\n".join(summary_lines(results, strict)))
    return 0


def parse_phases(text):
    """'32:90000:2e-3,64:20000:1e-3' -> [[32, 90000, 0.002], [64, 20000, 0.001]]"""
    try:
        phases = [[int(size), int(images), float(lr)] for size, images, lr in (part.split(":") for part in text.split(","))]
    except ValueError:
        phases = None
    if not phases or any(size < 16 or images < 1 or not 0 < lr < 1 for size, images, lr in phases):
        raise UserError("--phases", "expected SIZE:IMAGES:LR,... with sizes >= 16, images >= 1 and 0 < lr < 1, "
                                    f"got {text!r}")
    return phases


if __name__ == "__main__":
    sys.exit(main())
