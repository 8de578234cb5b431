"""`python bench.py`: one run that measures, side by side on the same machine (lab/benchmark.py measures,
this prints),

(a) training images/s of the common reference loop and of the trainer's fast path (steady state after
    warm-up; the warm-up overhead, i.e. compilation on GPU, reported separately) and their ratio,
(b) peak GPU memory of each path,
(c) sampling time per 32-image batch and validation accuracy of DDPM (all training steps), DDIM-50,
    DDIM-100 and DPM-Solver++-20, each with and without classifier-free guidance,
(d) the share of the fast path's step time spent in MLflow logging,
(e) the fast path's FLOP/s (PyTorch's FLOP counter x images/s) as a share of a 2048x2048 matmul's in bf16
    and fp32, measured in the same run,

prints one table per section with the ratios and the targets, and writes every figure to JSON.

    python bench.py experiments/base.yaml --json docs/bench-h100.json      # on a GPU: the config as given
    python bench.py experiments/quickstart.yaml --set ...                  # on CPU: that config
    python bench.py                                                        # on CPU: a shrunk smoke run

On CPU without a config of its own (or with --quick) the config is shrunk the lightning-hydra way, by
overrides (a tiny UNet at 32x32, 100 training timesteps, batch 8), on a 20-scene synthetic root rendered into a
temporary folder and a random-init evaluator, with one torch thread, so the run takes about a minute on 2 cores
and never trains an evaluator. Its figures only show that every measurement runs. docs/benchmarks.md explains
every column.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from lab.benchmark import GPU_DEFAULTS, QUICK_DEFAULTS, SAMPLE_BATCH, run
from lab.errors import UserError

SAMPLERS = ["ddpm", "ddim-50", "ddim-100", "dpmsolver++-20"]  # "ddpm" = all training timesteps
GUIDANCE = [1.0, 2.0]                 # 1 = no guidance; > 1 = classifier-free guidance (one doubled batch)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None,
                        help="experiment YAML (default: experiments/base.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted config key (repeatable; applied after the --quick shrink)")
    parser.add_argument("--steps", type=int, help="timed training steps per path (default: 100 on GPU, "
                        f"{QUICK_DEFAULTS['steps']} shrunk)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps per path, compilation included "
                        f"(default: 10 on GPU, {QUICK_DEFAULTS['warmup']} shrunk)")
    parser.add_argument("--checkpoint", help="a best.pt: sample with that trained model (its own config's "
                        "architecture and schedule) instead of the config's freshly initialised one")
    parser.add_argument("--json", default="bench.json", help="where to write every figure (default: bench.json)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="shrink the config as on CPU, also on a GPU")
    parser.add_argument("--workers", type=int, help="DataLoader workers of the reference loop "
                        "(default: 2 on CPU, min(8, CPU cores) on GPU)")
    parser.add_argument("--val-sets", type=int, help="validation label sets to sample (default: all; "
                        f"{QUICK_DEFAULTS['val_sets']} shrunk); times are per {SAMPLE_BATCH} images either way")
    parser.add_argument("--sample-seeds", type=int, default=1, help="sampling seeds per sampler (accuracy "
                        "and time are averaged over them)")
    parser.add_argument("--samplers", nargs="+", default=SAMPLERS, metavar="NAME",
                        help="ddpm (all training steps), ddim-N, dpmsolver++-N (default: %(default)s)")
    parser.add_argument("--guidance", nargs="+", type=float, default=GUIDANCE, metavar="SCALE",
                        help="guidance scales (default: 1 2; 1 = unguided)")
    parser.add_argument("--threads", type=int, help="torch CPU threads during the run (default: 1 for a shrunk "
                        "CPU run, whose tiny batches gain little from more and on a busy machine lose a lot to "
                        "threads waiting on each other; else torch's default)")
    parser.add_argument("--log-events", type=int, help="MLflow log calls timed (default: 50 on GPU, "
                        f"{QUICK_DEFAULTS['log_events']} shrunk)")
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "val_sets", "sample_seeds", "log_events", "workers", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name in ("warmup", "workers") else 1):
            parser.error(f"--{name.replace('_', '-')} must be {'>= 0' if name in ('warmup', 'workers') else '>= 1'}")
    return args


# --- output ---------------------------------------------------------------------------------------------

def _fmt(value, digits=3):
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _table(rows, columns):
    frame = pd.DataFrame([{title: _fmt(row.get(key)) for key, title in columns} for row in rows])
    return frame.to_string(index=False)


def report(results):
    """The printed tables, sections (a)-(d) and the targets."""
    meta, tr, lg, c = results["meta"], results["training"], results["logging"], results["meta"]["config"]
    paths = [tr["reference"], tr["fast"]]
    smoke = not all(t["applies"] for t in results["targets"])
    lines = [f"lab.bench {meta['date']}  {meta['device_name']}  torch {meta['torch']}, diffusers {meta['diffusers']}",
             f"command: {meta['command']}"]
    if meta["overrides"]:
        lines.append("overrides: " + " ".join(meta["overrides"]))
    if meta["shrunk"]:
        lines.append("SHRUNK SMOKE RUN: figures show the measurements run, not GPU performance")

    def section(title, table, *notes):
        lines.extend(["", title, table, *notes])

    section(f"(a) training, steady state: {meta['steps']} timed steps after {meta['warmup']} warm-up steps "
            f"(UNet {c['model']['unet']}, {c['data']['image_size']}px, batch {c['train']['batch_size']}"
            f"x{c['train']['grad_accum']}, {meta['training_images']} training images)",
            _table(paths, [("path", "path"), ("images_per_s", "images/s"), ("step_ms", "ms/step"),
                           ("warmup_s", "warm-up s"), ("first_steps_overhead_s", "warm-up overhead s"),
                           ("compile_s", "compile s"), ("final_loss", "loss")]),
            f"fast / reference: {tr['speedup']:.2f}x images/s")
    ratio = results["memory"]["ratio"]
    section("(b) peak GPU memory (torch.cuda.max_memory_allocated, reset per path)",
            _table(paths, [("path", "path"), ("peak_mem_gib", "GiB")]),
            *([f"fast / reference: {ratio:.2f}x memory"] if ratio is not None else []))
    section(f"(c) sampling: {meta['val_sets']} validation label sets x {meta['sample_seeds']} seed(s); "
            f"model {meta['sampling_model']}",
            _table(results["sampling"],
                   [("sampler", "sampler"), ("guidance", "guidance"), ("model_evals_per_image", "UNet evals"),
                    ("s_per_batch32", f"s / {SAMPLE_BATCH} images"), ("speedup_vs_ddpm", "ddpm time / time"),
                    ("val_accuracy", "val accuracy"), ("accuracy_minus_ddpm", "acc - ddpm"),
                    ("peak_mem_gib", "peak GiB")]))
    section(f"(d) MLflow logging: {lg['metrics_per_event']} metrics every {lg['log_every']} steps "
            f"({lg['events']} log calls timed, temporary SQLite store)",
            _table([lg], [("call_ms_per_event", "ms / log call"), ("max_call_ms", "max ms"),
                          ("with_background_ms_per_event", "incl. background ms"), ("ms_per_step", "ms / step"),
                          ("fast_step_ms", "fast step ms"), ("share_pct", "share %"),
                          ("share_with_background_pct", "share incl. background %")]))
    share = results["machine_share"]
    section(f"(e) the fast path's share of the machine ({'bf16 autocast' if share['autocast_bf16'] else 'fp32'})",
            _table([share], [("gflop_per_image", "GFLOP/image"), ("step_gflop_per_s", "step GFLOP/s"),
                             ("matmul_bf16_gflop_per_s", "bf16 matmul GFLOP/s"),
                             ("matmul_fp32_gflop_per_s", "fp32 matmul GFLOP/s"), ("share_of_bf16", "step / bf16"),
                             ("share_of_fp32", "step / fp32")]))
    section("targets (base.yaml on one H100" + ("; NOT applicable to this run)" if smoke else ")"),
            _table(results["targets"], [("target", "target"), ("wanted", "wanted"), ("measured", "measured"),
                                        ("met", "met")]),
            "", f"wall time {meta['wall_s']:.0f} s ("
            + ", ".join(f"{name} {seconds:.0f}" for name, seconds in meta["phase_s"].items())
            + f"), CPU time {meta['cpu_s']:.0f} s"
            + (f", load average {meta['load_average_at_start']:.1f} at the start"
               if meta.get("load_average_at_start") is not None else ""))
    return "\n".join(lines)


def _finite(value):
    """JSON has no NaN/inf: they become null (and show up as such)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        results = run(args, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(report(results))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_finite(results), indent=1, allow_nan=False) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
