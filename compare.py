"""Compare finished MLflow runs: `python compare.py [--experiment iclevr-ablations] [--filter ...]`.

Prints one row per configuration (runs that differ only in seed: mean and n): the ablation and what it changes,
the validation metric with its 95% interval, the difference to base with its interval and verdict (a paired test
over training seeds for sampler and guidance rows, which sample the base's own weights; Welch's otherwise), then
the other judge's figure and the test accuracy; the best validation row in bold. --wide shows every column,
--format csv or latex for papers and spreadsheets. --charts writes PNGs. --best names the run with the best validation metric (test scores
are never used to choose); --final-test scores its checkpoint on the test splits over several sampling
seeds and logs the scores to that run. Errors a user can make end in one line and exit code 1.
"""
import argparse
import sys

from lab.errors import UserError, reports_user_errors


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="iclevr-ablations",
                        help="MLflow experiment name (default: %(default)s)")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--filter", dest="filter_string", metavar="MLFLOW_FILTER",
                        help="an MLflow search filter, e.g. \"tags.ablation = 'sampler'\"")
    parser.add_argument("--group-by", nargs="+", default=["ablation"], metavar="KEY",
                        help="ablation (default: a row per configuration along each ablation axis), or config "
                             "keys / tags to group by, e.g. model.conditioning eval.sampler")
    parser.add_argument("--metric", default="best_val_accuracy",
                        help="validation metric to aggregate and choose by (default: %(default)s)")
    parser.add_argument("--format", dest="fmt", choices=["markdown", "csv", "latex"], default="markdown",
                        help="markdown: one short row per configuration (what it changes, the metric with its 95%% "
                             "interval, the difference to base and its verdict); csv: every column")
    parser.add_argument("--wide", action="store_true", help="markdown with every column: each varying config key, "
                                                            "std over seeds, every figure")
    parser.add_argument("--charts", nargs="?", const="compare_charts", metavar="DIR",
                        help="write PNG charts into DIR (default DIR: compare_charts)")
    parser.add_argument("--best", action="store_true", help="print the run with the best validation metric "
                                                            "and its checkpoint")
    parser.add_argument("--final-test", action="store_true",
                        help="score the best run's checkpoint on its test splits and log the scores to that run")
    parser.add_argument("--seeds", type=positive, help="sampling seeds for --final-test (default: the run's "
                                                       "eval.final_seeds)")
    parser.add_argument("--device", help="for --final-test: cpu, cuda, ... (default: cuda when available)")
    return parser.parse_args(argv)


@reports_user_errors
def main(argv=None):
    args = parse_args(argv)
    if args.seeds and not args.final_test:
        raise UserError("--seeds", "only --final-test samples (add --final-test)")
    from lab import report  # pandas and mlflow load after --help
    report.compare(args.experiment, args.tracking_uri, args.filter_string, args.group_by, args.metric,
                   args.fmt, args.charts, args.best, args.final_test, args.seeds, args.device, wide=args.wide)
    return 0


if __name__ == "__main__":
    sys.exit(main())
