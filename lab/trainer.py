"""The training loop: read it top to bottom.

`prepare` turns a validated config into built objects (data, evaluator, model, schedulers) and fails,
before any MLflow run exists, on anything a user got wrong. `train` runs the loop: EMA, gradient
accumulation and clipping, LR warm-up and decay, periodic validation on `eval.split` with the EMA
weights, atomic `latest.pt` (resume state) and `best.pt` (EMA weights for sampling) checkpoints,
and a final score of the best checkpoint on the test splits.
"""
import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from lab import parallel, run_folder
from lab.checkpoints import checkpoint_exists, load_checkpoint, save_checkpoint
from lab.config import to_yaml
from lab.data import is_synthetic, load_condition_sets, load_objects, load_train, normalize, resolve_root
from lab.errors import UserError
from lab.eval import binding_errors, course_accuracy, ensure_evaluator, for_evaluator, load_evaluator
from lab.grids import label_names_of, labelled_grid, titled_rows
from lab.metrics import frechet_distance, kernel_distance
from lab.model_zoo import build_model
from lab.schedules import denoising_strip, loss_weights, make_noise_scheduler, make_sampler, sample, training_target
from lab.tracking import Tracker, check_reachable, resolve_uri

STRIP_LABELS = ["red sphere", "yellow cube", "cyan cylinder"]


class NonFiniteLoss(UserError):
    pass


class Stop(Exception):
    """Raised by an `on_validation` callback to end a run early (a pruned sweep trial)."""


@dataclass
class Setup:
    config: object
    config_path: Path
    device: torch.device
    data: object            # TrainingSet
    val_labels: torch.Tensor
    test_labels: dict       # split name -> multi-hot label sets
    evaluator: object
    model: torch.nn.Module
    noise_scheduler: object
    out_dir: Path
    label_names: list = None  # label index -> name (objects.json), for the captions of sample grids


def pick_device(name=None):
    return parallel.device_for_rank(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare(config, config_path, device=None):
    """Everything a run needs, checked before a run is created: a bad input leaves nothing behind."""
    device = pick_device(device)
    parallel.init(device)
    if not parallel.is_main():
        parallel.barrier()  # wait for the main process to render the data and train the evaluator
    setup = _prepare(config, config_path, device)
    if parallel.is_main():
        parallel.barrier()
    return setup


def check_inputs(config):
    """What a run refuses before it loads any data, checked without loading or rendering it (--dry-run runs
    this too): the tracking store, a data root the config names and its label-set files, a given evaluator,
    the run folder."""
    check_reachable(resolve_uri(config.tracking_uri), "tracking_uri" if config.tracking_uri else "MLFLOW_TRACKING_URI")
    if not is_synthetic(config.data.root):  # the synthetic default is rendered on first use
        check_split_files(resolve_root(config.data.root), config)
    if config.eval.evaluator:
        load_evaluator(config.eval.evaluator)
    for folder in (Path(config.output_dir), Path(config.output_dir) / config.run_name):
        if folder.exists() and not folder.is_dir():
            raise UserError(folder, "is not a folder (output_dir / run_name: the run's checkpoints go there)")


def check_split_files(root, config):
    for name in [config.eval.split, *config.eval.test_splits]:
        if not (root / name).is_file():
            raise UserError(root / name, "label-set file not found (eval.split / eval.test_splits)")


def _prepare(config, config_path, device):
    if parallel.is_main():
        check_inputs(config)
    root = resolve_root(config.data.root, config.data.synthetic_seed, config.data.synthetic_scenes)
    check_split_files(root, config)
    seed_everything(config.seed)
    model = build_model(config.model.unet, config.model.conditioning, image_size=config.data.image_size,
                        **config.model.overrides).to(device)
    data = load_train(root, config.data.image_size, config.data.image_dir)
    if data.labels.shape[1] != model.build_kwargs["num_labels"]:
        raise UserError(root, f"{data.labels.shape[1]} labels in objects.json; the models expect 24")
    return Setup(
        config=config, config_path=Path(config_path), device=device, data=data,
        val_labels=load_condition_sets(root, config.eval.split),
        test_labels={name: load_condition_sets(root, name) for name in final_splits(root, config)},
        evaluator=ensure_evaluator(root, config.eval.evaluator, device, config.tracking_uri),
        model=model,
        noise_scheduler=make_noise_scheduler(config.diffusion.beta_schedule, config.diffusion.num_train_timesteps,
                                             config.diffusion.prediction_type),
        out_dir=Path(config.output_dir) / config.run_name,
        label_names=data.label_names,
    )


def generate(model, labels, setup, *, seed, sampler=None, steps=None, guidance_scale=None, batch_size=None,
             desc=None):
    """Samples for every row of `labels` with the configured fast sampler, in batches; with `desc`, a
    progress bar over the sampler's steps (DDPM with 1000 steps takes minutes)."""
    cfg = setup.config.eval
    sampler, steps = sampler or cfg.sampler, steps or cfg.steps
    generator = torch.Generator(setup.device).manual_seed(seed)
    chunks = labels.split(batch_size or cfg.batch_size)
    total = len(chunks) * len(make_sampler(sampler, setup.noise_scheduler, steps).timesteps)
    images = []
    with autocast(setup), tqdm(total=total, desc=desc, unit="step", leave=False, mininterval=1,
                               disable=None if desc else True) as bar:
        for chunk in chunks:
            images.append(sample(model, chunk.to(setup.device), train_scheduler=setup.noise_scheduler,
                                 sampler=sampler, steps=steps, eta=cfg.eta,
                                 guidance_scale=cfg.guidance_scale if guidance_scale is None else guidance_scale,
                                 generator=generator, image_size=setup.config.data.image_size,
                                 callback=lambda *_: bar.update()).float())
    return torch.cat(images)


def grid_image(images, labels, setup, nrow=8):
    """A PIL grid (8 per row) of images in [-1, 1], each tile captioned with the labels it was asked for."""
    return labelled_grid(images, label_names_of(labels, setup.label_names), nrow=nrow)


def autocast(setup):
    mode = setup.config.train.mixed_precision
    enabled = mode == "bf16" or (mode == "auto" and setup.device.type == "cuda")
    return torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=enabled)


def strip_image(model, setup, seed):
    """The denoising strip: one row per STRIP_LABELS entry, from pure noise to the final image."""
    names = setup.label_names
    if not all(name in names for name in STRIP_LABELS):
        return None
    labels = torch.zeros(len(STRIP_LABELS), len(names), device=setup.device)
    for row, name in enumerate(STRIP_LABELS):
        labels[row, names.index(name)] = 1
    cfg = setup.config.eval
    with autocast(setup):
        frames = denoising_strip(model, labels, frames=10, train_scheduler=setup.noise_scheduler, sampler=cfg.sampler,
                                 steps=cfg.steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                                 generator=torch.Generator(setup.device).manual_seed(seed),
                                 image_size=setup.config.data.image_size)
    return titled_rows(frames.float().transpose(0, 1), STRIP_LABELS)


def final_splits(root, config):
    """The splits scored at the end: eval.test_splits, and the held-out-pairs split where the root has it."""
    heldout = config.eval.heldout_split
    extra = [heldout] if heldout and heldout not in config.eval.test_splits and (root / heldout).is_file() else []
    return [*config.eval.test_splits, *extra]


def validate(model, setup, reference_features, step):
    """Validation over eval.val_seeds sampling seeds: the mean accuracy (it selects best.pt) and its spread,
    the binding errors of the misses per true label, KID and FD over all samples, seconds per sample.
    Returns (metrics, the first seed's images)."""
    labels, seeds = setup.val_labels, setup.config.eval.val_seeds
    accuracies, errors, images = [], {}, []
    started = time.perf_counter()
    for k in range(seeds):
        batch = generate(model, labels, setup, seed=setup.config.seed + 1_000 * k,
                         desc=f"validation at step {step}, seed {k + 1}/{seeds}")
        probs = setup.evaluator.predict(for_evaluator(batch))
        accuracies.append(course_accuracy(probs, labels.cpu()))
        for kind, count in binding_errors(probs, labels.cpu(), setup.label_names).items():
            errors[kind] = errors.get(kind, 0) + count
        images.append(batch)
    sample_s = (time.perf_counter() - started) / (seeds * len(labels))
    features = setup.evaluator.features(for_evaluator(torch.cat(images)))
    true_labels = float(labels.sum()) * seeds
    metrics = {"val_accuracy": float(np.mean(accuracies)), "val_accuracy_std": float(np.std(accuracies)),
               **{f"val_{kind}": errors[kind] / true_labels for kind in ("wrong_colour", "wrong_shape", "both_wrong")},
               "val_kid": kernel_distance(features, reference_features),
               "val_fd": frechet_distance(features, reference_features), "sample_s_per_image": sample_s}
    return metrics, images[0]


def real_features(setup, count=2048):
    """Evaluator features of a fixed sample of training images: the reference for the Fréchet distance."""
    idx = torch.randperm(len(setup.data.images), generator=torch.Generator().manual_seed(0))[:count]
    return setup.evaluator.features(for_evaluator(normalize(setup.data.images[idx])))


def sampling_state(model, ema):
    """The weights used for evaluation and sampling: the EMA copy when EMA is on."""
    if ema is None:
        return model
    ema_model = copy.deepcopy(model)
    ema.copy_to(ema_model.parameters())
    return ema_model


def load_for_sampling(path, device="cpu"):
    """best.pt -> (model, resolved config YAML text) for scoring or sampling later."""
    from lab.config import ExperimentConfig
    import yaml
    state = load_checkpoint(path)
    config = ExperimentConfig.model_validate(yaml.safe_load(state["config"]))
    model = build_model(config.model.unet, config.model.conditioning, image_size=config.data.image_size,
                        **config.model.overrides)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(path, f"weights do not fit the model its config describes ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), config


def score_splits(model, setup, seeds, log_grid=None):
    """Test accuracy of a model on each test split over several sampling seeds: {split: (mean, std, list)}.

    log_grid(image, key) receives the first seed's captioned grid of each split, key `<split>_samples`."""
    scores = {}
    for name, labels in setup.test_labels.items():
        accs = []
        for seed in range(seeds):
            images = generate(model, labels, setup, seed=10_000 + seed,
                              desc=f"scoring {Path(name).stem}, seed {seed + 1}/{seeds}")
            accs.append(setup.evaluator.accuracy(for_evaluator(images), labels))
            if seed == 0 and log_grid:
                log_grid(grid_image(images, labels, setup), f"{Path(name).stem}_samples")
        scores[name] = (float(np.mean(accs)), float(np.std(accs)), accs)
    return scores


def diffusion_loss(model, noise_scheduler, x0, labels, generator, cfg_dropout=0.0):
    """Per-sample MSE to the training target at random timesteps, and those timesteps.

    With cfg_dropout > 0 a random share of rows uses the learned null condition (classifier-free guidance).
    """
    b, device = len(x0), x0.device
    noise = torch.randn(x0.shape, generator=generator, device=device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator, device=device)
    drop = torch.rand(b, generator=generator, device=device) < cfg_dropout if cfg_dropout > 0 else None
    pred = model(noise_scheduler.add_noise(x0, noise, t), t, labels, drop)
    return (pred.float() - training_target(noise_scheduler, x0, noise, t)).square().mean((1, 2, 3)), t


def score_checkpoint(path, splits=None, seeds=None, device=None, log_grid=None):
    """Score a best.pt on test splits over sampling seeds, with the data and evaluator its config names."""
    device = pick_device(device)
    model, config = load_for_sampling(path, device)
    root = resolve_root(config.data.root, config.data.synthetic_seed, config.data.synthetic_scenes)
    splits = splits or final_splits(root, config)
    setup = Setup(config=config, config_path=Path(path), device=device, data=None, val_labels=None,
                  test_labels={name: load_condition_sets(root, name) for name in splits},
                  evaluator=ensure_evaluator(root, config.eval.evaluator, device, config.tracking_uri), model=model,
                  noise_scheduler=make_noise_scheduler(config.diffusion.beta_schedule,
                                                       config.diffusion.num_train_timesteps,
                                                       config.diffusion.prediction_type),
                  out_dir=Path(path).parent, label_names=load_objects(root))
    return score_splits(model, setup, seeds or config.eval.final_seeds, log_grid)


def build_optimisation(setup, total_steps):
    """Optimizer, LR schedule, EMA and the forward callable (DDP-wrapped, compiled) for `setup.model`.

    The fast path on GPU: TF32 matmuls, channels_last weights, fused Adam; torch.compile by default.
    """
    tc, device, model = setup.config.train, setup.device, setup.model
    gpu_fast = tc.fast_path and device.type == "cuda"
    if gpu_fast:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        model.to(memory_format=torch.channels_last)
    opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=gpu_fast or None)
    lr_schedule = get_scheduler("cosine" if tc.lr_schedule == "cosine" else "constant_with_warmup", optimizer,
                                num_warmup_steps=tc.warmup_steps, num_training_steps=total_steps)
    ema = EMAModel(model.parameters(), decay=tc.ema.decay, use_ema_warmup=tc.ema.warmup) if tc.ema.enabled else None
    forward = parallel.wrap(model, device)
    if compiles(tc, device):
        forward = torch.compile(forward)  # state_dicts stay on `model`: no _orig_mod. prefix
    return optimizer, lr_schedule, ema, forward


def out_of_time(started, minutes, device):
    """Whether the time budget is spent; under data parallel the main process decides for all."""
    flag = torch.tensor(float(time.perf_counter() - started > minutes * 60), device=device)
    if parallel.world_size() > 1:
        torch.distributed.broadcast(flag, 0)
    return bool(flag)


def compiles(train_config, device):
    return train_config.compile == "on" or (train_config.compile == "auto" and device.type == "cuda")


def optimizer_step(micro_batches, *, forward, model, optimizer, lr_schedule, ema, setup, generator, stats, step):
    """One optimizer step over micro-batches of (uint8 images, labels) already on the device.

    Loss statistics accumulate in `stats` on the device (no host sync): loss sum and count per
    timestep quartile, and in stats[2, 0] the first step whose loss was not finite.
    """
    config = setup.config
    T = setup.noise_scheduler.config.num_train_timesteps
    for images_u8, labels in micro_batches:
        x0 = normalize(images_u8)
        if config.train.fast_path and x0.is_cuda:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        if config.data.hflip:
            flip = torch.rand(len(x0), generator=generator, device=x0.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        with autocast(setup):
            per_sample, t = diffusion_loss(forward, setup.noise_scheduler, x0, labels, generator,
                                           config.model.cfg_dropout)
        weights = loss_weights(setup.noise_scheduler, t, config.diffusion.loss_weighting, config.diffusion.snr_gamma)
        ((per_sample * weights).mean() / len(micro_batches)).backward()
        # the logged loss stays the unweighted MSE, comparable across weightings
        per_sample = per_sample.detach()
        quartile = (t * 4 // T).clamp(max=3)
        stats[0].index_add_(0, quartile, per_sample)
        stats[1].index_add_(0, quartile, torch.ones_like(per_sample))
        stats[2, 0] = torch.where((stats[2, 0] > 0) | per_sample.isfinite().all(), stats[2, 0], step)
    if config.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
    optimizer.step()
    lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.step(model.parameters())


def train(setup, **options):
    """Train one experiment (options: see `_train`); the main process holds the run folder throughout, so a
    second process on it is refused before it writes anything."""
    with run_folder.exclusive(setup.out_dir) if parallel.is_main() else contextlib.nullcontext():
        return _train(setup, **options)


def _train(setup, *, tracker=None, parent_run_id=None, extra_tags=None, on_validation=None, fresh=False, log=print):
    """Train one experiment, resuming from `out_dir/latest.pt` (or `run.json` when killed before the first
    checkpoint) into the same MLflow run when a previous attempt was cut short."""
    config, device, model = setup.config, setup.device, setup.model
    tc = config.train
    out = setup.out_dir
    latest, best_path = out / "latest.pt", out / "best.pt"
    main = parallel.is_main()
    if fresh:  # start over: the old run's checkpoints and MLflow run must not leak into this one
        for old in [*out.glob("*.pt*"), *out.glob(".*.tmp"), run_folder.record_path(out)]:
            old.unlink(missing_ok=True)
    resume, run_id = (None, None) if fresh else load_previous(out, config)
    tracker = tracker or (Tracker(resolve_uri(config.tracking_uri)) if main else NoTracker())
    if resume and resume.get("finished"):
        tracker.ensure_finished(run_id)  # killed after the final checkpoint, before MLflow heard of the end
        log(f"{out} holds a finished run (MLflow run {run_id}); pass --fresh to train again")
        return resume["summary"]

    # --- optimisation objects ---------------------------------------------------------------------
    images = setup.data.images.to(device) if config.data.on_device else setup.data.images
    labels = setup.data.labels.to(images.device)
    world = parallel.world_size()
    per_step = tc.batch_size * tc.grad_accum * world  # images per optimizer step, all processes together
    steps_per_epoch = max(len(images) // per_step, 1)
    total_steps = min(tc.epochs * steps_per_epoch, tc.max_steps or math.inf)
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer, lr_schedule, ema, forward = build_optimisation(setup, total_steps)
    step, start_epoch, best_acc = 0, 0, -1.0
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        lr_schedule.load_state_dict(resume["lr_schedule"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        torch.set_rng_state(resume["torch_rng"])
        step, start_epoch, best_acc = resume["step"], resume["epoch"], resume["best_acc"]
        if checkpoint_exists(best_path):  # killed after a new best but before latest.pt: never replace it by a worse one
            best_acc = max(best_acc, load_checkpoint(best_path)["val_accuracy"])
        log(f"resuming {out} at epoch {start_epoch}, step {step} (MLflow run {run_id})")
    elif run_id:
        log(f"resuming {out} from the start, killed before its first checkpoint (MLflow run {run_id})")

    if main:
        run_folder.announce(out)
    reference_features = None
    status = "FAILED"
    try:
        run_id = tracker.start(config, setup.config_path, run_id=run_id, parent_run_id=parent_run_id,
                               extra_tags=extra_tags,
                               on_created=lambda new_id: run_folder.write_record(out, new_id, to_yaml(config)))
        bar = tqdm(total=total_steps, initial=step, desc=config.run_name, mininterval=1,
                   disable=None if main else True)  # one bar per process group
        # rows: loss sum and sample count per timestep quartile, first non-finite step (column 0)
        stats = torch.zeros(3, 4, device=device)
        window_start, window_images = time.perf_counter(), 0
        started = time.perf_counter()
        for epoch in range(start_epoch, epochs):
            model.train()
            # Seeded per epoch (checkpoints are at epoch ends): a resumed run replays exactly. Every
            # process draws the same order and takes its share; each draws its own noise.
            order = torch.randperm(len(images), device=device,
                                   generator=torch.Generator(device).manual_seed(config.seed * 100_003 + epoch))
            order = order.to(images.device)[parallel.rank()::world]
            gen = torch.Generator(device).manual_seed((config.seed * 100_003 + epoch) * 1_009 + parallel.rank())
            for i in range(steps_per_epoch):
                micro_batches = []
                for micro in range(tc.grad_accum):
                    idx = order[(i * tc.grad_accum + micro) * tc.batch_size:][:tc.batch_size]
                    micro_batches.append((images[idx].to(device, non_blocking=True),
                                          labels[idx].to(device, non_blocking=True)))
                optimizer_step(micro_batches, forward=forward, model=model, optimizer=optimizer,
                               lr_schedule=lr_schedule, ema=ema, setup=setup, generator=gen, stats=stats,
                               step=step + 1)
                step += 1
                window_images += per_step
                bar.update()
                if tc.max_minutes and out_of_time(started, tc.max_minutes, device):
                    total_steps = step  # a time budget (the CPU quickstart): finish as if this were the last step
                # a NaN stops the run at once on CPU, where a readback is free; on GPU every log_every steps
                log_now = step % tc.log_every == 0 or step == total_steps
                if log_now or device.type == "cpu":
                    loss_sum, count, bad = parallel.all_reduce_sum(stats.clone()).cpu()  # the only host sync
                    loss = float(loss_sum.sum() / count.sum())
                    if bad[0] > 0 or not math.isfinite(loss):
                        step = int(bad[0]) if bad[0] > 0 else step
                        raise NonFiniteLoss(setup.config_path, f"loss became {loss} at step {step} "
                                            f"(last good checkpoint: {latest if latest.exists() else 'none'})")
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    metrics = {"loss": loss, "lr": lr_schedule.get_last_lr()[0], "epoch": epoch,
                               "images_per_s": window_images / max(elapsed, 1e-9)}
                    metrics.update({f"loss_q{q + 1}": float(loss_sum[q] / count[q]) for q in range(4) if count[q]})
                    tracker.log_metrics(metrics, step)
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{metrics['images_per_s']:.0f}", refresh=False)
                    stats.zero_()
                    window_start, window_images = time.perf_counter(), 0
                if step >= total_steps:
                    break
            last = step >= total_steps
            paused = time.perf_counter()  # images_per_s counts training steps only, not what follows
            if main and ((epoch + 1) % config.eval.every_epochs == 0 or last):
                if reference_features is None:
                    reference_features = real_features(setup)
                sampler_model = sampling_state(model, ema)
                metrics, images_val = validate(sampler_model, setup, reference_features, step)
                acc, kid, fd = metrics["val_accuracy"], metrics["val_kid"], metrics["val_fd"]
                tracker.log_metrics(metrics, step)
                tracker.log_image(grid_image(images_val, setup.val_labels, setup), "val_samples", step)
                strip = strip_image(sampler_model, setup, config.seed)
                if strip is not None:
                    tracker.log_image(strip, "denoising_strip", step)
                if acc > best_acc:
                    best_acc = acc
                    save_checkpoint({"model": sampler_model.state_dict(), "config": to_yaml(config), "step": step,
                                 "val_accuracy": acc}, best_path)
                del sampler_model
                bar.write(f"step {step}: val accuracy {acc:.3f} ± {metrics['val_accuracy_std']:.3f} over "
                          f"{config.eval.val_seeds} seeds (best {best_acc:.3f}), kid {kid:.4f}, fd {fd:.1f}")
                if on_validation is not None:
                    on_validation(step, acc)  # may raise Stop (a pruned trial)
            if main and ((epoch + 1) % tc.checkpoint_every == 0 or last):
                tracker.flush()  # metrics up to this step are stored before the state a resume starts from
                save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "lr_schedule": lr_schedule.state_dict(), "ema": ema.state_dict() if ema else None,
                             "torch_rng": torch.get_rng_state(), "step": step,
                             "epoch": epoch + 1, "best_acc": best_acc, "run_id": run_id,
                             "config": to_yaml(config)}, latest)
            parallel.barrier()  # the others wait while the main process evaluates and saves
            window_start += time.perf_counter() - paused
            if last:
                break
        bar.close()
        if not main:
            status = "FINISHED"
            return {"run_id": None, "steps": step}
        summary = finish(setup, tracker, best_path, best_acc, step)
        tracker.flush()  # every score is stored before the checkpoint says the run is finished
        save_checkpoint({**load_checkpoint(latest), "finished": True, "summary": summary}, latest)
        status = "FINISHED"
        return summary
    except Stop:
        status = "KILLED"
        raise
    except NonFiniteLoss as e:
        tracker.set_tags({"failed_step": step, "failure": str(e)})
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker.run_id:  # never leave a run RUNNING; a rerun reopens it and resumes
            tracker.end(status)


class NoTracker:
    """What processes other than the main one log: nothing."""
    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def finish(setup, tracker, best_path, best_acc, step):
    """Score the best checkpoint once on the test splits; log the scores and the checkpoint."""
    model, _ = load_for_sampling(best_path, setup.device)
    scores = score_splits(model, setup, setup.config.eval.final_seeds,
                          log_grid=lambda image, key: tracker.log_image(image, key, step))
    metrics = {"best_val_accuracy": best_acc}
    for name, (mean, std, _) in scores.items():
        metrics[f"{Path(name).stem}_accuracy"] = mean
        metrics[f"{Path(name).stem}_accuracy_std"] = std
    tracker.log_metrics(metrics, step)
    tracker.log_artifact(best_path, "checkpoints")
    tracker.set_tags({"best_checkpoint": str(best_path.resolve())})
    return {"run_id": tracker.run_id, "steps": step, **metrics, "best_checkpoint": str(best_path)}


DIFFERENT_CONFIG = "belongs to a run with a different config; pass --fresh to start over, or set another run_name/output_dir"


def load_previous(out, config):
    """(resume state, MLflow run id) of an interrupted run of the same config in `out`; (None, None) if none."""
    record = run_folder.read_record(out)
    if record and record["config"] != to_yaml(config):
        raise UserError(run_folder.record_path(out), DIFFERENT_CONFIG)
    resume = load_resume_state(out / "latest.pt", config)
    return resume, resume["run_id"] if resume else record and record["run_id"]


def load_resume_state(path, config):
    """The resume state of an interrupted run of the same config, or None for a fresh start."""
    if not checkpoint_exists(path):
        return None
    state = load_checkpoint(path, "resume checkpoint")
    if state.get("config") != to_yaml(config):
        raise UserError(path, DIFFERENT_CONFIG)
    return state
