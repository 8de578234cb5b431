"""A validated config becomes built objects here, and only here: the data root, the model, the noise
scheduler, the evaluator, the optimiser, EMA, autocast and compile decisions. The trainer, the sweeps,
the report and the benchmark receive what this module builds; none of them decodes the config again.

    setup = prepare(config, "experiments/base.yaml")     # a training Setup (data, model, evaluator, ...)
    opt = optimisation(config, setup.model, setup.device, total_steps)
    scoring = sampling_setup(model, config, device)      # what sampling a checkpoint needs, no training data
"""
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from lab import parallel
from lab.config import check_inputs, check_split_files
from lab.data import load_condition_sets, load_objects, load_train, resolve_root
from lab.diffusion import make_noise_scheduler
from lab.errors import UserError
from lab.eval import ensure_evaluator
from lab.model_zoo import build_model


@dataclass
class SamplingSetup:
    """What sampling and scoring need: built for a training run, or for a checkpoint scored later."""
    config: object          # ExperimentConfig: eval.* (sampler, steps, guidance), data.image_size, autocast
    device: torch.device
    model: torch.nn.Module
    noise_scheduler: object  # the training DDPMScheduler: the samplers take its betas
    evaluator: object       # lab.eval.Evaluator
    label_names: list       # label index -> name (objects.json), for the captions of sample grids
    test_labels: dict       # split name -> multi-hot label sets, scored at the end


@dataclass
class Setup(SamplingSetup):
    """A training run: the sampling setup plus its data, validation labels and run folder."""
    config_path: Path
    root: Path              # the data root, the synthetic one rendered
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


def model(config):
    m = config.model
    return build_model(m.unet, m.conditioning, image_size=config.data.image_size, patch_size=m.patch_size,
                       width=m.width, attention_resolutions=m.attention_resolutions, cfg_null=m.cfg_null,
                       **m.overrides)


def unet_problem(config):
    """Why diffusers refuses to build the config's UNet, or None: built on the meta device (no memory, no time)."""
    try:
        with torch.device("meta"):
            model(config)
    except UserError as e:
        return e.message
    return None


def noise_scheduler(config):
    d = config.diffusion
    return make_noise_scheduler(d.beta_schedule, d.num_train_timesteps, d.prediction_type)


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


def _prepare(config, config_path, device):
    if parallel.is_main():
        check_inputs(config)
    root = data_root(config)
    check_split_files(root, config)
    seed_everything(config.seed)
    unet = model(config).to(device)
    data = load_train(root, config.data.image_size, config.data.image_dir)
    if data.labels.shape[1] != unet.build_kwargs["num_labels"]:
        raise UserError(root, f"{data.labels.shape[1]} labels in objects.json; the models expect 24")
    return Setup(
        config=config, device=device, model=unet, noise_scheduler=noise_scheduler(config),
        # an evaluator still to train trains beside the generator's first minutes (lab.eval.EvaluatorInTraining)
        evaluator=ensure_evaluator(root, config.eval.evaluator, device, config.tracking_uri,
                                   beside=parallel.world_size() == 1), label_names=data.label_names,
        test_labels={name: load_condition_sets(root, name) for name in final_splits(root, config)},
        config_path=Path(config_path), root=root, data=data,
        val_labels=load_condition_sets(root, config.eval.split), out_dir=Path(config.output_dir) / config.run_name)


def sampling_setup(unet, config, device, splits=None):
    """Sampling and scoring `unet` (a checkpoint's model) with the data root and evaluator its config names."""
    root = data_root(config)
    return SamplingSetup(config=config, device=device, model=unet, noise_scheduler=noise_scheduler(config),
                         evaluator=ensure_evaluator(root, config.eval.evaluator, device, config.tracking_uri),
                         label_names=load_objects(root),
                         test_labels={name: load_condition_sets(root, name)
                                      for name in splits or final_splits(root, config)})


# --- how the model trains --------------------------------------------------------------------------------

def fast_bf16(device):
    """Whether bf16 autocast speeds this device up: GPUs, and CPUs with native bf16 (AVX-512 BF16 or AMX).
    Elsewhere bf16 is emulated: on a 2-core AVX2 EPYC it made ResNet18 training 5x slower than float32."""
    if torch.device(device).type == "cuda":
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


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


def make_ema(config, parameters):
    ema = config.train.ema
    return EMAModel(parameters, decay=ema.decay, use_ema_warmup=ema.warmup) if ema.enabled else None


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

    def tick(self, step, device):
        """After optimizer step `step`; under data parallel the main process's time holds for all, so every
        process applies the same learning rate and stops at the same step."""
        self.step = step
        self.spent_s = time.perf_counter() - self._origin
        if self.budget_s and parallel.world_size() > 1:
            # a device tensor read back is a host sync: only where other processes must agree
            self.spent_s = float(parallel.broadcast(torch.tensor(self.spent_s, device=device)))

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


def lr_schedule(config, optimizer, clock):
    """A linear warm-up over train.warmup_steps, then constant or a cosine to zero over the clock's fraction
    (diffusers' get_scheduler counts steps only; a CPU run under a time budget does not know its step count)."""
    tc = config.train

    def factor(step):
        warm = min(1.0, step / tc.warmup_steps) if tc.warmup_steps else 1.0
        return warm if tc.lr_schedule == "constant" else warm * 0.5 * (1 + math.cos(math.pi * clock.fraction))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    ema: object             # diffusers EMAModel, or None
    wrapped: torch.nn.Module  # DistributedDataParallel over the model under data parallel, else the model
    forward: object         # what the loss calls: `wrapped`, compiled when the config says so
    clock: Clock


def optimisation(config, unet, device, total_steps):
    """Optimizer, LR schedule and its clock, EMA and the forward callable (DDP-wrapped, compiled) for `unet`."""
    fast = gpu_fast_path(config, device)
    if fast:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        unet.to(memory_format=torch.channels_last)
    tc = config.train
    # fused: one kernel for all parameters, on GPU and CPU (on 2 CPU cores the per-tensor loop cost 4% of a step)
    optimizer = make_optimizer(config, unet.parameters(), fused=fast or device.type == "cpu" or None)
    clock = Clock(total_steps, tc.max_minutes)
    wrapped = parallel.wrap(unet, device)
    # state_dicts stay on `unet`: no _orig_mod. prefix
    forward = torch.compile(wrapped) if compiles(config, device) else wrapped
    return Optimisation(optimizer, lr_schedule(config, optimizer, clock), make_ema(config, unet.parameters()),
                        wrapped, forward, clock)
