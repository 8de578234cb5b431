"""The training loop: read it top to bottom.

`train(setup)` takes what `lab.build.prepare` built and trains: a `TrainStep` (the optimizer step, the one
`bench.py` times) over seeded epochs, loss windows logged every `train.log_every` steps, then at an epoch's
end two named steps, `validation` (EMA weights sampled on `eval.split`, the best kept as `best.pt`) and
`save_latest` (the resume state, `latest.pt`), and at the end `finish` (the best checkpoint scored once on
the test splits). A run cut short resumes from `latest.pt` into the same MLflow run.
"""
import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lab import build, parallel, run_folder
from lab.checkpoints import checkpoint_exists, load_checkpoint, save_checkpoint
from lab.config import to_yaml
from lab.data import normalize
from lab.diffusion import diffusion_loss, loss_weights
from lab.errors import UserError
from lab.eval import BINDING_ERRORS, binding_errors, course_accuracy, evaluator_ready, for_evaluator
from lab.metrics import frechet_distance, kernel_distance
from lab.sampling import generate, grid_image, model_from_checkpoint, score_splits, strip_image
from lab.tracking import NoTracker, Tracker, machine, resolve_uri

class NonFiniteLoss(UserError):
    def __init__(self, where, message, step=None):
        super().__init__(where, message)
        self.step = step  # the first step whose loss was not finite


class Stop(Exception):
    """Raised by an `on_validation` callback to end a run early (a pruned sweep trial)."""


@dataclass
class Window:
    """The loss since the last log point, all processes together."""
    loss: float
    quartiles: dict          # loss_q1..loss_q4: the loss per timestep quartile (those that had samples)
    first_nonfinite: object  # the first step whose loss was not finite, or None


class TrainStep:
    """One optimizer step over micro-batches of the training set, resident on the device: what `train` calls
    and `bench.py` times. Built once per run: the optimisation objects, steps per epoch for this world size.

    Loss statistics accumulate on the device (no host sync) until `read_window`."""

    def __init__(self, setup, total_steps=None):
        config, device, tc = setup.config, setup.device, setup.config.train
        self.setup, self.config, self.device, self.model = setup, config, device, setup.model
        self.images = setup.data.images.to(device) if config.data.on_device else setup.data.images
        self.labels = setup.data.labels.to(self.images.device)
        self.world = parallel.world_size()
        self.images_per_step = tc.batch_size * tc.grad_accum * self.world  # all processes together
        self.steps_per_epoch = max(len(self.images) // self.images_per_step, 1)
        self.total_steps = total_steps or min(tc.epochs * self.steps_per_epoch, tc.max_steps or math.inf)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.opt = build.optimisation(config, self.model, device, self.total_steps)
        self.channels_last = build.gpu_fast_path(config, device)
        self.loss_sums = torch.zeros(2, 4, device=device)  # loss sum and sample count per timestep quartile
        self.first_nonfinite = torch.tensor(math.inf, device=device)
        self.order = self.generator = None

    def start_epoch(self, epoch):
        """Seeded per epoch (checkpoints are at epoch ends): a resumed run replays exactly. Every process draws
        the same order and takes its share; each draws its own noise."""
        seed = self.config.seed * 100_003 + epoch
        order = torch.randperm(len(self.images), device=self.device,
                               generator=torch.Generator(self.device).manual_seed(seed))
        self.order = order.to(self.images.device)[parallel.rank()::self.world]
        self.generator = torch.Generator(self.device).manual_seed(seed * 1_009 + parallel.rank())
        self.model.train()

    def __call__(self, i, step):
        """Optimizer step `step` (1-based) on the i-th batch of the epoch."""
        tc, grad_accum = self.config.train, self.config.train.grad_accum
        for micro in range(grad_accum):
            idx = self.order[(i * grad_accum + micro) * tc.batch_size:][:tc.batch_size]
            images_u8 = self.images[idx].to(self.device, non_blocking=True)
            labels = self.labels[idx].to(self.device, non_blocking=True)
            with parallel.accumulating(self.opt.wrapped, last=micro == grad_accum - 1):
                self._accumulate(images_u8, labels, step)
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.opt.optimizer.step()
        self.opt.clock.tick(step, self.device)
        self.opt.lr_schedule.step()
        self.opt.optimizer.zero_grad(set_to_none=True)
        if self.opt.ema is not None:
            self.opt.ema.step(self.model.parameters())

    def _accumulate(self, images_u8, labels, step):
        config, scheduler = self.config, self.setup.noise_scheduler
        x0 = normalize(images_u8)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        if config.data.hflip:
            flip = torch.rand(len(x0), generator=self.generator, device=x0.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        with build.autocast(config, self.device):
            per_sample, t = diffusion_loss(self.opt.forward, scheduler, x0, labels, self.generator,
                                           config.model.cfg_dropout)
        weights = loss_weights(scheduler, t, config.diffusion.loss_weighting, config.diffusion.snr_gamma)
        ((per_sample * weights).mean() / config.train.grad_accum).backward()
        # the logged loss stays the unweighted MSE, comparable across weightings
        per_sample = per_sample.detach()
        quartile = (t * 4 // scheduler.config.num_train_timesteps).clamp(max=3)
        self.loss_sums[0].index_add_(0, quartile, per_sample)
        self.loss_sums[1].index_add_(0, quartile, torch.ones_like(per_sample))
        finite = per_sample.isfinite().all()
        self.first_nonfinite = torch.where(finite, self.first_nonfinite, self.first_nonfinite.clamp(max=step))

    def read_window(self):
        """The loss window so far, all processes together: the loop's only host sync."""
        sums = parallel.all_reduce_sum(self.loss_sums.clone())
        first = parallel.all_reduce_min(self.first_nonfinite.clone())
        (loss_sum, count), first = sums.cpu(), float(first)
        return Window(loss=float(loss_sum.sum() / count.sum()),
                      quartiles={f"loss_q{q + 1}": float(loss_sum[q] / count[q]) for q in range(4) if count[q]},
                      first_nonfinite=int(first) if math.isfinite(first) else None)

    def reset_window(self):
        self.loss_sums.zero_()

    def state_dict(self):
        ema = self.opt.ema
        return {"model": self.model.state_dict(), "optimizer": self.opt.optimizer.state_dict(),
                "lr_schedule": self.opt.lr_schedule.state_dict(), "ema": ema.state_dict() if ema else None}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.optimizer.load_state_dict(state["optimizer"])
        self.opt.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.opt.ema is not None:
            self.opt.ema.load_state_dict(state["ema"])

    def sampling_model(self):
        """The weights used for evaluation and sampling: the EMA copy when EMA is on."""
        if self.opt.ema is None:
            return self.model
        ema_model = copy.deepcopy(self.model)
        self.opt.ema.copy_to(ema_model.parameters())
        return ema_model


def train(setup, **options):
    """Train one experiment (options: see `_train`); the main process holds the run folder throughout, so a
    second process on it is refused before it writes anything."""
    with run_folder.exclusive(setup.out_dir) if parallel.is_main() else contextlib.nullcontext():
        return _train(setup, **options)


def _train(setup, *, tracker=None, parent_run_id=None, extra_tags=None, on_validation=None, fresh=False, log=print):
    """Train one experiment, resuming from `out_dir/latest.pt` (or `run.json` when killed before the first
    checkpoint) into the same MLflow run when a previous attempt was cut short.

    on_validation(step, epoch, accuracy) runs after each validation (epoch: the epochs completed) and may
    raise Stop."""
    config, device, tc, out = setup.config, setup.device, setup.config.train, setup.out_dir
    latest, best_path = out / "latest.pt", out / "best.pt"
    main = parallel.is_main()
    if fresh:  # start over: the old run's checkpoints and MLflow run must not leak into this one
        for old in [*out.glob("*.pt*"), *out.glob(".*.tmp"), run_folder.record_path(out)]:
            old.unlink(missing_ok=True)
    resume, run_id = (None, None) if fresh else run_folder.load_previous(out, to_yaml(config))
    tracker = tracker or (Tracker(resolve_uri(config.tracking_uri)) if main else NoTracker())
    if resume and resume.get("finished"):
        tracker.ensure_finished(run_id)  # killed after the final checkpoint, before MLflow heard of the end
        log(f"{out} holds a finished run (MLflow run {run_id}); pass --fresh to train again")
        return resume["summary"]

    trained = tracker.trained_run(config) if main and not (resume or fresh) and parallel.world_size() == 1 else None
    if trained:
        return rescore(setup, tracker, trained, run_id, extra_tags, log)

    train_step = TrainStep(setup)
    step, start_epoch, best_acc = 0, 0, -1.0
    if resume:
        train_step.load_state_dict(resume)
        torch.set_rng_state(resume["torch_rng"])
        step, start_epoch, best_acc = resume["step"], resume["epoch"], resume["best_acc"]
        if checkpoint_exists(best_path):  # killed after a new best but before latest.pt: never replace it by a worse one
            best_acc = max(best_acc, load_checkpoint(best_path)["val_accuracy"])
        log(f"resuming {out} at epoch {start_epoch}, step {step} (MLflow run {run_id})")
    elif run_id:
        log(f"resuming {out} from the start, killed before its first checkpoint (MLflow run {run_id})")

    if main:
        run_folder.announce(out)
    status = "FAILED"
    try:
        run_id = tracker.start(config, setup.config_path, run_id=run_id, parent_run_id=parent_run_id,
                               extra_tags=extra_tags,
                               on_created=lambda new_id: run_folder.write_record(out, new_id, to_yaml(config)))
        bar = tqdm(total=train_step.total_steps, initial=step, desc=config.run_name, mininterval=1,
                   disable=None if main else True)  # one bar per process group
        reference_features = None
        window_start, window_images = time.perf_counter(), 0
        clock = train_step.opt.clock
        clock.start(step, resume.get("spent_s", 0.0) if resume else 0.0)
        for epoch in range(start_epoch, train_step.epochs):
            epoch_started_s = clock.spent_s
            train_step.start_epoch(epoch)
            for i in range(train_step.steps_per_epoch):
                train_step(i, step + 1)
                step += 1
                window_images += train_step.images_per_step
                bar.update()
                # a time budget (the CPU presets) ends the run as if this were the last step
                last = step >= train_step.total_steps or clock.out_of_time
                log_now = step % tc.log_every == 0 or last
                # a NaN stops the run at once on CPU, where a readback is free; on GPU every log_every steps
                if log_now or device.type == "cpu":
                    window = train_step.read_window()
                    if window.first_nonfinite is not None or not math.isfinite(window.loss):
                        bad = window.first_nonfinite or step
                        raise NonFiniteLoss(setup.config_path, f"loss became {window.loss} at step {bad} "
                                            f"(last good checkpoint: {latest if latest.exists() else 'none'})", bad)
                if log_now:
                    evaluator_ready(setup.evaluator)  # one trained beside gives its threads back when done
                    images_per_s = window_images / max(time.perf_counter() - window_start, 1e-9)
                    tracker.log_metrics({"loss": window.loss, "lr": train_step.opt.lr_schedule.get_last_lr()[0],
                                         "epoch": epoch, "images_per_s": images_per_s, **window.quartiles}, step)
                    bar.set_postfix(loss=f"{window.loss:.4f}", img_s=f"{images_per_s:.0f}", refresh=False)
                    train_step.reset_window()
                    window_start, window_images = time.perf_counter(), 0
                if last:
                    break
            paused = time.perf_counter()  # images_per_s counts training steps only, not what follows
            validates = main and ((epoch + 1) % config.eval.every_epochs == 0 or last)
            # a validation that the final one would repeat within half an interval is left to it (the demo
            # validated at steps 3,372 and 3,448: 15 s of its 11 minutes for the same point of the curve), at
            # this epoch's pace: on a GPU the first epoch holds minutes of compilation
            half = config.eval.every_epochs / 2
            final_is_near = clock.ends_within(half * train_step.steps_per_epoch,
                                              half * (clock.spent_s - epoch_started_s))
            if validates and not last and final_is_near:
                bar.write(f"step {step}: no validation, the final one follows within half an interval")
            elif validates and not last and not evaluator_ready(setup.evaluator):
                bar.write(f"step {step}: no validation yet, the evaluator still trains beside")
            elif validates:
                if reference_features is None:
                    reference_features = real_features(setup)
                # minutes of this run's clock (training and validations, resumed runs' stops left out)
                tracker.log_metrics({"train_minutes": clock.spent_s / 60}, step)
                acc = validation(train_step.sampling_model(), setup, tracker, reference_features, step, best_acc,
                                 best_path, bar.write)
                best_acc = max(acc, best_acc)
                if on_validation is not None:
                    on_validation(step, epoch + 1, acc)  # may raise Stop (a pruned trial)
            if tc.max_minutes and not last:
                # the validation's minutes count: when they spent the budget, stop here rather than one step on
                # (which would validate again); every process ticks, so all stop at the same step
                clock.tick(step, device)
                last = clock.out_of_time
            if main and ((epoch + 1) % tc.checkpoint_every == 0 or last):
                tracker.flush()  # metrics up to this step are stored before the state a resume starts from
                save_latest(train_step, step, epoch + 1, best_acc, run_id, latest)
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
    except (Stop, KeyboardInterrupt):
        status = "KILLED"
        raise
    except NonFiniteLoss as e:
        tracker.set_tags({"failed_step": e.step, "failure": str(e)})
        raise
    finally:
        if tracker.run_id:  # never leave a run RUNNING; a rerun reopens it and resumes
            tracker.end(status)


def validation(model, setup, tracker, reference_features, step, best_acc, best_path, write=print):
    """Sample with `model` (the EMA weights), log the metrics, a grid and a strip, keep it as best.pt when it
    beats `best_acc`; its validation accuracy."""
    metrics, images = validate(model, setup, reference_features, step)
    acc = metrics["val_accuracy"]
    tracker.log_metrics(metrics, step)
    tracker.log_image(grid_image(images, setup.val_labels, setup), "val_samples", step)
    strip = strip_image(model, setup, setup.config.seed)
    if strip is not None:
        tracker.log_image(strip, "denoising_strip", step)
    if acc > best_acc:
        save_checkpoint({"model": model.state_dict(), "config": to_yaml(setup.config), "step": step,
                         "val_accuracy": acc, "val_metrics": metrics}, best_path)
    write(f"step {step}: val accuracy {acc:.3f} ± {metrics['val_accuracy_std']:.3f} over "
          f"{setup.config.eval.val_seeds} seeds (best {max(acc, best_acc):.3f}), kid {metrics['val_kid']:.4f}, "
          f"fd {metrics['val_fd']:.1f}")
    return acc


def rescore(setup, tracker, trained, run_id, extra_tags, log):
    """A config whose training is a finished run's (same training_key: only sampling or scoring differ, e.g. a
    guidance scale or sampler ablation): that run's best.pt sampled with this config's sampler, validated and
    scored as a run of its own, tagged `trained_by`. Nothing is trained; a killed rescore reruns into its run."""
    config, out = setup.config, setup.out_dir
    trained_id, checkpoint = trained
    log(f"{config.run_name}: trains what MLflow run {trained_id} trained (only sampling or scoring differ); "
        f"sampling its {checkpoint} instead of training again")
    run_folder.announce(out)
    status = "FAILED"
    try:
        run_id = tracker.start(config, setup.config_path, run_id=run_id, extra_tags={**(extra_tags or {}),
                               "trained_by": trained_id},
                               on_created=lambda new_id: run_folder.write_record(out, new_id, to_yaml(config)))
        state = load_checkpoint(checkpoint)
        setup.model.load_state_dict(state["model"])
        acc = validation(setup.model, setup, tracker, real_features(setup), state["step"], -1.0, out / "best.pt", log)
        summary = finish(setup, tracker, out / "best.pt", acc, state["step"])
        tracker.flush()
        save_checkpoint({"finished": True, "summary": summary, "config": to_yaml(config), "run_id": run_id},
                        out / "latest.pt")
        status = "FINISHED"
        return summary
    finally:
        if tracker.run_id:
            tracker.end(status)


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
               **{f"val_{kind}": errors[kind] / true_labels for kind in BINDING_ERRORS},
               "val_kid": kernel_distance(features, reference_features),
               "val_fd": frechet_distance(features, reference_features), "sample_s_per_image": sample_s}
    return metrics, images[0]


def real_features(setup, count=2048):
    """Evaluator features of a fixed sample of training images: the reference for the Fréchet distance."""
    idx = torch.randperm(len(setup.data.images), generator=torch.Generator().manual_seed(0))[:count]
    return setup.evaluator.features(for_evaluator(normalize(setup.data.images[idx])))


def save_latest(train_step, step, epochs_done, best_acc, run_id, path):
    """The resume state: weights, optimiser, schedule, EMA, RNG, where the run stands."""
    save_checkpoint({**train_step.state_dict(), "torch_rng": torch.get_rng_state(), "step": step,
                     "spent_s": train_step.opt.clock.spent_s,
                     "epoch": epochs_done, "best_acc": best_acc, "run_id": run_id,
                     "config": to_yaml(train_step.config)}, path)


def finish(setup, tracker, best_path, best_acc, step):
    """Score the best checkpoint once on the test splits; log the scores, the binding errors of the validation
    that chose it (best_val_wrong_colour, ...) and the checkpoint."""
    state = load_checkpoint(best_path)
    model, _ = model_from_checkpoint(state, best_path, setup.device)
    scores = score_splits(model, setup, setup.config.eval.final_seeds,
                          log_grid=lambda image, key: tracker.log_image(image, key, step))
    chosen = state.get("val_metrics", {})  # absent from best.pt files saved before it was recorded
    metrics = {"best_val_accuracy": best_acc,
               **{f"best_val_{kind}": chosen[f"val_{kind}"] for kind in BINDING_ERRORS if f"val_{kind}" in chosen}}
    for name, (mean, std, _) in scores.items():
        stem = Path(name).stem
        metrics[f"{stem}_accuracy"] = mean
        metrics[f"{stem}_accuracy_std"] = std
    tracker.log_metrics(metrics, step)
    tracker.log_artifact(best_path, "checkpoints")
    # the machine as the run ends: a resumed run's last one, with every thread (an evaluator trained beside
    # had half of them at the start)
    tracker.set_tags({"best_checkpoint": str(best_path.resolve()), "machine": machine(setup.device)})
    return {"run_id": tracker.run_id, "steps": step, **metrics, "best_checkpoint": str(best_path)}
