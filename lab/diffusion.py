"""The diffusion objective (EDM's `loss.py`): what the model predicts, how timesteps are weighted, and the
loss, over a training noise scheduler from lab/schedules.py: denoising (DDPM's noising, an epsilon or v target)
or flow matching (rectified flow: a straight line from the image to noise, a velocity target).

    train = make_noise_scheduler("cosine", prediction_type="v_prediction")       # lab.schedules
    per_sample, t = diffusion_loss(model, train, x0, labels, generator, cfg_dropout=0.1)
    loss = (per_sample * loss_weights(train, t, "min_snr")).mean()

With self-conditioning (Chen et al. 2022, "Analog Bits") the model also reads an estimate of the clean image:
its own earlier prediction while sampling, and in training, for half of each batch, a first prediction made
without gradients (zeros for the other half and at the first sampling step).
"""

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from lab.errors import choose
from lab.schedules import LOSS_WEIGHTINGS, PREDICTION_TYPES, is_flow_matching


def training_target(scheduler, x0, noise, t):
    """What the model learns to predict: the noise (epsilon) or v = sqrt(a)*noise - sqrt(1-a)*x0."""
    kind = choose("prediction_type", "prediction type", scheduler.config.prediction_type, PREDICTION_TYPES)
    return noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, t)


def loss_weights(scheduler, t, weighting: str = "uniform", snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights of the MSE at timesteps t.

    min_snr (Hang et al. 2023, "Min-SNR weighting"): the weight of the equivalent x0 loss is min(SNR, gamma), so
    the nearly clean timesteps stop dominating the gradient. For an epsilon target that is min(1, gamma/SNR);
    for v it is min(SNR, gamma)/(SNR + 1).

    logit_normal (Esser et al. 2024, SD3) weights flow matching's timesteps through the density `noised` draws
    them from, so the loss itself is unweighted.
    """
    choose("loss_weighting", "loss weighting", weighting, LOSS_WEIGHTINGS)
    if weighting != "min_snr":
        return torch.ones(t.shape, device=t.device)
    snr = compute_snr(scheduler, t)
    if scheduler.config.prediction_type == "epsilon":
        return (snr_gamma / snr).clamp(max=1)  # SNR 0 (pure noise) gives inf, clamped to 1
    return snr.clamp(max=snr_gamma) / (snr + 1)


def predicted_x0(scheduler, x_t, t, pred):
    """The clean image implied by a prediction at timesteps t (a scalar or (B,)): x_t - s v for flow matching at
    s = t / T, else from DDPM's alphas_cumprod for the epsilon or v target."""
    t = torch.as_tensor(t, device=x_t.device)
    if is_flow_matching(scheduler):
        s = t.float() / scheduler.config.num_train_timesteps
        return x_t - (s.view(-1, 1, 1, 1) if s.ndim else s) * pred
    a = scheduler.alphas_cumprod.to(x_t.device)[t.long()]
    a = a.view(-1, 1, 1, 1) if a.ndim else a
    if scheduler.config.prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * pred) / a.sqrt()
    return a.sqrt() * x_t - (1 - a).sqrt() * pred


def noised(noise_scheduler, x0, noise, generator, weighting="uniform"):
    """(x_t, t, target) at random timesteps t in [0, num_train_timesteps): DDPM's integer steps, or for flow
    matching s * T with x_t = (1 - s) x0 + s noise and the velocity noise - x0 as target, s uniform or, with the
    logit_normal weighting, sigmoid of a standard normal (SD3: the middle of the line, where it is hardest)."""
    b, device, steps = len(x0), x0.device, noise_scheduler.config.num_train_timesteps
    if is_flow_matching(noise_scheduler):
        s = compute_density_for_timestep_sampling(weighting, b, logit_mean=0.0, logit_std=1.0, device=device,
                                                  generator=generator)
        s_ = s.view(-1, 1, 1, 1)
        return (1 - s_) * x0 + s_ * noise, s * steps, noise - x0
    t = torch.randint(0, steps, (b,), generator=generator, device=device)
    return noise_scheduler.add_noise(x0, noise, t), t, training_target(noise_scheduler, x0, noise, t)


def diffusion_loss(model, noise_scheduler, x0, labels, generator, cfg_dropout=0.0, self_conditioning=False,
                   weighting="uniform"):
    """Per-sample MSE to the training target at random timesteps (drawn as `weighting` says), and those timesteps.

    With cfg_dropout > 0 a random share of rows uses the learned null condition (classifier-free guidance). With
    self_conditioning the model takes an x0 estimate: the first half of the batch (a random half: batches are
    shuffled) its own prediction without gradients, the rest zeros; a fixed half keeps shapes static.
    """
    b, device = len(x0), x0.device
    noise = torch.randn(x0.shape, generator=generator, device=device)
    x_t, t, target = noised(noise_scheduler, x0, noise, generator, weighting)
    drop = torch.rand(b, generator=generator, device=device) < cfg_dropout if cfg_dropout > 0 else None
    if self_conditioning:
        half, estimate = b // 2, torch.zeros_like(x_t)
        with torch.no_grad():
            first = model(x_t[:half], t[:half], labels[:half], None if drop is None else drop[:half],
                          estimate[:half])
            estimate[:half] = predicted_x0(noise_scheduler, x_t[:half], t[:half], first.float()).clamp(-1, 1)
        pred = model(x_t, t, labels, drop, estimate)
    else:
        pred = model(x_t, t, labels, drop)
    return (pred.float() - target).square().mean((1, 2, 3)), t
