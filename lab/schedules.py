"""Schedules, one place to add one: the noise schedule a model trains on, the samplers' timestep schedules over
its exact betas (every one a diffusers scheduler), and the learning rate's schedule with the clock it follows.

    train = make_noise_scheduler("cosine", 1000, "v_prediction")
    sampler = make_sampler("dpmsolver++", train, steps=20)       # timesteps set, betas and prediction from `train`
    flow = make_noise_scheduler(objective="flow_matching")       # rectified flow: FLOW_SAMPLERS sample it
    factor = lr_factor(config.train, clock, step)                # what the peak learning rate is multiplied by

The registries are plain data in diffusers' own names, so that a config is checked against them without torch;
diffusers (and torch with it) loads when a scheduler is built. Samplers are rebuilt from the training
scheduler's betas, so a model trained on any schedule (even "sigmoid", which DDIM and DPM-Solver do not know by
name) samples with any sampler.
"""
import importlib
import math
import time

from lab.errors import UserError, choose

# Our names -> diffusers' beta_schedule names. Diffusers' defaults stay: beta_start 1e-4, beta_end 0.02 (used by
# linear, scaled_linear and sigmoid; the cosine schedule has no such knobs).
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear",
                  "sigmoid": "sigmoid"}

# name -> (diffusers scheduler class, its own kwargs). Betas, num_train_timesteps and prediction_type come from
# the training scheduler.
SAMPLERS = {
    "ddpm": ("DDPMScheduler", {}),  # ancestral; always runs all training steps
    # "trailing" makes the first step t = T-1 (pure noise); diffusers' default "leading" starts short of it.
    "ddim": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
# The rectified-flow objective (lab.diffusion): x_t = (1 - s) x0 + s noise on a straight line, the model predicts
# the velocity noise - x0 at timestep s * num_train_timesteps; its samplers step along s with no betas.
FLOW_SAMPLERS = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                    "use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}
OBJECTIVES = {"denoising": SAMPLERS, "flow_matching": FLOW_SAMPLERS}  # the objective -> the samplers it takes
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the model predicts, in diffusers' names
# the loss's weight over the timesteps (lab.diffusion.loss_weights); logit_normal weights flow matching's by
# drawing them from that density (SD3) instead
LOSS_WEIGHTINGS = ("uniform", "min_snr", "logit_normal")


def _diffusers():
    """diffusers loads on the first scheduler built: `lab.config` reads the registries above without torch."""
    return importlib.import_module("diffusers")


def make_noise_scheduler(beta_schedule="cosine", num_train_timesteps=1000, prediction_type="epsilon",
                         objective="denoising"):
    """The training noise scheduler, a diffusers DDPMScheduler (add_noise, get_velocity; also the source of the
    samplers' betas), or for flow matching a FlowMatchEulerDiscreteScheduler (no betas: beta_schedule and
    prediction_type do not apply)."""
    choose("objective", "objective", objective, OBJECTIVES)
    if objective == "flow_matching":
        return _diffusers().FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps)
    name = choose("beta_schedule", "beta schedule", beta_schedule, BETA_SCHEDULES)
    choose("prediction_type", "prediction type", prediction_type, PREDICTION_TYPES)
    return _diffusers().DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=name,
                                      prediction_type=prediction_type)


def is_flow_matching(train_scheduler):
    """Whether a training scheduler is the rectified flow's (make_noise_scheduler's objective)."""
    return type(train_scheduler).__name__ == FLOW_SAMPLERS["euler"][0]


def sampler_steps_problem(sampler, steps, num_train_timesteps, objective="denoising"):
    """Why `sampler` cannot run `steps` steps of a model trained with `num_train_timesteps` on `objective`, or None."""
    if sampler not in OBJECTIVES[objective]:
        return f"'{sampler}' does not sample {objective}; its samplers: {', '.join(OBJECTIVES[objective])}"
    if sampler != "ddpm" and not 1 <= steps <= num_train_timesteps:
        return f"{steps} is not between 1 and num_train_timesteps={num_train_timesteps}"
    return None


def make_sampler(sampler, train_scheduler, steps=50, device=None):
    """A fresh sampling scheduler with the training betas and prediction type (or the flow's), its timesteps set."""
    flow = is_flow_matching(train_scheduler)
    class_name, kwargs = choose("sampler", "sampler", sampler, FLOW_SAMPLERS if flow else SAMPLERS)
    cfg = train_scheduler.config
    problem = sampler_steps_problem(sampler, steps, cfg.num_train_timesteps, "flow_matching" if flow else "denoising")
    if problem:
        raise UserError("steps", problem)
    if flow:
        scheduler = getattr(_diffusers(), class_name)(num_train_timesteps=cfg.num_train_timesteps, **kwargs)
        scheduler.set_timesteps(steps, device=device)
        return scheduler
    if sampler == "ddpm":
        steps = cfg.num_train_timesteps
    if sampler == "dpmsolver++" and steps == cfg.num_train_timesteps:
        # diffusers' default linspace spacing repeats the middle timestep when steps == num_train_timesteps: a
        # step of length zero, and NaN images from there on; trailing spacing gives every timestep once
        kwargs = {**kwargs, "timestep_spacing": "trailing"}
    scheduler = getattr(_diffusers(), class_name)(
        num_train_timesteps=cfg.num_train_timesteps, trained_betas=train_scheduler.betas.numpy(),
        prediction_type=cfg.prediction_type, **kwargs)
    scheduler.set_timesteps(steps, device=device)
    return scheduler


# --- the learning rate -------------------------------------------------------------------------------------

class Clock:
    """How far a run has come, as a fraction: the larger of steps done / total_steps and, under a time budget
    (`train.max_minutes`), seconds spent / budget. The learning-rate schedule follows it, so a time budget
    anneals to zero on any machine, however fast. `spent_s` is part of the resume state: a resumed run
    continues its budget instead of starting a new one, and the learning curves' minutes leave out the time a
    run lay stopped."""

    def __init__(self, total_steps, budget_minutes=None):
        self.total_steps, self.budget_s = total_steps, budget_minutes * 60 if budget_minutes else None
        self.step, self.spent_s, self._origin = 0, 0.0, time.perf_counter()

    def start(self, step=0, spent_s=0.0):
        self.step, self.spent_s = step, spent_s
        self._origin = time.perf_counter() - spent_s

    def tick(self, step, agree=None):
        """After optimizer step `step`. `agree(seconds)`: the value every process uses (data parallel: the main
        process's), so that all apply the same learning rate and stop at the same step."""
        self.step = step
        self.spent_s = time.perf_counter() - self._origin
        if agree is not None and self.budget_s:
            self.spent_s = agree(self.spent_s)

    @property
    def fraction(self):
        by_time = self.spent_s / self.budget_s if self.budget_s else 0.0
        return min(1.0, max(self.step / self.total_steps, by_time))

    @property
    def out_of_time(self):
        return bool(self.budget_s) and self.spent_s >= self.budget_s

    def ends_within(self, steps, seconds):
        """Whether the step count or the time budget ends the run within `steps` more steps or `seconds` more."""
        return self.total_steps - self.step < steps or (bool(self.budget_s) and self.budget_s - self.spent_s < seconds)


def lr_factor(train, clock, step):
    """The peak rate's multiplier at optimizer step `step`: a linear warm-up over train.warmup_steps, then
    constant or a cosine to zero over the clock's fraction (diffusers' get_scheduler counts steps only; a CPU run
    under a time budget does not know its step count)."""
    warm = min(1.0, step / train.warmup_steps) if train.warmup_steps else 1.0
    return warm if train.lr_schedule == "constant" else warm * 0.5 * (1 + math.cos(math.pi * clock.fraction))
