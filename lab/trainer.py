"""The training loop: read it top to bottom.

`train(setup)` takes what `lab.build.prepare` built and trains in named steps: `Run.resume` (from `latest.pt`
into the same MLflow run, when a run was cut short), `Run.start_tracking`, then per epoch `Run.train_epoch` (a
`TrainStep`, the optimizer step `bench.py` times, over a seeded order; loss windows logged every
`train.log_every` steps) and `Run.end_of_epoch` (`validate_and_keep_best`: EMA weights sampled on `eval.split`,
the best kept as `best.pt`; `save_latest`: the resume state), and `Run.finish` (the best checkpoint scored once
on the test splits). The MLflow run's life is `Tracker.lifetime`: FINISHED, KILLED or FAILED, never left RUNNING.
"""
import contextlib
import copy
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lab import build, parallel, run_folder
from lab.checkpoints import checkpoint_exists, load_checkpoint, save_checkpoint, write_atomic
from lab.config import to_yaml
from lab.data.iclevr import normalize
from lab.diffusion import loss_weights
from lab.errors import UserError
from lab.eval import BINDING_ERRORS, binding_errors, for_evaluator, judge_samples, nonfinite, over_seeds
from lab.evaluator_cache import evaluator_ready
from lab.hardware import machine
from lab.metrics import frechet_distance, kernel_distance
from lab.sampling import generate, grid_image, model_from_checkpoint, score_splits, strip_image
from lab.stores import resolve_uri
from lab.tables import headline
from lab.tracking import NoTracker, Tracker

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

    def agree(self, seconds):
        """The main process's clock on every process: all apply the same learning rate and stop at one step."""
        return parallel.main_value(seconds, self.device)

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
        self.opt.clock.tick(step, agree=self.agree)
        self.opt.lr_schedule.step()
        self.opt.optimizer.zero_grad(set_to_none=True)
        if self.opt.ema is not None:
            self.opt.ema.step(self.model.parameters())
        for ema in self.opt.candidate_emas.values():
            ema.step(self.model.parameters())

    def _accumulate(self, images_u8, labels, step):
        config, scheduler = self.config, self.setup.noise_scheduler
        x0 = normalize(images_u8)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        if config.data.hflip:
            flip = torch.rand(len(x0), generator=self.generator, device=x0.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        with build.autocast(config, self.device):
            per_sample, t = build.training_loss(config, self.opt.forward, scheduler, x0, labels, self.generator)
        weights = loss_weights(scheduler, t, config.diffusion.loss_weighting, config.diffusion.snr_gamma)
        ((per_sample * weights).mean() / config.train.grad_accum).backward()
        # the logged loss stays the unweighted MSE (logit_normal still changes which timesteps it averages)
        per_sample = per_sample.detach()
        quartile = (t * 4 // scheduler.config.num_train_timesteps).long().clamp(max=3)  # flow matching's t is real
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
                "lr_schedule": self.opt.lr_schedule.state_dict(), "ema": ema.state_dict() if ema else None,
                "candidate_emas": {str(length): e.state_dict() for length, e in self.opt.candidate_emas.items()}}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.optimizer.load_state_dict(state["optimizer"])
        self.opt.lr_schedule.load_state_dict(state["lr_schedule"])
        emas = {None: self.opt.ema} if self.opt.ema is not None else {}
        for length, ema in {**emas, **self.opt.candidate_emas}.items():
            ema.load_state_dict(state["ema"] if length is None else state["candidate_emas"][str(length)])
            ema.to(device=self.device)  # checkpoints load on the CPU; the EMA step meets the model's weights

    def sampling_model(self, length=None):
        """The weights used for evaluation and sampling: the EMA copy when EMA is on (with `length`, that
        candidate EMA's)."""
        ema = self.opt.ema if length is None else self.opt.candidate_emas[length]
        if ema is None:
            return self.model
        ema_model = copy.deepcopy(self.model)
        ema.copy_to(ema_model.parameters())
        return ema_model


def train(setup, *, tracker=None, parent_run_id=None, extra_tags=None, on_validation=None, fresh=False, log=print):
    """Train one experiment, resuming from `out_dir/latest.pt` (or `run.json` when killed before the first
    checkpoint) into the same MLflow run when a previous attempt was cut short; a config whose training a finished
    run already did is `rescore`d instead. The main process holds the run folder throughout, so a second process
    on it is refused before it writes anything.

    on_validation(step, epoch, accuracy) runs after each validation (epoch: the epochs completed) and may raise
    Stop. Returns the run's summary (its run id, steps and final scores)."""
    main = parallel.is_main()
    with run_folder.exclusive(setup.out_dir) if main else contextlib.nullcontext():
        if fresh:  # start over: the old run's checkpoints and MLflow run must not leak into this one
            run_folder.clear(setup.out_dir)
        resume, run_id = (None, None) if fresh else run_folder.load_previous(setup.out_dir, to_yaml(setup.config))
        tracker = tracker or (Tracker(resolve_uri(setup.config.tracking_uri)) if main else NoTracker())
        if resume and resume.get("finished"):
            tracker.ensure_finished(run_id)  # killed after the final checkpoint, before MLflow heard of the end
            log(f"{setup.out_dir} holds a finished run (MLflow run {run_id}); pass --fresh to train again")
            return resume["summary"]
        trained = tracker.trained_run(setup.config) if main and not (resume or fresh) and parallel.world_size() == 1 \
            else None
        if trained:
            return rescore(setup, tracker, trained, run_id, extra_tags, log)
        run = Run(setup, tracker, on_validation, log)
        run.resume(resume, run_id)
        if main:
            run_folder.announce(setup.out_dir)
        with tracker.lifetime(killed=(Stop, KeyboardInterrupt)):
            run.start_tracking(run_id, parent_run_id, extra_tags)
            for epoch in range(run.first_epoch, run.train_step.epochs):
                last = run.train_epoch(epoch)
                if run.end_of_epoch(epoch, last):
                    break
            return run.finish()


class Run:
    """One training run's state between its named steps: `resume`, `start_tracking`, then per epoch
    `train_epoch` and `end_of_epoch`, and `finish`."""

    def __init__(self, setup, tracker, on_validation, log):
        self.setup, self.config, self.tracker, self.on_validation, self.log = setup, setup.config, tracker, \
            on_validation, log
        self.main = parallel.is_main()
        self.latest, self.best_path = setup.out_dir / "latest.pt", setup.out_dir / "best.pt"
        self.train_step = TrainStep(setup)
        self.clock = self.train_step.opt.clock
        self.step, self.first_epoch, self.best_score = 0, 0, -1.0
        self.run_id = self.bar = self.reference_features = None
        self.window_start, self.window_images = time.perf_counter(), 0
        # validations due while the evaluator still trains beside: (step, minutes, the sampling weights then),
        # scored as soon as it is ready, so the curve has its early points
        self.pending = []

    def resume(self, state, run_id):
        """Continue where `state` (a latest.pt) left off, or from the start into the MLflow run `run_id`."""
        self.run_id = run_id
        spent_s = 0.0
        if state:
            self.train_step.load_state_dict(state)
            torch.set_rng_state(state["torch_rng"])
            self.step, self.first_epoch, self.best_score = state["step"], state["epoch"], state["best_score"]
            spent_s = state.get("spent_s", 0.0)
            if checkpoint_exists(self.best_path):  # killed after a new best, before latest.pt: never a worse one
                self.best_score = max(self.best_score, selection_score(load_checkpoint(self.best_path), self.config))
            self.log(f"resuming {self.setup.out_dir} at epoch {self.first_epoch}, step {self.step} "
                     f"(MLflow run {run_id})")
        elif run_id:
            self.log(f"resuming {self.setup.out_dir} from the start, killed before its first checkpoint "
                     f"(MLflow run {run_id})")
        self.clock.start(self.step, spent_s)

    def start_tracking(self, run_id, parent_run_id, extra_tags):
        """Create (or reopen) the MLflow run, recorded in the run folder the moment it exists; the progress bar."""
        out, config = self.setup.out_dir, self.config
        self.run_id = self.tracker.start(config, self.setup.config_path, run_id=run_id, parent_run_id=parent_run_id,
                                         extra_tags=extra_tags,
                                         on_created=lambda new: run_folder.write_record(out, new, to_yaml(config)))
        if self.main and self.step == 0:
            log_untrained_images(self.train_step.sampling_model(), self.setup, self.tracker)
        self.bar = tqdm(total=self.train_step.total_steps, initial=self.step, desc=config.run_name, mininterval=1,
                        disable=None if self.main else True)  # one bar per process group
        self.clock.start(self.step, self.clock.spent_s)
        self.window_start, self.window_images = time.perf_counter(), 0

    def train_epoch(self, epoch):
        """The epoch's optimizer steps, a loss window logged every train.log_every; True when the step count or
        the time budget ends the run within it."""
        tc, train_step = self.config.train, self.train_step
        train_step.start_epoch(epoch)
        self.epoch_started_s = self.clock.spent_s
        for i in range(train_step.steps_per_epoch):
            train_step(i, self.step + 1)
            self.step += 1
            self.window_images += train_step.images_per_step
            self.bar.update()
            last = self.step >= train_step.total_steps or self.clock.out_of_time
            log_now = self.step % tc.log_every == 0 or last
            # a NaN stops the run at once on CPU, where a readback is free; on GPU every log_every steps
            if log_now or self.setup.device.type == "cpu":
                window = train_step.read_window()
                self.stop_if_not_finite(window)
            if log_now:
                self.log_window(window, epoch)
            if last:
                return True
        return False

    def stop_if_not_finite(self, window):
        if window.first_nonfinite is not None or not math.isfinite(window.loss):
            bad = window.first_nonfinite or self.step
            error = NonFiniteLoss(self.setup.config_path, f"loss became {window.loss} at step {bad} (last good "
                                  f"checkpoint: {self.latest if self.latest.exists() else 'none'})", bad)
            self.tracker.set_tags({"failed_step": bad, "failure": str(error)})
            raise error

    def log_window(self, window, epoch):
        evaluator_ready(self.setup.evaluator)  # one trained beside gives its threads back when done
        images_per_s = self.window_images / max(time.perf_counter() - self.window_start, 1e-9)
        self.tracker.log_metrics({"loss": window.loss, "lr": self.train_step.opt.lr_schedule.get_last_lr()[0],
                                  "epoch": epoch, "images_per_s": images_per_s, **window.quartiles}, self.step)
        self.bar.set_postfix(loss=f"{window.loss:.4f}", img_s=f"{images_per_s:.0f}", refresh=False)
        self.train_step.reset_window()
        self.window_start, self.window_images = time.perf_counter(), 0

    def end_of_epoch(self, epoch, last):
        """Validate when due, save the resume state; True when the run ends here."""
        paused = time.perf_counter()  # images_per_s counts training steps only, not what follows
        if self.main and ((epoch + 1) % self.config.eval.every_epochs == 0 or last):
            self.validate_if_worthwhile(epoch, last)
        if self.config.train.max_minutes and not last:
            # the validation's minutes count: when they spent the budget, stop here rather than one step on
            # (which would validate again); every process ticks, so all stop at the same step
            self.clock.tick(self.step, agree=self.train_step.agree)
            last = self.clock.out_of_time
        if self.main and ((epoch + 1) % self.config.train.checkpoint_every == 0 or last):
            self.tracker.flush()  # metrics up to this step are stored before the state a resume starts from
            save_latest(self.train_step, self.step, epoch + 1, self.best_score, self.run_id, self.latest)
        parallel.barrier()  # the others wait while the main process evaluates and saves
        self.window_start += time.perf_counter() - paused
        return last

    def validate_if_worthwhile(self, epoch, last):
        """A validation, unless the final one follows within half an interval (at this epoch's pace: on a GPU the
        first epoch holds minutes of compilation) or the evaluator still trains beside."""
        half = self.config.eval.every_epochs / 2
        final_is_near = self.clock.ends_within(half * self.train_step.steps_per_epoch,
                                               half * (self.clock.spent_s - self.epoch_started_s))
        if not last and final_is_near:
            self.bar.write(f"step {self.step}: no validation, the final one follows within half an interval")
        elif not last and not evaluator_ready(self.setup.evaluator):
            self.bar.write(f"step {self.step}: validation kept for when the evaluator, still training beside, is ready")
            self.pending.append((self.step, self.clock.spent_s / 60, copy.deepcopy(self.train_step.sampling_model())))
        else:
            for step, minutes, model in self.pending:
                self.validate(model, step, minutes)
            self.pending = []
            metrics = self.validate(self.train_step.sampling_model(), self.step, self.clock.spent_s / 60)
            if self.on_validation is not None:
                self.on_validation(self.step, epoch + 1, metrics)  # may raise Stop (a pruned trial)

    def validate(self, model, step, minutes):
        """Validate `model` (the sampling weights at `step`) and keep it as best.pt when it is the best so far."""
        if self.reference_features is None:
            self.reference_features = real_features(self.setup)
        # minutes of this run's clock (training and validations, resumed runs' stops left out)
        self.tracker.log_metrics({"train_minutes": minutes}, step)
        metrics = validate_and_keep_best(model, self.setup, self.tracker, self.reference_features, step,
                                         self.best_score, self.best_path, self.bar.write)
        self.best_score = max(metrics[self.config.eval.select_by], self.best_score)
        return metrics

    def choose_ema_length(self):
        """Each candidate EMA length's final weights validated as the main EMA's were at this step (logged as
        `ema_x<length>_val_accuracy`, ...); one that beats best.pt's score replaces it, which records the length."""
        select_by = self.config.eval.select_by
        for length in self.train_step.opt.candidate_emas:
            if self.reference_features is None:  # resumed straight into the end
                self.reference_features = real_features(self.setup)
            model = self.train_step.sampling_model(length)
            metrics, _, _ = validation_metrics(model, self.setup, self.reference_features, self.step, self.bar.write)
            self.tracker.log_metrics({f"ema_x{length:g}_{key}": value for key, value in metrics.items()
                                      if key in ("val_accuracy", "val_exact_accuracy")}, self.step)
            chosen = metrics[select_by] > self.best_score
            if chosen:
                save_best(model, self.config, self.step, metrics, self.best_path, ema_length=length)
                self.best_score = metrics[select_by]
            kept = ", the best so far: best.pt" if chosen else ""
            self.bar.write(f"step {self.step}: EMA x{length:g} {select_by} {metrics[select_by]:.3f}{kept}")

    def finish(self):
        """The best checkpoint scored once on the test splits; the run marked finished in latest.pt."""
        self.bar.close()
        if not self.main:
            return {"run_id": None, "steps": self.step}
        self.choose_ema_length()
        summary = score_best_checkpoint(self.setup, self.tracker, self.best_path, self.step)
        self.tracker.flush()  # every score is stored before the checkpoint says the run is finished
        save_checkpoint({**load_checkpoint(self.latest), "finished": True, "summary": summary}, self.latest)
        return summary


def log_untrained_images(model, setup, tracker):
    """The untrained model's validation grid and denoising strip at step 0 (a few seconds, before the clock starts):
    MLflow's image cards open at step 0, so they show an image there and their sliders span the whole run."""
    images = generate(model, setup.val_labels, setup, seed=setup.config.seed, desc="samples at step 0")
    log_grid_and_strip(model, images, None, setup, tracker, 0)


def log_grid_and_strip(model, images, verdicts, setup, tracker, step):
    """The validation grid (tiles framed by the strict judge's `verdicts`, when given) and the denoising strip."""
    tracker.log_image(grid_image(images, setup.val_labels, setup, verdicts), "val_samples", step)
    strip = strip_image(model, setup, setup.config.seed)
    if strip is not None:
        tracker.log_image(strip, "denoising_strip", step)


def validate_and_keep_best(model, setup, tracker, reference_features, step, best_score, best_path, write=print):
    """Sample with `model` (the EMA weights), log the metrics, a grid with the strict judge's verdicts and a
    strip, keep it as best.pt when its `eval.select_by` beats `best_score`; returns its metrics."""
    select_by = setup.config.eval.select_by
    metrics, images, verdicts = validation_metrics(model, setup, reference_features, step, write)
    tracker.log_metrics(metrics, step)
    log_grid_and_strip(model, images, verdicts, setup, tracker, step)
    score = metrics[select_by]
    if score > best_score:
        save_best(model, setup.config, step, metrics, best_path)
    exact = (f", exact scenes {metrics['val_exact_accuracy']:.3f} ± {metrics['val_exact_accuracy_std']:.3f}"
             if "val_exact_accuracy" in metrics else "")
    write(f"step {step}: val accuracy {metrics['val_accuracy']:.3f} ± {metrics['val_accuracy_std']:.3f}{exact} over "
          f"{setup.config.eval.val_seeds} seeds (best {select_by} {max(score, best_score):.3f}), "
          f"kid {metrics['val_kid']:.4f}, fd {metrics['val_fd']:.1f}")
    return metrics


def save_best(model, config, step, metrics, path, **extra):
    """best.pt: the sampling weights, the run's config and the validation figures that chose them."""
    save_checkpoint({"model": model.state_dict(), "config": to_yaml(config), "step": step, "val_metrics": metrics,
                     **extra}, path)


def selection_score(best_state, config):
    """What a saved best.pt scored on the validation metric that chose it."""
    return best_state["val_metrics"][config.eval.select_by]


def rescore(setup, tracker, trained, run_id, extra_tags, log):
    """A config whose training is a finished run's (same training_key: only sampling or scoring differ, e.g. a
    guidance scale or sampler ablation): that run's best.pt sampled with this config's sampler, validated and
    scored as a run of its own, tagged `trained_by`. Nothing is trained; a killed rescore reruns into its run."""
    config, out = setup.config, setup.out_dir
    trained_id, checkpoint = trained
    log(f"{config.run_name}: trains what MLflow run {trained_id} trained (only sampling or scoring differ); "
        f"sampling its {checkpoint} instead of training again")
    run_folder.announce(out)
    with tracker.lifetime():
        run_id = tracker.start(config, setup.config_path, run_id=run_id, extra_tags={**(extra_tags or {}),
                               "trained_by": trained_id},
                               on_created=lambda new_id: run_folder.write_record(out, new_id, to_yaml(config)))
        state = load_checkpoint(checkpoint)
        setup.model.load_state_dict(state["model"])
        validate_and_keep_best(setup.model, setup, tracker, real_features(setup), state["step"], -math.inf,
                               out / "best.pt", log)
        summary = score_best_checkpoint(setup, tracker, out / "best.pt", state["step"])
        tracker.flush()
        save_checkpoint({"finished": True, "summary": summary, "config": to_yaml(config), "run_id": run_id},
                        out / "latest.pt")
        return summary


def validation_metrics(model, setup, reference_features, step, write=print):
    """Validation over eval.val_seeds sampling seeds: each judge's figures (lab.eval.Judgement.metrics) as the
    mean over the seeds and its spread, the binding errors of the course rule's misses per true label, KID and FD
    over all samples, seconds per sample, and how many samples were not finite (misses; then KID and FD are
    NaN). Returns (metrics, the first seed's images, their verdicts or None)."""
    labels, seeds = setup.val_labels, setup.config.eval.val_seeds
    judgements, errors, images = [], {}, []
    started = time.perf_counter()
    for k in range(seeds):
        batch = generate(model, labels, setup, seed=setup.config.seed + 1_000 * k,
                         desc=f"validation at step {step}, seed {k + 1}/{seeds}")
        judged = judge_samples(batch, labels, setup.evaluator, setup.strict_judge)
        for kind, count in binding_errors(judged.probs[judged.finite], labels.cpu()[judged.finite],
                                          setup.label_names).items():
            errors[kind] = errors.get(kind, 0) + count
        judgements.append(judged)
        images.append(batch)
    sample_s = (time.perf_counter() - started) / (seeds * len(labels))
    broken = nonfinite(judgements)
    features = torch.cat([judged.features for judged in judgements]) if not broken else torch.full((1, 1), math.nan)
    if broken:
        write(f"warning: {broken} of {seeds * len(labels)} validation samples at step {step} were not finite: "
              "counted as misses; KID and FD are NaN")
    true_labels = float(labels.sum()) * seeds
    metrics = {**over_seeds(judgements, "val_"), **{f"val_{kind}": errors[kind] / true_labels for kind in BINDING_ERRORS},
               "val_kid": kernel_distance(features, reference_features),
               "val_fd": frechet_distance(features, reference_features), "sample_s_per_image": sample_s,
               "nonfinite_samples": broken}
    return metrics, images[0], judgements[0].verdicts


def real_features(setup, count=2048):
    """Evaluator features of a fixed sample of training images: the reference for the Fréchet distance."""
    idx = torch.randperm(len(setup.data.images), generator=torch.Generator().manual_seed(0))[:count]
    return setup.evaluator.features(for_evaluator(normalize(setup.data.images[idx])))


def save_latest(train_step, step, epochs_done, best_score, run_id, path):
    """The resume state: weights, optimiser, schedule, EMA, RNG, where the run stands."""
    save_checkpoint({**train_step.state_dict(), "torch_rng": torch.get_rng_state(), "step": step,
                     "spent_s": train_step.opt.clock.spent_s,
                     "epoch": epochs_done, "best_score": best_score, "run_id": run_id,
                     "config": to_yaml(train_step.config)}, path)


def score_best_checkpoint(setup, tracker, best_path, step):
    """Score the best checkpoint once on the test splits; log the scores, the figures of the validation that
    chose it (best_val_accuracy, best_val_exact_accuracy, best_val_wrong_colour, ...) and the checkpoint."""
    state = load_checkpoint(best_path)
    model, _ = model_from_checkpoint(state, best_path, setup.device)
    grids = {}

    def log_grid(image, key):  # in MLflow and beside best.pt, where a user looks first
        tracker.log_image(image, key)  # at MLflow's step 0: one image per run, shown at once, the same in every run
        grids[key] = Path(best_path).parent / f"{key}.png"
        png = io.BytesIO()
        image.save(png, format="PNG")
        write_atomic(png.getvalue(), grids[key])  # a kill mid-write leaves the last whole grid
    seeds = setup.config.eval.final_seeds
    scores = score_splits(model, setup, seeds, log_grid=log_grid)
    chosen = state["val_metrics"]
    metrics = {f"best_{key}": value for key, value in chosen.items()
               if key.startswith("val_") and not key.endswith("_std") and key not in ("val_kid", "val_fd")}
    for name, split_metrics in scores.items():
        metrics.update({f"{Path(name).stem}_{key}": value for key, value in split_metrics.items()})
    tracker.log_metrics(metrics, step)
    tracker.log_artifact(best_path, "checkpoints")
    # the machine as the run ends: a resumed run's last one, with every thread (an evaluator trained beside
    # had half of them at the start)
    tracker.set_tags({"best_checkpoint": str(best_path.resolve()), "machine": machine(setup.device),
                      **({"ema_length_chosen": state["ema_length"]} if "ema_length" in state else {})})
    tracker.describe(headline(chosen, scores, setup.config.eval.select_by, seeds))
    return {"run_id": tracker.run_id, "steps": step, **metrics, "best_checkpoint": str(best_path),
            "grids": [str(path) for path in grids.values()], "tracking_uri": tracker.client.tracking_uri,
            "experiment_id": tracker.experiment_id()}
