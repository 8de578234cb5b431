"""What `python bench.py` measures, each on the trainer's own objects: training images/s of the common reference
loop and of the trainer's step (`lab.trainer.TrainStep`), the step's FLOP/s beside a matmul's on the same device,
peak GPU memory, sampling time and accuracy per sampler, and MLflow logging's share of a step. `run` returns
every figure; bench.py prints them.

The reference loop is the common baseline the fast path replaces: a torch DataLoader whose Dataset opens each
PNG with PIL per item and applies torchvision's Resize/ToTensor/Normalize, fp32, eager, plain (not fused) Adam
and `loss.item()` every step. It trains the same architecture on the same loss (`lab.build.training_loss`),
with the same gradient clipping and EMA as the config, so the ratio measures the input pipeline and the
execution settings, not dropped work.
"""
import contextlib
import copy
import dataclasses
import gc
import math
import os
import platform
import shlex
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import diffusers
import mlflow
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms
from tqdm import tqdm

from lab import build
from lab.config import load_config
from lab.data.synthetic import write_root
from lab.errors import UserError
from lab.eval import build_resnet, for_evaluator, save_evaluator
from lab.hardware import machine
from lab.sampling import generate, load_for_sampling
from lab.schedules import SAMPLERS as KNOWN_SAMPLERS
from lab.tracking import Tracker, mlflow_key
from lab.trainer import TrainStep

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "experiments" / "base.yaml"
SAMPLE_BATCH = 32                     # sampling time is reported per batch of this many images
# Targets for base.yaml on one H100.
TARGET_SPEEDUP, TARGET_LOG_SHARE, TARGET_SAMPLER_SPEEDUP, TARGET_ACC_GAP = 3.0, 1.0, 25.0, 0.01
MATMUL_SIZE = 2048                    # the square matmul whose FLOP/s the training step's are set against
QUICK_DEFAULTS = {"steps": 10, "warmup": 3, "val_sets": 8, "log_events": 20, "scenes": 20}
GPU_DEFAULTS = {"steps": 100, "warmup": 10, "val_sets": None, "log_events": 50}


def quick_overrides(root, evaluator, tmp):
    """The shrunk config for CPU smoke runs, as --set overrides (the user's --set still win)."""
    return [f"data.root={root}", "data.image_size=32", "model.unet=tiny", "train.batch_size=8",
            "diffusion.num_train_timesteps=100", f"eval.evaluator={evaluator}",
            f"tracking_uri=sqlite:///{Path(tmp) / 'mlflow.db'}", f"output_dir={Path(tmp) / 'runs'}"]


def parse_sampler(name):
    """'ddim-50' -> ('ddim', 50); 'ddpm' -> ('ddpm', None): all training steps ('ddpm-N' must name all of them)."""
    if name == "ddpm":
        return name, None
    kind, _, steps = name.rpartition("-")
    if kind not in KNOWN_SAMPLERS or not steps.isdigit() or int(steps) < 1:
        raise UserError("--samplers", f"'{name}' is not ddpm, ddim-N or dpmsolver++-N")
    return kind, int(steps)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed_steps(step, warmup, steps, device, desc=None):
    """(seconds of the warm-up steps, steady-state seconds per step) of step(i) for i = 0, 1, ...

    The progress bar's update costs microseconds against steps of milliseconds, and never syncs the device."""
    bar = tqdm(total=warmup + steps, desc=desc, unit="step", leave=False, disable=None)
    sync(device)
    start = time.perf_counter()
    for i in range(warmup):
        step(i)
        bar.update()
    sync(device)
    warm = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
        bar.update()
    sync(device)
    bar.close()
    return warm - start, (time.perf_counter() - warm) / steps


def measured(path):
    """A path's figures as soon as they are measured: a run stopped later (a timeout) has still printed them."""
    return (f"    {path['images_per_s']:.1f} images/s, {path['step_ms']:.1f} ms/step, warm-up {path['warmup_s']:.1f} s"
            + (f" (compilation {path['compile_s']:.1f} s)" if path.get("compile_s") is not None else ""))


def training_figures(name, warmup_s, step_s, warmup, images_per_step, device, **extra):
    return {"path": name, "images_per_s": images_per_step / step_s, "step_ms": step_s * 1e3,
            "warmup_steps": warmup, "warmup_s": warmup_s,
            # what the first steps cost beyond steady state: compilation (fast path on GPU), worker start-up
            "first_steps_overhead_s": max(warmup_s - warmup * step_s, 0.0),
            "peak_mem_gib": peak_gib(device), **extra}


# --- (a) the reference loop -----------------------------------------------------------------------------

class PilImages(torch.utils.data.Dataset):
    """The common baseline's Dataset: each item opens its PNG with PIL and transforms it with torchvision."""

    def __init__(self, folder, names, labels, size, hflip=False):
        self.paths = [Path(folder) / name for name in names]
        self.labels = labels
        steps = [transforms.Resize((size, size))] + ([transforms.RandomHorizontalFlip()] if hflip else [])
        self.transform = transforms.Compose([*steps, transforms.ToTensor(),
                                             transforms.Normalize((0.5,) * 3, (0.5,) * 3)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def bench_reference(setup, initial, args, steps, warmup):
    """fp32, eager, PIL per item in a DataLoader, plain Adam, .item() every step."""
    config, device, tc = setup.config, setup.device, setup.config.train
    dataset = PilImages(setup.root / config.data.image_dir, setup.data.names, setup.data.labels, config.data.image_size,
                        config.data.hflip)
    if len(dataset) < tc.batch_size:
        raise UserError("train.batch_size", f"{tc.batch_size} is more than the {len(dataset)} training images")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(config.seed))
    reset_peak(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # plain fp32
    model = copy.deepcopy(initial).to(device).train()
    optimizer = build.make_optimizer(config, model.parameters())  # not fused
    # the candidate EMA lengths step too, as in the fast path: the same work on both sides
    emas = [ema for ema in (build.make_ema(config, model.parameters()),
                            *build.make_candidate_emas(config, model.parameters()).values()) if ema is not None]
    generator = torch.Generator(device).manual_seed(config.seed)
    batches = None
    losses = []

    def forever():
        while True:
            yield from loader

    def step(i):
        nonlocal batches
        batches = batches or forever()  # the first step starts the workers: part of its warm-up
        optimizer.zero_grad()
        for _ in range(tc.grad_accum):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            per_sample, _ = build.training_loss(config, model, setup.noise_scheduler, x, y, generator)
            loss = per_sample.mean() / tc.grad_accum
            loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        for ema in emas:
            ema.step(model.parameters())
        losses.append(loss.item() * tc.grad_accum)  # a typical script reads the loss back every step

    try:
        warmup_s, step_s = timed_steps(step, warmup, steps, device, desc="reference loop")
        figures = training_figures("reference", warmup_s, step_s, warmup, tc.batch_size * tc.grad_accum, device,
                                   final_loss=losses[-1], loader_workers=args.workers)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if not all(map(math.isfinite, losses)):
        raise UserError(setup.config_path, "the reference loop's loss became non-finite")
    return figures  # the model, optimiser and the loader's workers go with this frame


# --- (a) the fast path ----------------------------------------------------------------------------------

def bench_fast(setup, steps, warmup):
    """lab.trainer.TrainStep, the trainer's own step object, driven and read back as train() drives it."""
    device = setup.device
    reset_peak(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    setup.model.to(device)
    train_step = TrainStep(setup, total_steps=warmup + steps)
    every, losses = setup.config.train.log_every, []

    def step(k):
        epoch, i = divmod(k, train_step.steps_per_epoch)
        if i == 0:
            train_step.start_epoch(epoch)
        train_step(i, k + 1)
        if (k + 1) % every == 0 or device.type == "cpu":  # train()'s readback: every step on CPU
            window = train_step.read_window()
            losses.append(float("nan") if window.first_nonfinite else window.loss)
            if (k + 1) % every == 0:
                train_step.reset_window()

    try:
        warmup_s, step_s = timed_steps(step, warmup, steps, device, desc="fast path")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    window = train_step.read_window()
    final = window.loss if math.isfinite(window.loss) or not losses else losses[-1]  # an empty last window: 0/0
    if window.first_nonfinite or not all(map(math.isfinite, [*losses, final])):
        raise UserError(setup.config_path, "the fast path's loss became non-finite")
    compiled, fast = build.compiles(setup.config, device), build.gpu_fast_path(setup.config, device)
    figures = training_figures("fast", warmup_s, step_s, warmup, train_step.images_per_step, device,
                               final_loss=final, compiled=compiled, autocast_bf16=build.uses_bf16(setup.config, device),
                               resident_on=str(train_step.images.device), channels_last=fast, fused_optimizer=fast)
    if compiled:
        figures["compile_s"] = figures["first_steps_overhead_s"]
    setup.model.to("cpu")  # frees the device for sampling; the optimiser state goes with this frame
    return figures


# --- (c) sampling ---------------------------------------------------------------------------------------

def sampling_setup(setup, initial, checkpoint):
    """(setup for lab.sampling.generate, description of the model): a checkpoint's trained model with its own
    config's schedule and image size, or the config's freshly initialised model."""
    if checkpoint:
        model, config = load_for_sampling(checkpoint, setup.device)
        scheduler = build.make_noise_scheduler(config)
        described = f"trained: {checkpoint}"
    else:
        model, config, scheduler = copy.deepcopy(initial).to(setup.device).eval(), setup.config, setup.noise_scheduler
        described = "untrained (freshly initialised; accuracies are chance level)"
    config = config.model_copy(update={"eval": config.eval.model_copy(update={"eta": 0.0})})  # eta is DDIM-only
    return dataclasses.replace(setup, config=config, model=model, noise_scheduler=scheduler), described


def bench_sampling(ssetup, labels, evaluator, runs, guidances, seeds):
    device, model = ssetup.device, ssetup.model
    T = ssetup.noise_scheduler.config.num_train_timesteps
    for g in guidances:  # warm-up (allocator, cuDNN autotuning) for both batch shapes, untimed
        generate(model, labels[:SAMPLE_BATCH], ssetup, seed=0, sampler="ddim", steps=2, guidance_scale=g,
                 batch_size=SAMPLE_BATCH)
    rows = []
    bar = tqdm(total=len(guidances) * len(runs) * seeds, desc="sampling", unit="run", leave=False, disable=None)
    for g in guidances:
        for name, (kind, steps) in runs:
            if kind == "ddpm" and steps not in (None, T):
                raise UserError("--samplers", f"{name}: ddpm always runs all num_train_timesteps={T} steps")
            if steps is not None and steps > T:
                raise UserError("--samplers", f"{name}: more steps than num_train_timesteps={T}")
            reset_peak(device)
            seconds, accs = 0.0, []
            for seed in range(seeds):
                images = []
                for c, chunk in enumerate(labels.split(SAMPLE_BATCH)):
                    sync(device)
                    start = time.perf_counter()
                    images.append(generate(model, chunk, ssetup, seed=1_000 * seed + c, sampler=kind, steps=steps,
                                           guidance_scale=g, batch_size=SAMPLE_BATCH))
                    sync(device)
                    seconds += time.perf_counter() - start
                accs.append(evaluator.accuracy(for_evaluator(torch.cat(images)), labels))
                bar.set_postfix(sampler=name, guidance=g, refresh=False)
                bar.update()
            label = f"ddpm-{T}" if kind == "ddpm" else name
            rows.append({"sampler": label, "model_evals_per_image": (steps or T) * (1 if g == 1 else 2),
                         "guidance": g, "s_per_batch32": seconds / (seeds * len(labels)) * SAMPLE_BATCH,
                         "val_accuracy": sum(accs) / len(accs), "val_accuracy_per_seed": accs,
                         "peak_mem_gib": peak_gib(device), "kind": kind})
            tqdm.write(f"    {label} guidance {g:g}: {rows[-1]['s_per_batch32']:.3g} s / {SAMPLE_BATCH} images, "
                       f"accuracy {rows[-1]['val_accuracy']:.3f}")
    bar.close()
    for row in rows:  # ratios to DDPM (all steps) at the same guidance scale
        ddpm = next((r for r in rows if r["kind"] == "ddpm" and r["guidance"] == row["guidance"]), None)
        row["speedup_vs_ddpm"] = ddpm["s_per_batch32"] / row["s_per_batch32"] if ddpm else None
        row["accuracy_minus_ddpm"] = row["val_accuracy"] - ddpm["val_accuracy"] if ddpm else None
    return rows


# --- (d) MLflow logging ---------------------------------------------------------------------------------

def bench_logging(config, config_path, fast_step_s, events):
    """Time Tracker.log_metrics (+ the flushes it triggers) for train()'s per-log_every metric set against a
    temporary SQLite store, amortised per training step."""
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-mlflow-") as tmp:
        # the run's artifacts (config.yaml) go to the temporary folder, not ./mlruns
        tracker = Tracker(f"sqlite:///{Path(tmp) / 'mlflow.db'}", artifact_location=(Path(tmp) / "artifacts").as_uri())
        tracker.start(config, config_path)
        every = config.train.log_every

        def metrics(k):  # what train() logs every log_every steps (loss_q* for each non-empty quartile)
            return {"loss": 0.05 + 0.01 / (k + 1), "lr": config.train.lr, "epoch": k // 10,
                    "images_per_s": 1000.0 + k, **{f"loss_q{q}": 0.02 * q for q in range(1, 5)}}
        tracker.log_metrics(metrics(0), 0)  # untimed: the background writer's start-up is a one-off
        tracker.flush()
        calls = []
        loop_start = time.perf_counter()
        for k in range(events):
            start = time.perf_counter()
            tracker.log_metrics(metrics(k), (k + 1) * every)  # one asynchronous batch per call, as in train()
            calls.append(time.perf_counter() - start)
        start = time.perf_counter()
        tracker.flush()  # until the background writer has stored everything; train() waits before checkpoints
        calls[-1] += time.perf_counter() - start
        with_drain = time.perf_counter() - loop_start
        history = tracker.client.get_metric_history(tracker.run_id, mlflow_key("loss"))
        tracker.end()
    if len(history) != events + 1:
        raise UserError("mlflow", f"{len(history)} of {events + 1} logged loss points reached the store")
    per_event = sum(calls) / events
    per_event_drained = with_drain / events
    return {"metrics_per_event": len(metrics(0)), "metric_names": list(metrics(0)), "events": events,
            "log_every": every, "batches_sent": events,
            "call_ms_per_event": per_event * 1e3, "max_call_ms": max(calls) * 1e3,
            "with_background_ms_per_event": per_event_drained * 1e3,
            "ms_per_step": per_event / every * 1e3, "fast_step_ms": fast_step_s * 1e3,
            "share_pct": 100 * per_event / every / fast_step_s,
            "share_with_background_pct": 100 * per_event_drained / every / fast_step_s}


# --- (e) the step's share of the machine -----------------------------------------------------------

def training_flops_per_image(setup):
    """FLOPs of one training image's forward and backward through the config's model and loss (PyTorch's FLOP
    counter: matmuls and convolutions, which are nearly all of them)."""
    config, device = setup.config, setup.device
    batch = min(config.train.batch_size, len(setup.data.images))
    model = copy.deepcopy(setup.model).to(device).train()
    x0 = setup.data.images[:batch].to(device).float().div(127.5).sub(1)
    labels = setup.data.labels[:batch].to(device)
    with FlopCounterMode(display=False) as counter, build.autocast(config, device):
        per_sample, _ = build.training_loss(config, model, setup.noise_scheduler, x0, labels,
                                            torch.Generator(device).manual_seed(0))
        per_sample.float().mean().backward()
    return counter.get_total_flops() / batch


def matmul_flops_per_s(device, dtype, size=MATMUL_SIZE, seconds=2.0):
    """FLOP/s of a square `size` x `size` matmul in `dtype`, the best of repeated timings over about `seconds`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best, spent = math.inf, 0.0
    a @ b  # warm-up
    while spent < seconds:
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * size ** 3 / best


def machine_share(setup, fast):
    """The training step's FLOP/s (FLOPs per image x the fast path's images/s) against bf16 and fp32 matmuls
    measured in the same run."""
    flops = training_flops_per_image(setup)
    step = flops * fast["images_per_s"]
    bf16, fp32 = (matmul_flops_per_s(setup.device, dtype) for dtype in (torch.bfloat16, torch.float32))
    return {"gflop_per_image": flops / 1e9, "step_gflop_per_s": step / 1e9, "matmul_bf16_gflop_per_s": bf16 / 1e9,
            "matmul_fp32_gflop_per_s": fp32 / 1e9, "share_of_bf16": step / bf16, "share_of_fp32": step / fp32,
            "autocast_bf16": build.uses_bf16(setup.config, setup.device)}


@contextlib.contextmanager
def env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run(args, argv):
    device = build.pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device", "cuda requested but no CUDA device is available")
    # on CPU, base.yaml (no config named) is shrunk to a smoke run; a config named is measured as it is
    shrunk = args.quick or (device.type == "cpu" and args.config is None)
    args.config = args.config or str(DEFAULT_CONFIG)
    defaults = QUICK_DEFAULTS if shrunk else GPU_DEFAULTS
    steps, warmup = args.steps or defaults["steps"], defaults["warmup"] if args.warmup is None else args.warmup
    if args.workers is None:
        args.workers = 2 if device.type == "cpu" else min(8, os.cpu_count() or 1)
    runs = [(name, parse_sampler(name)) for name in args.samplers]
    started, cpu_start = time.perf_counter(), os.times()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on this machine
    threads = args.threads or (1 if shrunk and device.type == "cpu" else torch.get_num_threads())
    phases, last = {}, [started]

    def phase(name):  # wall seconds per part of the run, for the 2-minute budget of the smoke run
        now = time.perf_counter()
        phases[name] = now - last[0]
        last[0] = now
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(threads)
        overrides = []
        if shrunk:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ddpm-bench-")))
            stack.enter_context(env("DDPM_LAB_CACHE", str(tmp / "cache")))  # the decoded set stays in tmp
            root = write_root(tmp / "root", scenes=defaults["scenes"], seed=1, workers=2, progress=False)
            torch.manual_seed(0)
            save_evaluator(build_resnet(), tmp / "evaluator.pth")  # random init: never trains an evaluator
            overrides = quick_overrides(root, tmp / "evaluator.pth", tmp)
        overrides += args.overrides
        config = load_config(args.config, overrides)
        device_name = machine(device)
        print(f"lab.bench: {'shrunk ' if shrunk else ''}{Path(args.config).name} on {device_name}", flush=True)
        setup = build.prepare(config, args.config, device)
        initial = copy.deepcopy(setup.model).cpu()  # both paths and the untrained sampler start from these weights
        setup.model.cpu()
        phase("setup")

        print(f"(a) reference loop: {warmup} warm-up + {steps} timed steps", flush=True)
        reference = bench_reference(setup, initial, args, steps, warmup)
        phase("reference")
        print(measured(reference), flush=True)
        print(f"(a) fast path: {warmup} warm-up + {steps} timed steps", flush=True)
        fast = bench_fast(setup, steps, warmup)
        phase("fast")
        print(measured(fast), flush=True)

        val_sets = args.val_sets or defaults["val_sets"]
        labels = setup.val_labels[:val_sets] if val_sets else setup.val_labels
        ssetup, sampled_model = sampling_setup(setup, initial, args.checkpoint)
        print(f"(c) sampling {len(labels)} validation label sets x {args.sample_seeds} seed(s), "
              f"{len(runs)} samplers x guidance {args.guidance}", flush=True)
        sampling = bench_sampling(ssetup, labels, setup.evaluator, runs, args.guidance, args.sample_seeds)
        phase("sampling")
        print("(e) the step's FLOP/s against a matmul's", flush=True)
        share = machine_share(setup, fast)
        phase("flops")
        print("(d) MLflow logging", flush=True)
        logging = bench_logging(config, args.config, fast["step_ms"] / 1e3,
                                args.log_events or defaults["log_events"])
        phase("logging")
    cpu_end = os.times()
    return {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python bench.py", *map(shlex.quote, argv)]),
            "device": str(device), "device_name": device_name, "torch_threads": threads, "shrunk": shrunk,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "mlflow": mlflow.__version__,
            "python": platform.python_version(), "load_average_at_start": load_at_start,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "config_file": str(args.config), "overrides": overrides, "config": config.model_dump(mode="json"),
            "training_images": len(setup.data.images), "steps": steps, "warmup": warmup,
            "val_sets": len(labels), "sample_seeds": args.sample_seeds, "sampling_model": sampled_model,
            "wall_s": time.perf_counter() - started, "phase_s": phases,
            "cpu_s": (cpu_end.user + cpu_end.system + cpu_end.children_user + cpu_end.children_system)
                     - (cpu_start.user + cpu_start.system + cpu_start.children_user + cpu_start.children_system),
        },
        "training": {"reference": reference, "fast": fast,
                     "speedup": fast["images_per_s"] / reference["images_per_s"]},
        "memory": {"reference_gib": reference["peak_mem_gib"], "fast_gib": fast["peak_mem_gib"],
                   "ratio": (fast["peak_mem_gib"] / reference["peak_mem_gib"]) if device.type == "cuda" else None},
        "sampling": sampling,
        "logging": logging,
        "machine_share": share,
        "targets": targets(fast["images_per_s"] / reference["images_per_s"], logging, sampling,
                           smoke=shrunk or device.type != "cuda"),
    }


def targets(speedup, logging, sampling, smoke):
    guided = max((r["guidance"] for r in sampling), default=1.0)
    dpm = next((r for r in sampling if r["sampler"] == "dpmsolver++-20" and r["guidance"] == guided), None)
    rows = [("fast / reference training images/s", f">= {TARGET_SPEEDUP:g}x", speedup, speedup >= TARGET_SPEEDUP),
            ("MLflow logging share of step time", f"< {TARGET_LOG_SHARE:g} %", logging["share_pct"],
             logging["share_pct"] < TARGET_LOG_SHARE)]
    if dpm is not None and dpm["speedup_vs_ddpm"] is not None:
        rows += [(f"dpmsolver++-20 (guidance {guided:g}): |accuracy - ddpm|", f"<= {TARGET_ACC_GAP:g}",
                  abs(dpm["accuracy_minus_ddpm"]), abs(dpm["accuracy_minus_ddpm"]) <= TARGET_ACC_GAP),
                 (f"dpmsolver++-20 (guidance {guided:g}): ddpm time / its time", f">= {TARGET_SAMPLER_SPEEDUP:g}x",
                  dpm["speedup_vs_ddpm"], dpm["speedup_vs_ddpm"] >= TARGET_SAMPLER_SPEEDUP)]
    return [{"target": name, "wanted": wanted, "measured": value, "met": bool(met),
             "applies": not smoke} for name, wanted, value, met in rows]


