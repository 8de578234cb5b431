"""Noise schedules, training targets and ONE sampling entry point for every sampler (k-diffusion style).

Everything is a diffusers scheduler. Samplers are rebuilt from the training scheduler's exact betas, so a model
trained on any schedule (even "sigmoid", which DDIM and DPM-Solver do not know by name) samples with any sampler.

    train = make_noise_scheduler("cosine", prediction_type="v_prediction")
    loss = F.mse_loss(model(train.add_noise(x0, noise, t), t, labels, drop), training_target(train, x0, noise, t))
    images = sample(model, labels, train_scheduler=train, sampler="dpmsolver++", steps=25, guidance_scale=2.0)
"""

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor

from lab.errors import UserError
from lab.model_zoo import guided_prediction

# Our names -> diffusers' beta_schedule names. Diffusers' defaults stay: beta_start 1e-4, beta_end 0.02
# (used by linear, scaled_linear and sigmoid; the cosine schedule has no such knobs).
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear",
                  "sigmoid": "sigmoid"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_WEIGHTINGS = ("uniform", "min_snr")

# name -> (scheduler class, its own kwargs). Betas, num_train_timesteps and prediction_type come from training.
SAMPLERS = {
    "ddpm": (DDPMScheduler, {}),  # ancestral; always runs all training steps
    # "trailing" makes the first step t = T-1 (pure noise); diffusers' default "leading" starts short of it.
    "ddim": (DDIMScheduler, {"timestep_spacing": "trailing"}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def _choose(key, kind, name, choices):
    if name not in choices:
        raise UserError(key, f"unknown {kind} '{name}'; choose one of: {', '.join(choices)}")
    return name


def make_noise_scheduler(beta_schedule: str = "cosine", num_train_timesteps: int = 1000,
                         prediction_type: str = "epsilon") -> DDPMScheduler:
    """The training noise scheduler (add_noise, get_velocity); also the source of the samplers' betas."""
    _choose("beta_schedule", "beta schedule", beta_schedule, BETA_SCHEDULES)
    _choose("prediction_type", "prediction type", prediction_type, PREDICTION_TYPES)
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=BETA_SCHEDULES[beta_schedule],
                         prediction_type=prediction_type)


def training_target(scheduler, x0, noise, t):
    """What the model learns to predict: the noise (epsilon) or v = sqrt(a)*noise - sqrt(1-a)*x0."""
    kind = _choose("prediction_type", "prediction type", scheduler.config.prediction_type, PREDICTION_TYPES)
    return noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, t)


def loss_weights(scheduler, t, weighting: str = "uniform", snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights of the MSE at timesteps t.

    min_snr (Hang et al. 2023, "Min-SNR weighting"): the weight of the equivalent x0 loss is min(SNR, gamma), so
    the nearly clean timesteps stop dominating the gradient. For an epsilon target that is min(1, gamma/SNR);
    for v it is min(SNR, gamma)/(SNR + 1).
    """
    _choose("loss_weighting", "loss weighting", weighting, LOSS_WEIGHTINGS)
    if weighting == "uniform":
        return torch.ones(t.shape, device=t.device)
    snr = compute_snr(scheduler, t)
    if scheduler.config.prediction_type == "epsilon":
        return (snr_gamma / snr).clamp(max=1)  # SNR 0 (pure noise) gives inf, clamped to 1
    return snr.clamp(max=snr_gamma) / (snr + 1)


def make_sampler(sampler: str, train_scheduler, steps: int = 50, device=None):
    """A fresh sampling scheduler with the training betas and prediction type, its timesteps already set."""
    cls, kwargs = SAMPLERS[_choose("sampler", "sampler", sampler, SAMPLERS)]
    cfg = train_scheduler.config
    scheduler = cls(num_train_timesteps=cfg.num_train_timesteps, trained_betas=train_scheduler.betas.numpy(),
                    prediction_type=cfg.prediction_type, **kwargs)
    if sampler == "ddpm":
        steps = cfg.num_train_timesteps
    elif not 1 <= steps <= cfg.num_train_timesteps:
        raise UserError("steps", f"{steps} is not between 1 and num_train_timesteps={cfg.num_train_timesteps}")
    scheduler.set_timesteps(steps, device=device)
    return scheduler


@torch.no_grad()
def sample(model, labels, *, train_scheduler, sampler="ddim", steps=50, eta=0.0, guidance_scale=1.0,
           generator=None, image_size=64, callback=None, noise=None) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, image_size, image_size), for multi-hot labels (B, num_labels).

    steps is ignored by "ddpm" (it runs all training steps); eta is DDIM's and must stay 0 for the others.
    callback(i, t, x) runs after step i with the current latent x. noise: the starting latent, else drawn from
    generator (a CPU generator gives the same images on any device). The model is put in eval mode meanwhile.
    """
    if eta and sampler != "ddim":
        raise UserError("eta", f"only the ddim sampler takes eta; '{sampler}' does not")
    device = next(model.parameters()).device
    scheduler = make_sampler(sampler, train_scheduler, steps, device)
    labels = labels.to(device, torch.float32)
    if noise is None:
        noise = randn_tensor((labels.shape[0], 3, image_size, image_size), generator=generator, device=device)
    x = noise.to(device, torch.float32) * scheduler.init_noise_sigma
    step_kwargs = {"generator": generator, **({"eta": eta} if sampler == "ddim" else {})}
    was_training = model.training
    model.eval()
    try:
        for i, t in enumerate(scheduler.timesteps):
            pred = guided_prediction(model, scheduler.scale_model_input(x, t), t, labels, guidance_scale)
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
