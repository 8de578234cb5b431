"""The diffusion objective (EDM's `loss.py`): the noise schedule, what the model predicts, how timesteps
are weighted, and the loss. Everything is a diffusers scheduler.

    train = make_noise_scheduler("cosine", prediction_type="v_prediction")
    per_sample, t = diffusion_loss(model, train, x0, labels, generator, cfg_dropout=0.1)
    loss = (per_sample * loss_weights(train, t, "min_snr")).mean()
"""

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lab.errors import choose

# Our names -> diffusers' beta_schedule names. Diffusers' defaults stay: beta_start 1e-4, beta_end 0.02
# (used by linear, scaled_linear and sigmoid; the cosine schedule has no such knobs).
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear",
                  "sigmoid": "sigmoid"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def make_noise_scheduler(beta_schedule: str = "cosine", num_train_timesteps: int = 1000,
                         prediction_type: str = "epsilon") -> DDPMScheduler:
    """The training noise scheduler (add_noise, get_velocity); also the source of the samplers' betas."""
    choose("beta_schedule", "beta schedule", beta_schedule, BETA_SCHEDULES)
    choose("prediction_type", "prediction type", prediction_type, PREDICTION_TYPES)
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=BETA_SCHEDULES[beta_schedule],
                         prediction_type=prediction_type)


def training_target(scheduler, x0, noise, t):
    """What the model learns to predict: the noise (epsilon) or v = sqrt(a)*noise - sqrt(1-a)*x0."""
    kind = choose("prediction_type", "prediction type", scheduler.config.prediction_type, PREDICTION_TYPES)
    return noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, t)


def loss_weights(scheduler, t, weighting: str = "uniform", snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights of the MSE at timesteps t.

    min_snr (Hang et al. 2023, "Min-SNR weighting"): the weight of the equivalent x0 loss is min(SNR, gamma), so
    the nearly clean timesteps stop dominating the gradient. For an epsilon target that is min(1, gamma/SNR);
    for v it is min(SNR, gamma)/(SNR + 1).
    """
    choose("loss_weighting", "loss weighting", weighting, LOSS_WEIGHTINGS)
    if weighting == "uniform":
        return torch.ones(t.shape, device=t.device)
    snr = compute_snr(scheduler, t)
    if scheduler.config.prediction_type == "epsilon":
        return (snr_gamma / snr).clamp(max=1)  # SNR 0 (pure noise) gives inf, clamped to 1
    return snr.clamp(max=snr_gamma) / (snr + 1)


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
