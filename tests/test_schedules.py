"""lab.schedules, lab.diffusion and lab.sampling: schedules x prediction types, samplers sharing the training betas, the one sample() entry point
(shape, range, determinism, callbacks), denoising strips and errors. Tiny UNet at 32x32 on CPU."""

import pytest
import torch

from lab.errors import UserError
from lab.diffusion import diffusion_loss, loss_weights, noised, predicted_x0, training_target
from lab.model_zoo import build_model
from lab.sampling import denoising_strip, sample
from lab.schedules import (BETA_SCHEDULES, FLOW_SAMPLERS, PREDICTION_TYPES, SAMPLERS, make_noise_scheduler,
                           make_sampler)

LABELS = torch.zeros(2, 24)
LABELS[0, [3, 11]] = 1
LABELS[1, 20] = 1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", "time_add", image_size=32)


def run(model, **kwargs):
    kwargs = {"image_size": 32, "steps": 5, **kwargs}
    kwargs.setdefault("train_scheduler", make_noise_scheduler("cosine", 50))
    return sample(model, LABELS, **kwargs)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_every_schedule_and_prediction_type_builds(schedule, prediction_type):
    sched = make_noise_scheduler(schedule, 1000, prediction_type)
    assert sched.config.beta_schedule == BETA_SCHEDULES[schedule]
    assert sched.config.prediction_type == prediction_type
    assert sched.betas.shape == (1000,) and ((sched.betas > 0) & (sched.betas < 1)).all()
    for name in SAMPLERS:  # every sampler shares the exact betas, even for "sigmoid", and the prediction type
        sampler = make_sampler(name, sched, steps=10)
        assert torch.equal(sampler.alphas_cumprod, sched.alphas_cumprod)
        assert sampler.config.prediction_type == prediction_type


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_samplers_produce_images_in_range(model, sampler, prediction_type):
    train = make_noise_scheduler("linear", 50, prediction_type)
    images = run(model, train_scheduler=train, sampler=sampler, guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_as_many_sampling_steps_as_training_steps_visit_each_timestep_once(model, sampler):
    """steps == num_train_timesteps: DPM-Solver++ under diffusers' default spacing repeated a timestep
    there (a step of length zero) and returned NaN images."""
    train = make_noise_scheduler("cosine", 20, "v_prediction")
    timesteps = make_sampler(sampler, train, steps=20).timesteps.tolist()
    assert len(set(timesteps)) == len(timesteps) == 20
    images = run(model, train_scheduler=train, sampler=sampler, steps=20, guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(images).all()


def test_cross_attn_model_samples_with_guidance():
    torch.manual_seed(0)
    model = build_model("tiny", "cross_attn", image_size=32)
    images = run(model, sampler="dpmsolver++", guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpmsolver++", 0.0)])
def test_same_generator_seed_gives_identical_samples(model, sampler, eta):
    a = run(model, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(7))
    b = run(model, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(7))
    c = run(model, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler,expected", [("ddpm", 50), ("ddim", 5), ("dpmsolver++", 5)])
def test_callback_once_per_step(model, sampler, expected):
    calls = []
    run(model, sampler=sampler, callback=lambda i, t, x: calls.append((i, int(t), x.shape)))
    assert [i for i, _, _ in calls] == list(range(expected))  # ddpm ignores steps=5: all 50 training steps
    assert calls[0][1] == 49  # every sampler starts from pure noise
    assert all(shape == (2, 3, 32, 32) for _, _, shape in calls)


def test_sample_restores_train_mode(model):
    model.train()
    run(model, sampler="ddim")
    assert model.training
    model.eval()


def test_denoising_strip_runs_from_noise_to_the_sample(model):
    kwargs = dict(train_scheduler=make_noise_scheduler("cosine", 50), sampler="ddim", steps=10, image_size=32)
    strip = denoising_strip(model, LABELS, generator=torch.Generator().manual_seed(3), **kwargs)
    final = sample(model, LABELS, generator=torch.Generator().manual_seed(3), **kwargs)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert strip.shape == (8, 2, 3, 32, 32)
    assert torch.equal(strip[0], noise.clamp(-1, 1))
    assert torch.equal(strip[-1], final)
    assert len({f.sum().item() for f in strip}) == 8  # eight distinct moments

    calls = []
    strip = denoising_strip(model, LABELS, frames=12, callback=lambda *a: calls.append(a), **kwargs)
    assert strip.shape[0] == 12 and len(calls) == 10


def test_training_target(model):
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    eps = make_noise_scheduler(prediction_type="epsilon")
    assert torch.equal(training_target(eps, x0, noise, t), noise)
    v = make_noise_scheduler(prediction_type="v_prediction")
    assert torch.equal(training_target(v, x0, noise, t), v.get_velocity(x0, noise, t))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weights_the_x0_error_by_min_snr_gamma(prediction_type):
    """Min-SNR's definition: whatever the target, the weighted loss is min(SNR, gamma) * |x0 - x0_hat|^2."""
    scheduler = make_noise_scheduler("cosine", prediction_type=prediction_type)
    x0, noise, guess = torch.randn(3, 5, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 100, 300, 600, 900])
    a = scheduler.alphas_cumprod[t].double().sqrt()[:, None, None, None]
    s = (1 - a**2).sqrt()
    x_t = a * x0 + s * noise
    x0_hat = (x_t - s * guess) / a if prediction_type == "epsilon" else a * x_t - s * guess
    target_error = (guess - training_target(scheduler, x0, noise, t)).square().mean((1, 2, 3))
    x0_error = (x0 - x0_hat).square().mean((1, 2, 3))
    snr = (a**2 / s**2).flatten()
    weighted = loss_weights(scheduler, t, "min_snr", 5.0).double() * target_error
    torch.testing.assert_close(weighted, snr.clamp(max=5.0) * x0_error, rtol=1e-4, atol=1e-6)
    assert torch.equal(loss_weights(scheduler, t, "uniform"), torch.ones(5))
    assert loss_weights(scheduler, torch.tensor([999]), "min_snr").isfinite().all()  # SNR ~ 0 at pure noise


def test_unknown_names_list_the_choices(model):
    with pytest.raises(UserError, match=r"^beta_schedule: unknown beta schedule 'exp'; "
                                        r"choose one of: linear, cosine, scaled_linear, sigmoid$"):
        make_noise_scheduler("exp")
    with pytest.raises(UserError, match=r"^prediction_type: unknown prediction type 'sample'; "
                                        r"choose one of: epsilon, v_prediction$"):
        make_noise_scheduler(prediction_type="sample")
    with pytest.raises(UserError, match=r"^sampler: unknown sampler 'euler'; choose one of: ddpm, ddim, dpmsolver\+\+$"):
        run(model, sampler="euler")


def test_bad_sampler_arguments_are_user_errors(model):
    with pytest.raises(UserError, match="^eta: only the ddim sampler"):
        run(model, sampler="dpmsolver++", eta=0.5)
    with pytest.raises(UserError, match="^steps: 51 is not between 1 and num_train_timesteps=50"):
        run(model, sampler="ddim", steps=51)


class PointMassVelocity(torch.nn.Module):
    """The exact flow-matching velocity when every image is `target`: on x_s = (1 - s) target + s noise the
    velocity noise - target is (x_s - target) / s. Records the batch size of each call."""

    def __init__(self, target):
        super().__init__()
        self.target, self.anchor, self.batches = target, torch.nn.Parameter(torch.zeros(())), []

    def forward(self, x, t, labels, drop=None):
        self.batches.append(len(x))
        s = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000
        return (x - self.target) / s


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_flow_samplers_follow_the_exact_velocity_to_the_image(sampler):
    """The straight path is the rectified flow's ODE: with the exact velocity both samplers land on the image,
    which also checks the timestep convention (the model sees s * num_train_timesteps, as in training)."""
    target = torch.linspace(-0.8, 0.8, 3 * 8 * 8).reshape(1, 3, 8, 8)
    flow = make_noise_scheduler(objective="flow_matching")
    images = sample(PointMassVelocity(target), LABELS, train_scheduler=flow, sampler=sampler, steps=6,
                    image_size=8, generator=torch.Generator().manual_seed(0))
    # DPM-Solver's timesteps are its sigmas x 1000 rounded to whole steps: the model sees t up to 1 step off
    torch.testing.assert_close(images, target.expand(2, -1, -1, -1), atol=1e-4 if sampler == "euler" else 3e-3, rtol=0)


def test_flow_matching_trains_on_the_straight_line_towards_the_velocity():
    flow = make_noise_scheduler(objective="flow_matching")
    x0, noise = torch.rand(64, 3, 4, 4), torch.randn(64, 3, 4, 4)
    x_t, t, target = noised(flow, x0, noise, torch.Generator().manual_seed(0))
    s = (t / 1000).view(-1, 1, 1, 1)
    assert t.dtype == torch.float32 and 0 <= t.min() and t.max() < 1000 and t.std() > 200  # uniform over the line
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(target, noise - x0)
    per_sample, _ = diffusion_loss(PointMassVelocity(x0[:1]), flow, x0[:1].expand(8, -1, -1, -1), LABELS[:1].expand(8, -1),
                                   torch.Generator().manual_seed(1))
    torch.testing.assert_close(per_sample, torch.zeros(8), atol=1e-5, rtol=0)  # the exact velocity has no loss
    with pytest.raises(UserError, match=r"^sampler: unknown sampler 'ddim'; choose one of: euler, dpmsolver\+\+$"):
        make_sampler("ddim", flow)


def test_the_logit_normal_weighting_draws_flow_matching_timesteps_from_the_middle_of_the_line():
    flow = make_noise_scheduler(objective="flow_matching")
    x0, noise = torch.rand(4096, 1, 1, 1), torch.randn(4096, 1, 1, 1)
    middle = {}
    for weighting in ("uniform", "logit_normal"):
        x_t, t, target = noised(flow, x0, noise, torch.Generator().manual_seed(0), weighting)
        s = (t / 1000).view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, (1 - s) * x0 + s * noise)  # the same line and target, other timesteps
        torch.testing.assert_close(target, noise - x0)
        middle[weighting] = ((0.25 < s) & (s < 0.75)).float().mean().item()
    # P(0.25 < s < 0.75) is 0.5 when uniform, P(|n| < logit 0.75 = 1.10) = 0.73 for sigmoid of a standard normal
    assert abs(middle["uniform"] - 0.5) < 0.03 and abs(middle["logit_normal"] - 0.73) < 0.03
    assert torch.equal(loss_weights(flow, t, "logit_normal"), torch.ones(4096))  # the density is the weighting


@pytest.mark.parametrize("interval, guided", [((0.0, 1.0), 10), ((0.5, 1.0), 5), ((0.0, 0.3), 3), ((0.35, 0.75), 4)])
def test_guidance_applies_only_within_its_interval(interval, guided):
    """DDIM's 10 trailing steps of 1000 sit at t/T = 0.999, 0.899, ..., 0.099: a guided step runs the doubled
    batch (conditional and null rows), any other the conditional rows alone."""
    model = PointMassVelocity(torch.zeros(1, 3, 8, 8))
    run(model, train_scheduler=make_noise_scheduler("cosine", 1000), sampler="ddim", steps=10, image_size=8,
        guidance_scale=3.0, guidance_interval=interval)
    assert model.batches.count(2 * len(LABELS)) == guided and len(model.batches) == 10


@pytest.mark.parametrize("objective, prediction_type", [("denoising", "epsilon"), ("denoising", "v_prediction"),
                                                        ("flow_matching", "v_prediction")])
def test_the_clean_image_implied_by_the_exact_target_is_the_image(objective, prediction_type):
    """predicted_x0 inverts each objective's training target: at the batch's timesteps and at one scalar step."""
    train = make_noise_scheduler("cosine", prediction_type=prediction_type, objective=objective)
    x0, noise = torch.rand(16, 3, 4, 4) * 2 - 1, torch.randn(16, 3, 4, 4)
    x_t, t, target = noised(train, x0, noise, torch.Generator().manual_seed(0))
    torch.testing.assert_close(predicted_x0(train, x_t, t, target), x0, atol=2e-4, rtol=0)
    one = noised(train, x0[:1], noise[:1], torch.Generator().manual_seed(1))
    torch.testing.assert_close(predicted_x0(train, one[0], one[1][0], one[2]), x0[:1], atol=2e-4, rtol=0)


class SelfConditionedPointMass(PointMassVelocity):
    """The point mass's exact velocity, as a self-conditioned model: records the x0 estimate of each call."""

    def __init__(self, target):
        super().__init__(target)
        self.config, self.estimates, self.grads = type("Config", (), {"self_conditioning": True}), [], []

    def forward(self, x, t, labels, drop=None, x0_estimate=None):
        self.estimates.append(x0_estimate.clone())
        self.grads.append(torch.is_grad_enabled())
        return super().forward(x, t, labels, drop)


def test_self_conditioned_sampling_reads_the_previous_steps_clean_image():
    """Zeros at the first step; from then on the image the previous (guided) prediction implies, which for the
    exact velocity is the point mass itself, in both halves of the guided batch."""
    target = torch.linspace(-0.8, 0.8, 3 * 8 * 8).reshape(1, 3, 8, 8)
    model = SelfConditionedPointMass(target)
    images = sample(model, LABELS, train_scheduler=make_noise_scheduler(objective="flow_matching"), sampler="euler",
                    steps=4, image_size=8, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, target.expand(2, -1, -1, -1), atol=1e-4, rtol=0)
    first, *later = model.estimates
    assert len(later) == 3 and first.shape == (4, 3, 8, 8) and not first.any()
    for estimate in later:
        torch.testing.assert_close(estimate, target.expand(4, -1, -1, -1), atol=1e-4, rtol=0)


def test_self_conditioned_training_feeds_half_the_batch_its_own_first_prediction():
    """A first pass without gradients on the first half, its clean image (clamped) to those rows, zeros to the
    rest; the exact velocity still has no loss."""
    flow = make_noise_scheduler(objective="flow_matching")
    target = torch.rand(1, 3, 4, 4) * 2 - 1
    model = SelfConditionedPointMass(target)
    per_sample, _ = diffusion_loss(model, flow, target.expand(8, -1, -1, -1), LABELS[:1].expand(8, -1),
                                   torch.Generator().manual_seed(1), cfg_dropout=0.5, self_conditioning=True)
    torch.testing.assert_close(per_sample, torch.zeros(8), atol=1e-5, rtol=0)
    assert model.batches == [4, 8] and model.grads == [False, True] and not model.estimates[0].any()
    torch.testing.assert_close(model.estimates[1][:4], target.expand(4, -1, -1, -1), atol=1e-5, rtol=0)
    assert not model.estimates[1][4:].any()


def test_the_training_loss_takes_the_configs_timestep_density_self_conditioning_and_label_dropout():
    """build.training_loss, the one call the trainer and the benchmark make, hands the config's choices on."""
    from lab import build
    from lab.config import load_config
    from tests.conftest import EXPERIMENTS
    config = load_config(EXPERIMENTS / "ablations" / "objective_flow_matching_logit_normal.yaml",
                         ["model.self_conditioning=true", "model.cfg_dropout=0.5"])
    calls = []

    def model(x_t, t, labels, drop, *estimate):
        calls.append((len(x_t), drop, estimate))
        return torch.zeros_like(x_t)
    _, t = build.training_loss(config, model, build.make_noise_scheduler(config), torch.zeros(4096, 1, 1, 1),
                               torch.zeros(4096, 24), torch.Generator().manual_seed(0))
    s = t / config.diffusion.num_train_timesteps
    assert abs(((0.25 < s) & (s < 0.75)).float().mean().item() - 0.73) < 0.03  # logit-normal, not uniform
    assert [(size, len(estimate)) for size, _, estimate in calls] == [(2048, 1), (4096, 1)]  # the x0 estimate pass
    assert abs(calls[1][1].float().mean().item() - 0.5) < 0.03  # half the rows take the null condition
