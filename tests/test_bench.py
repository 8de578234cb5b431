"""`python bench.py`: the CPU smoke run prints every section and writes every figure (nothing timed is asserted)."""
import json
import math

import pytest

import bench
from lab.benchmark import parse_sampler, quick_overrides
from lab.config import load_config
from lab.errors import UserError


def test_quick_overrides_resolve_against_base(tmp_path, experiments_dir):
    overrides = quick_overrides(tmp_path / "root", tmp_path / "e.pth", tmp_path)
    config = load_config(experiments_dir / "base.yaml", overrides)
    assert (config.model.unet, config.data.image_size, config.train.batch_size) == ("tiny", 32, 8)
    assert config.diffusion.num_train_timesteps == 100 and config.eval.evaluator == str(tmp_path / "e.pth")


def test_sampler_names():
    assert parse_sampler("ddpm") == ("ddpm", None)
    assert parse_sampler("ddim-50") == ("ddim", 50)
    assert parse_sampler("dpmsolver++-20") == ("dpmsolver++", 20)
    assert parse_sampler("ddpm-1000") == ("ddpm", 1000)  # checked against num_train_timesteps later
    for bad in ("ddim", "ddim-0", "euler-20", "ddim-x"):
        with pytest.raises(UserError):
            parse_sampler(bad)


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_cpu_smoke_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--steps", "2", "--warmup", "1", "--val-sets", "2",
                       "--log-events", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for heading in ("(a) training", "(b) peak GPU memory", "(c) sampling", "(d) MLflow logging",
                    "(e) the fast path's share of the machine", "step / bf16", "step / fp32", "targets",
                    "fast / reference:", "SHRUNK SMOKE RUN"):
        assert heading in printed
    for name in ("ddpm-100", "ddim-50", "ddim-100", "dpmsolver++-20"):
        assert name in printed
    # each path and sampler is printed as soon as it is measured, before the report: a run stopped by a
    # timeout in a later section has still shown them (one on a GPU lost its figures that way)
    progress = printed.split("\nlab.bench ")[0]
    assert progress.count(" images/s, ") == 2 and "ddpm-100 guidance 2: " in progress

    results = json.loads(out.read_text())
    assert set(results) == {"meta", "training", "memory", "sampling", "logging", "machine_share", "targets"}
    share = results["machine_share"]
    assert all(_positive(share[k]) for k in ("gflop_per_image", "step_gflop_per_s", "matmul_bf16_gflop_per_s",
                                              "matmul_fp32_gflop_per_s", "share_of_bf16", "share_of_fp32"))
    meta = results["meta"]
    assert meta["shrunk"] and meta["device"] == "cpu" and meta["torch"] and meta["diffusers"] and meta["date"]
    assert meta["command"].startswith("python bench.py") and "model.unet=tiny" in meta["overrides"]
    assert meta["config"]["model"]["unet"] == "tiny" and meta["steps"] == 2 and meta["warmup"] == 1

    training = results["training"]
    for path in ("reference", "fast"):
        figures = training[path]
        assert all(_positive(figures[k]) for k in ("images_per_s", "step_ms", "warmup_s", "final_loss")), figures
        assert figures["first_steps_overhead_s"] >= 0 and figures["peak_mem_gib"] is None  # no GPU
    assert _positive(training["speedup"])
    assert results["memory"] == {"reference_gib": None, "fast_gib": None, "ratio": None}

    rows = results["sampling"]
    assert {(r["sampler"], r["guidance"]) for r in rows} == {
        (s, g) for s in ("ddpm-100", "ddim-50", "ddim-100", "dpmsolver++-20") for g in (1.0, 2.0)}
    for r in rows:
        assert _positive(r["s_per_batch32"]) and _positive(r["speedup_vs_ddpm"]), r
        assert 0 <= r["val_accuracy"] <= 1 and math.isfinite(r["accuracy_minus_ddpm"])
        steps = {"ddpm-100": 100, "ddim-50": 50, "ddim-100": 100, "dpmsolver++-20": 20}[r["sampler"]]
        assert r["model_evals_per_image"] == steps * (2 if r["guidance"] > 1 else 1)
    assert all(r["speedup_vs_ddpm"] == 1 for r in rows if r["kind"] == "ddpm")

    logging = results["logging"]
    assert logging["events"] == 3 and logging["metrics_per_event"] == 8 and logging["log_every"] == 50
    for key in ("call_ms_per_event", "with_background_ms_per_event", "ms_per_step", "fast_step_ms", "share_pct",
                "share_with_background_pct"):
        assert _positive(logging[key]), (key, logging[key])

    assert len(results["targets"]) == 4
    assert all(isinstance(t["met"], bool) and not t["applies"] and math.isfinite(t["measured"])
               for t in results["targets"])
