"""Run an experiment from YAML: `python run_experiment.py experiments/base.yaml [--set key=value ...]`.

--dry-run checks the config and its inputs as a run would (loading no data), prints the resolved config
and exits. --seeds repeats the experiment over several seeds (one MLflow run each, sharing a group tag). A sweep file (a top-level `sweep:` key, experiments/sweeps/)
runs or resumes an Optuna study instead (lab/sweeps/). Errors a user can make end in one line and exit code 1.
"""
import argparse
import sys
from pathlib import Path

from lab.checks import check_run
from lab.config import flatten, load_config, read_yaml, to_yaml
from lab.errors import UserError, reports_user_errors


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="an experiment YAML (experiments/base.yaml, an ablation, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted key, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--base", metavar="FILE", help="apply the config's changes to this base instead of the one "
                        "it names (an ablation at another scale: --base experiments/cpu.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="check the config and its inputs as a run would (loading no data), print it as YAML and exit")
    parser.add_argument("--seeds", type=int, nargs="+", help="repeat over these seeds (overrides `seeds:`)")
    parser.add_argument("--fresh", action="store_true", help="ignore an interrupted run's checkpoint and start over; "
                        "train even when a finished run already trained this config (only its sampling differs)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--n-trials", type=int, metavar="N",
                        help="sweep files: finished trials the study should hold in total (overrides sweep.n_trials)")
    parser.add_argument("--storage", metavar="URL_OR_PATH",
                        help="sweep files: Optuna storage, an RDB URL (sqlite:///optuna.db, postgresql://...) "
                             "or a journal file (PATH.log, PATH.jsonl, journal:PATH)")
    return parser.parse_args(argv)


@reports_user_errors
def main(argv=None):
    args = parse_args(argv)
    if "sweep" in read_yaml(args.config):
        if args.base:
            raise UserError("--base", "not for sweep files (a sweep names its base config itself)")
        return run_sweep(args)
    if args.base and "sweep" in read_yaml(args.base):
        raise UserError("--base", f"{args.base} is a sweep file; --base takes an experiment config")
    if args.n_trials is not None or args.storage is not None:
        raise UserError("--n-trials/--storage", f"only for sweep files; {args.config} has no `sweep:` key")
    config = load_config(args.config, args.overrides, base=args.base)
    seeds = args.seeds or config.seeds
    base = args.base or read_yaml(args.config).get("base")
    if base and changes_nothing(config, base_config(base if args.base else Path(args.config).parent / base,
                                                    args.overrides)):
        print(f"{args.config}: changes nothing on {base} (preset {config.preset}); nothing to run")
        return 0
    if args.dry_run:
        check_run(config, args.fresh)  # what a run checks before it loads data or writes anything
        print(to_yaml(config), end="")
        return 0
    print_summaries(run(config, args.config, seeds=seeds, fresh=args.fresh, device=args.device))
    return 0


def base_config(path, overrides):
    """An ablation's base under the same overrides; None where they do not fit it (`--set model.unet=dit` on a
    base with adagn conditioning), so the ablation differs from it."""
    try:
        return load_config(path, overrides)
    except UserError:
        return None


def changes_nothing(config, base):
    """Whether an ablation resolves to its base's config: it only names an axis whose value the base already has
    (sampler_dpmsolver20 on base.yaml). Such a run would repeat the base's."""
    if base is None:
        return False
    ignored = {"run_name", "ablation"}
    return {k: v for k, v in flatten(config).items() if k not in ignored} == \
        {k: v for k, v in flatten(base).items() if k not in ignored}


def run(config, config_path, seeds=None, fresh=False, device=None, extra_tags=None, **train_options):
    """Train `config` once, or once per seed with run names `<name>-seed<k>` and a shared group tag."""
    from lab import build, trainer  # heavy imports (torch, diffusers) only when training
    if not seeds:
        return [trainer.train(build.prepare(config, config_path, device, fresh), fresh=fresh, extra_tags=extra_tags,
                              **train_options)]
    summaries = []
    for seed in seeds:
        seeded = config.model_copy(update={"seed": seed, "run_name": f"{config.run_name}-seed{seed}"})
        tags = {"group": config.run_name, **(extra_tags or {})}  # every seed keeps the caller's tags
        summaries.append(trainer.train(build.prepare(seeded, config_path, device, fresh), fresh=fresh, extra_tags=tags,
                                       **train_options))
    return summaries


def print_summaries(summaries):
    for s in summaries:
        if s.get("run_id") is None:  # a data-parallel worker other than the main process
            continue
        scores = ", ".join(f"{k} {v:.3f}" for k, v in s.items() if k.endswith("accuracy"))
        print(f"MLflow run {s['run_id']}: {s['steps']} steps; {scores}; best checkpoint {s['best_checkpoint']}")
        for grid in s.get("grids", []):
            print(f"grid: {grid}")
    if summaries and summaries[-1].get("tracking_uri"):
        from lab.tracking import experiment_url  # mlflow: not on --dry-run's path
        uri = summaries[-1]["tracking_uri"]
        base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"  # mlflow ui's own address
        url = experiment_url(summaries[-1]["experiment_id"], base)
        print(f"to look at the runs: {ui_command(uri)}, then open {url}")


def ui_command(uri):
    """The command that opens MLflow's UI on the store `uri` (a server's UI is its own address)."""
    return f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"


def run_sweep(args):
    if args.seeds or args.fresh:
        raise UserError("--seeds/--fresh", "not for sweep files (every trial trains once, from scratch; "
                                           "a new study_name starts a new study)")
    if args.dry_run:
        from lab.sweeps.schema import load_sweep, sweep_yaml  # no torch
        sweep = load_sweep(args.config, args.overrides, n_trials=args.n_trials, storage=args.storage)
        print(sweep_yaml(sweep), end="")
        return 0
    from lab.sweeps import study  # heavy imports only when a sweep runs
    study.print_summary(study.run(args.config, n_trials=args.n_trials, storage=args.storage,
                                    overrides=args.overrides, device=args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
