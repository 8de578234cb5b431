"""Run an experiment from YAML: `python run_experiment.py experiments/base.yaml [--set key=value ...]`.

--dry-run prints the resolved config and exits. --seeds repeats the experiment over several seeds
(one MLflow run each, sharing a group tag). Errors a user can make end in one line and exit code 1.
"""
import argparse
import sys

from lab.config import load_config, to_yaml
from lab.errors import UserError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="an experiment YAML (experiments/base.yaml, an ablation, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted key, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--seeds", type=int, nargs="+", help="repeat over these seeds (overrides `seeds:`)")
    parser.add_argument("--fresh", action="store_true", help="ignore an interrupted run's checkpoint and start over")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        seeds = args.seeds or config.seeds
        if args.dry_run:
            print(to_yaml(config), end="")
            return 0
        from lab import experiment  # heavy imports (torch, diffusers, mlflow) only when training
        summaries = experiment.run(config, args.config, seeds=seeds, fresh=args.fresh, device=args.device)
        experiment.print_summaries(summaries)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
