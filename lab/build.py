"""A validated config becomes built objects here, and only here: the data root, the model, the noise
scheduler, the evaluator, the optimiser, the learning-rate schedule, EMA, autocast and compile decisions. The
trainer, the sweeps, the sample command and the benchmark receive what this module builds; none of them decodes
the config again.

    setup = prepare(config, "experiments/base.yaml")     # a training Setup (data, model, evaluator, ...)
    opt = optimisation(config, setup.model, setup.device, total_steps)
    scoring = sampling_setup(model, config, device)      # what sampling a checkpoint needs, no training data
"""
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from lab import parallel, schedules
from lab.checks import check_run
from lab.data.iclevr import load_condition_sets, load_train
from lab.data.labels import load_objects
from lab.data.roots import resolve_root
from lab.diffusion import diffusion_loss
from lab.evaluator_cache import ensure_evaluator, strict_judge_for
from lab.hardware import fast_bf16
from lab.model_zoo import build_model


@dataclass
class SamplingSetup:
    """What sampling and scoring need: built for a training run, or for a checkpoint scored later."""
    config: object          # ExperimentConfig: eval.* (sampler, steps, guidance), data.image_size, autocast
    device: torch.device
    model: torch.nn.Module
    noise_scheduler: object  # the training DDPMScheduler (the samplers take its betas), or the flow's
    evaluator: object       # lab.eval.Evaluator: the course's rule, and the features of KID and FD
    strict_judge: object    # an Evaluator with a count head for these images, or None (no strict figures)
    label_names: list       # label index -> name (objects.json), for the captions of sample grids
    test_labels: dict       # split name -> multi-hot label sets, scored at the end
    root: Path              # the data root, the synthetic one rendered


@dataclass
class Setup(SamplingSetup):
    """A training run: the sampling setup plus its data, validation labels and run folder."""
    config_path: Path
    data: object            # lab.data.TrainingSet
    val_labels: torch.Tensor
    out_dir: Path


def pick_device(name=None):
    """This process's device: cuda:LOCAL_RANK under a launcher, else `name`, else cuda when available."""
    return parallel.device_for_rank(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_root(config):
    """The config's data root; the synthetic default is rendered on first use."""
    return resolve_root(config.data.root, config.data.synthetic_seed, config.data.synthetic_scenes)


def final_splits(root, config):
    """The splits scored at the end: eval.test_splits, and the held-out-pairs split where the root has it."""
    heldout = config.eval.heldout_split
    extra = [heldout] if heldout and heldout not in config.eval.test_splits and (root / heldout).is_file() else []
    return [*config.eval.test_splits, *extra]


def make_model(config):
    """The config's UNet with its conditioning front-end (lab.model_zoo)."""
    m = config.model
    return build_model(m.unet, m.conditioning, image_size=config.data.image_size, patch_size=m.patch_size,
                       width=m.width, attention_resolutions=m.attention_resolutions, cfg_null=m.cfg_null,
                       self_conditioning=m.self_conditioning, **m.overrides)


def make_noise_scheduler(config):
    """The training noise scheduler of the config (lab.schedules)."""
    d = config.diffusion
    return schedules.make_noise_scheduler(d.beta_schedule, d.num_train_timesteps, d.prediction_type, d.objective)


def prepare(config, config_path, device=None, fresh=False):
    """Everything a run needs, checked before a run is created: a bad input leaves nothing behind."""
    device = pick_device(device)
    parallel.init(device)
    if not parallel.is_main():
        parallel.barrier()  # wait for the main process to render the data and train the evaluator
    setup = _prepare(config, config_path, device, fresh)
    if parallel.is_main():
        parallel.barrier()
    return setup


def _prepare(config, config_path, device, fresh):
    if parallel.is_main():
        check_run(config, fresh)  # what --dry-run checks too
    root = data_root(config)
    seed_everything(config.seed)
    data = load_train(root, config.data.image_size, config.data.image_dir)
    # an evaluator still to train trains beside the generator's first minutes (EvaluatorInTraining)
    evaluator = ensure_evaluator(root, config.eval.evaluator, device, config.tracking_uri,
                                 beside=parallel.world_size() == 1)
    return Setup(
        config=config, device=device, model=make_model(config).to(device), noise_scheduler=make_noise_scheduler(config),
        evaluator=evaluator, strict_judge=strict_judge_for(root, evaluator, config.eval.evaluator, device),
        label_names=data.label_names,
        test_labels={name: load_condition_sets(root, name) for name in final_splits(root, config)},
        config_path=Path(config_path), root=root, data=data,
        val_labels=load_condition_sets(root, config.eval.split), out_dir=Path(config.output_dir) / config.run_name)


def sampling_setup(unet, config, device, splits=None):
    """Sampling and scoring `unet` (a checkpoint's model) with the data root and evaluator its config names."""
    root = data_root(config)
    evaluator = ensure_evaluator(root, config.eval.evaluator, device, config.tracking_uri)
    return SamplingSetup(config=config, device=device, model=unet, noise_scheduler=make_noise_scheduler(config),
                         evaluator=evaluator, strict_judge=strict_judge_for(root, evaluator, config.eval.evaluator,
                                                                            device),
                         label_names=load_objects(root),
                         test_labels={name: load_condition_sets(root, name)
                                      for name in splits or final_splits(root, config)}, root=root)


# --- how the model trains --------------------------------------------------------------------------------

def uses_bf16(config, device):
    """bf16 autocast when asked, or by default where it is fast (fast_bf16)."""
    mode = config.train.mixed_precision
    return mode == "bf16" or (mode == "auto" and fast_bf16(device))


def autocast(config, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(config, device))


def compiles(config, device):
    return config.train.compile == "on" or (config.train.compile == "auto" and device.type == "cuda")


def gpu_fast_path(config, device):
    """TF32 matmuls, channels_last weights and inputs, a fused optimiser: on GPU unless train.fast_path is off."""
    return config.train.fast_path and device.type == "cuda"


def make_optimizer(config, parameters, fused=None):
    tc = config.train
    opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(parameters, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused)


def make_ema(config, parameters, length=1.0):
    """The config's EMA, or one `length` times as long (1 / (1 - decay) is its averaging length in steps)."""
    ema = config.train.ema
    decay = 1 - (1 - ema.decay) / length
    # the warm-up caps the decay at 1 - (1 + step / inv_gamma)^(-2/3): a ramp as long as the EMA, else every
    # candidate would sit on the same cap for the whole of a short run (base.yaml's 0.9999 for ~1M steps)
    return EMAModel(parameters, decay=decay, use_ema_warmup=ema.warmup, inv_gamma=length ** -1.5) \
        if ema.enabled else None


def training_loss(config, forward, noise_scheduler, x0, labels, generator):
    """Per-sample diffusion loss and timesteps of one batch with the config's label dropout, self-conditioning and
    timestep density (lab.diffusion.diffusion_loss); the one place the trainer and the benchmark call it from."""
    return diffusion_loss(forward, noise_scheduler, x0, labels, generator, config.model.cfg_dropout,
                          config.model.self_conditioning, config.diffusion.loss_weighting)


def make_candidate_emas(config, parameters):
    """{length: EMAModel} for each of train.ema.candidates (none with EMA off)."""
    parameters = list(parameters)
    return {length: make_ema(config, parameters, length) for length in config.train.ema.candidates
            if config.train.ema.enabled}


def make_lr_schedule(config, optimizer, clock):
    """The learning rate over the run (lab.schedules.lr_factor, following `clock`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedules.lr_factor(config.train, clock, step))


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    ema: object             # diffusers EMAModel, or None
    candidate_emas: dict    # train.ema.candidates: {length: EMAModel}, chosen among after training
    wrapped: torch.nn.Module  # DistributedDataParallel over the model under data parallel, else the model
    forward: object         # what the loss calls: `wrapped`, compiled when the config says so
    clock: schedules.Clock


def optimisation(config, unet, device, total_steps):
    """Optimizer, LR schedule and its clock, EMA and the forward callable (DDP-wrapped, compiled) for `unet`."""
    fast = gpu_fast_path(config, device)
    if fast:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        unet.to(memory_format=torch.channels_last)
    tc = config.train
    # fused: one kernel for all parameters, on GPU and CPU (on 2 CPU cores the per-tensor loop cost 4% of a step)
    optimizer = make_optimizer(config, unet.parameters(), fused=fast or device.type == "cpu" or None)
    clock = schedules.Clock(total_steps, tc.max_minutes)
    wrapped = parallel.wrap(unet, device)
    # state_dicts stay on `unet`: no _orig_mod. prefix
    forward = torch.compile(wrapped) if compiles(config, device) else wrapped
    return Optimisation(optimizer, make_lr_schedule(config, optimizer, clock), make_ema(config, unet.parameters()),
                        make_candidate_emas(config, unet.parameters()), wrapped, forward, clock)
