"""Sampling, in one module for the trainer, the sample command, the report and the benchmark: ONE entry point
for every sampler (k-diffusion style; the samplers themselves are lab/schedules.py's), classifier-free guidance,
batched generation with a progress bar, captioned grids and denoising strips, loading a checkpoint for sampling,
and scoring the test splits.

    images = sample(model, labels, train_scheduler=train, sampler="dpmsolver++", steps=25, guidance_scale=2.0)
    scores = score_checkpoint("runs/base/best.pt")       # {split: {accuracy, accuracy_std, exact_accuracy, ...}}
"""
from pathlib import Path

import torch
import yaml
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from lab import build
from lab.checkpoints import load_checkpoint
from lab.conditioning import guided_prediction
from lab.config import ExperimentConfig
from lab.diffusion import predicted_x0
from lab.errors import UserError
from lab.eval import judge_samples, nonfinite, over_seeds
from lab.grids import label_names_of, labelled_grid, titled_rows
from lab.schedules import make_sampler

STRIP_LABELS = ["red sphere", "yellow cube", "cyan cylinder"]


@torch.no_grad()
def sample(model, labels, *, train_scheduler, sampler="ddim", steps=50, eta=0.0, guidance_scale=1.0,
           guidance_interval=(0.0, 1.0), generator=None, image_size=64, callback=None, noise=None) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, image_size, image_size), for multi-hot labels (B, num_labels).

    steps is ignored by "ddpm" (it runs all training steps); eta is DDIM's and must stay 0 for the others.
    Guidance applies at the steps whose noise level t / num_train_timesteps lies within `guidance_interval`
    (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"); the others take the conditional
    prediction alone. A self-conditioned model (model.config.self_conditioning) reads the clean image implied by
    the previous step's (guided) prediction, zeros at the first. callback(i, t, x) runs after step i with the
    current latent x. noise: the starting latent, else drawn from generator (a CPU generator gives the same images
    on any device). The model is put in eval mode meanwhile.
    """
    if eta and sampler != "ddim":
        raise UserError("eta", f"only the ddim sampler takes eta; '{sampler}' does not")
    device = next(model.parameters()).device
    scheduler = make_sampler(sampler, train_scheduler, steps, device)
    labels = labels.to(device, torch.float32)
    if noise is None:
        noise = randn_tensor((labels.shape[0], 3, image_size, image_size), generator=generator, device=device)
    # the flow's Euler scheduler starts at unit noise and takes the latent unscaled, so it has neither
    x = noise.to(device, torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)
    step_kwargs = {"generator": generator, **({"eta": eta} if sampler == "ddim" else {})}
    low, high = guidance_interval
    num_train_timesteps = train_scheduler.config.num_train_timesteps
    estimate = torch.zeros_like(x) if getattr(getattr(model, "config", None), "self_conditioning", False) else None
    was_training = model.training
    model.eval()
    try:
        for i, t in enumerate(scheduler.timesteps):
            scale = guidance_scale if low <= float(t) / num_train_timesteps <= high else 1.0
            pred = guided_prediction(model, scale_input(x, t), t, labels, scale, estimate)
            if estimate is not None:
                estimate = predicted_x0(train_scheduler, x, t, pred.float()).clamp(-1, 1)
            # .to: under autocast the prediction is bf16; the scheduler's arithmetic stays in float32
            x = scheduler.step(pred.to(x.dtype), t, x, **step_kwargs).prev_sample
            if callback is not None:
                callback(i, t, x)
    finally:
        model.train(was_training)
    return x.clamp(-1, 1)


def denoising_strip(model, labels, *, frames: int = 8, **sample_kwargs) -> torch.Tensor:
    """(frames, B, 3, H, W): evenly spaced latents x_t from the starting noise (first) to the final sample (last).

    Frames are the noisy latents, clamped to [-1, 1] for display, not predicted x0: DPMSolverMultistepScheduler's
    step output has no pred_original_sample, and latents look the same way for every sampler. With fewer steps
    than frames - 1, some frames repeat.
    """
    s = dict(sample_kwargs)
    device = next(model.parameters()).device
    size = s.get("image_size", 64)
    if s.get("noise") is None:  # drawn here, as sample() would, so frame 0 is the exact starting noise
        s["noise"] = randn_tensor((labels.shape[0], 3, size, size), generator=s.get("generator"), device=device)
    n = len(make_sampler(s.get("sampler", "ddim"), s["train_scheduler"], s.get("steps", 50)).timesteps)
    wanted = torch.linspace(0, n, frames).round().long().tolist()  # state k = after k steps; 0 = the noise
    kept = {0: s["noise"].to(device, torch.float32).clamp(-1, 1)}
    user_callback = s.pop("callback", None)

    def keep(i, t, x):
        if i + 1 in wanted:
            kept[i + 1] = x.clamp(-1, 1)
        if user_callback is not None:
            user_callback(i, t, x)

    kept[n] = sample(model, labels, callback=keep, **s)
    return torch.stack([kept[k] for k in wanted])


# --- with a setup: the configured sampler, batches, grids, scores ----------------------------------------

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
    with build.autocast(setup.config, setup.device), tqdm(total=total, desc=desc, unit="step", leave=False,
                                                          mininterval=1, disable=None if desc else True) as bar:
        for chunk in chunks:
            images.append(sample(model, chunk.to(setup.device), train_scheduler=setup.noise_scheduler,
                                 sampler=sampler, steps=steps, eta=cfg.eta,
                                 guidance_scale=cfg.guidance_scale if guidance_scale is None else guidance_scale,
                                 guidance_interval=cfg.guidance_interval, generator=generator,
                                 image_size=setup.config.data.image_size,
                                 callback=lambda *_: bar.update()).float())
    return torch.cat(images)


def grid_image(images, labels, setup, verdicts=None, nrow=8):
    """A PIL grid (8 per row) of images in [-1, 1], each tile captioned with the labels it was asked for and, with
    the strict judge's `verdicts`, framed by what it holds (lab.grids.VERDICT_COLOURS)."""
    return labelled_grid(images, label_names_of(labels, setup.label_names), nrow=nrow, verdicts=verdicts)


def strip_image(model, setup, seed):
    """The denoising strip: one row per STRIP_LABELS entry, from pure noise to the final image."""
    names = setup.label_names
    if not all(name in names for name in STRIP_LABELS):
        return None
    labels = torch.zeros(len(STRIP_LABELS), len(names), device=setup.device)
    for row, name in enumerate(STRIP_LABELS):
        labels[row, names.index(name)] = 1
    cfg = setup.config.eval
    with build.autocast(setup.config, setup.device):
        frames = denoising_strip(model, labels, frames=10, train_scheduler=setup.noise_scheduler, sampler=cfg.sampler,
                                 steps=cfg.steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                                 guidance_interval=cfg.guidance_interval,
                                 generator=torch.Generator(setup.device).manual_seed(seed),
                                 image_size=setup.config.data.image_size)
    return titled_rows(frames.float().transpose(0, 1), STRIP_LABELS)


def load_for_sampling(path, device="cpu"):
    """best.pt -> (model, its validated config) for scoring or sampling later."""
    return model_from_checkpoint(load_checkpoint(path), path, device)


def model_from_checkpoint(state, path, device="cpu"):
    """A loaded best.pt (read from `path`) -> (model, its validated config)."""
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(path, "not a generator checkpoint of ddpm-lab (a best.pt or latest.pt holds a model and its "
                              "config)")
    try:
        config = ExperimentConfig.model_validate(yaml.safe_load(state["config"]))
    except (ValueError, yaml.YAMLError) as e:  # pydantic's ValidationError is a ValueError
        raise UserError(path, f"its config does not validate ({str(e).splitlines()[0]})") from None
    model = build.make_model(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(path, f"weights do not fit the model its config describes ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), config


def score_splits(model, setup, seeds, log_grid=None, write=print):
    """A model's figures on each test split over several sampling seeds: {split: {accuracy, accuracy_std, and with
    a strict judge exact_accuracy, extra_objects, missing_objects and their _std, nonfinite_samples}}.

    log_grid(image, key) receives the first seed's captioned grid of each split, key `<split>_samples`."""
    scores = {}
    for name, labels in setup.test_labels.items():
        judgements = []
        for seed in range(seeds):
            images = generate(model, labels, setup, seed=10_000 + seed,
                              desc=f"scoring {Path(name).stem}, seed {seed + 1}/{seeds}")
            judgements.append(judge_samples(images, labels, setup.evaluator, setup.strict_judge))
            if seed == 0 and log_grid:
                log_grid(grid_image(images, labels, setup, judgements[0].verdicts), f"{Path(name).stem}_samples")
        broken = nonfinite(judgements)
        if broken:
            write(f"warning: {broken} of {seeds * len(labels)} samples for {name} were not finite: counted as misses")
        scores[name] = {**over_seeds(judgements), "nonfinite_samples": broken}
    return scores


def score_checkpoint(path, splits=None, seeds=None, device=None, log_grid=None):
    """Score a best.pt on test splits over sampling seeds (None: its config's eval.final_seeds), with the data
    and evaluator its config names: ({split: figures}, the seeds used)."""
    device = build.pick_device(device)
    model, config = load_for_sampling(path, device)
    setup = build.sampling_setup(model, config, device, splits)
    seeds = seeds or config.eval.final_seeds
    return score_splits(model, setup, seeds, log_grid), seeds
