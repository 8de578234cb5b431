"""A trained model as a diffusers pipeline: what others load in one call and draw from by label names.

    from lab import load_pipeline
    pipe = load_pipeline("runs/quickstart/best.pt")               # or a folder written by save_pretrained
    images = pipe(["red sphere", "cyan cube"], num_images=4, seed=0)   # PIL images
    pipe.save_pretrained("my-iclevr-model")                      # model/ (config + safetensors), scheduler/, ...

The folder is diffusers' own layout: `model_index.json` (the pipeline's class, its components and its sampling
settings), `model/` (lab.conditioning.ConditionalUNet through diffusers' save_pretrained: the UNet with its label
front-end), `scheduler/` (the training noise schedule, whose betas every sampler takes) and `experiment.yaml`
(the resolved config of the run that trained it: its data root and evaluator, for scoring). Sampling goes through
lab.sampling.sample, the one entry point the trainer uses too, so a pipeline draws exactly what the run drew.
"""
import difflib
from pathlib import Path

import torch
import yaml
from diffusers import DiffusionPipeline, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from lab.build import make_noise_scheduler
from lab.checkpoints import load_checkpoint
from lab.conditioning import ConditionalUNet
from lab.config import ExperimentConfig, to_yaml
from lab.data.iclevr import to_uint8
from lab.data.labels import load_objects
from lab.data.roots import is_synthetic
from lab.data.synthetic import LABELS
from lab.errors import UserError
from lab.sampling import model_from_checkpoint, sample

EXPERIMENT_FILE = "experiment.yaml"


class ConditionalDDPMPipeline(DiffusionPipeline):
    """Draws i-CLEVR scenes for a set of labels with a trained ConditionalUNet and the run's sampler settings."""

    def __init__(self, model: ConditionalUNet, scheduler: SchedulerMixin, label_names: list = None,
                 sampler: str = "dpmsolver++", steps: int = 20, guidance_scale: float = 1.0, image_size: int = 64,
                 guidance_interval: tuple = (0.0, 1.0)):
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler)
        self.register_to_config(label_names=list(label_names or LABELS), sampler=sampler, steps=steps,
                                guidance_scale=guidance_scale, guidance_interval=list(guidance_interval),
                                image_size=image_size)
        self.experiment_yaml = None  # the training run's config, when known

    def multi_hot(self, labels):
        """A label set (names, or one string "red sphere, cyan cube") -> a (1, num_labels) multi-hot row; an
        unknown or repeated name fails in one line naming it (and the closest valid ones)."""
        return multi_hot_of(labels, self.config.label_names)

    @torch.no_grad()
    def __call__(self, labels, num_images=1, seed=0, sampler=None, steps=None, guidance_scale=None,
                 output_type="pil", callback=None):
        """`num_images` images of one label set. output_type "pil" (a list of PIL images) or "pt" (a tensor in
        [-1, 1]). Same seed, same images, on any device."""
        row = self.multi_hot(labels).to(self.device)
        size = self.config.image_size
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = randn_tensor((num_images, 3, size, size), generator=generator)
        images = sample(self.model, row.expand(num_images, -1), train_scheduler=self.scheduler,
                        sampler=sampler or self.config.sampler, steps=steps or self.config.steps,
                        guidance_scale=self.config.guidance_scale if guidance_scale is None else guidance_scale,
                        guidance_interval=tuple(self.config.get("guidance_interval", (0.0, 1.0))),
                        generator=generator, image_size=size, noise=noise, callback=callback)
        if output_type == "pt":
            return images.cpu()
        return [self.numpy_to_pil(image.permute(1, 2, 0).numpy())[0] for image in to_uint8(images.cpu())]

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' folder, plus the training run's config beside it."""
        super().save_pretrained(save_directory, **kwargs)
        if self.experiment_yaml is not None:
            (Path(save_directory) / EXPERIMENT_FILE).write_text(self.experiment_yaml)


def multi_hot_of(labels, names):
    """A label set as names (or "a, b") -> (1, len(names)) multi-hot; unknown or repeated names fail in one line."""
    if isinstance(labels, str):
        labels = [part.strip() for part in labels.split(",") if part.strip()]
    row = torch.zeros(1, len(names))
    for label in labels:
        if label not in names:
            close = difflib.get_close_matches(label, names, n=3, cutoff=0.5)
            hint = f" (closest: {', '.join(close)})" if close else f" (labels: {', '.join(names)})"
            raise UserError("labels", f"unknown label {label!r}{hint}")
        if row[0, names.index(label)]:
            raise UserError("labels", f"{label!r} is named twice; a label set names each label once")
        row[0, names.index(label)] = 1
    if not labels:
        raise UserError("labels", "an empty label set; name one to three labels, e.g. \"red sphere, cyan cube\"")
    return row


def label_names_of(config):
    """The label names of a config's data root: its objects.json, or the synthetic set's (the course's order)."""
    root = config.data.root
    return LABELS if is_synthetic(root) or not Path(root).expanduser().is_dir() else load_objects(Path(root).expanduser())


def pipeline_from_model(model, config):
    """A pipeline around a trained model, with the sampling settings and label names of its run's config."""
    pipe = ConditionalDDPMPipeline(model, make_noise_scheduler(config), label_names_of(config),
                                   config.eval.sampler, config.eval.steps, config.eval.guidance_scale,
                                   config.data.image_size, config.eval.guidance_interval)
    pipe.experiment_yaml = to_yaml(config)
    return pipe


def load_pipeline(path, device=None):
    """A pipeline from a best.pt (or latest.pt) of a run, or from a folder `save_pretrained` wrote."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(path, "not a pipeline folder (no model_index.json) and not a checkpoint file")
        pipe = ConditionalDDPMPipeline.from_pretrained(path)
        if (path / EXPERIMENT_FILE).is_file():
            pipe.experiment_yaml = (path / EXPERIMENT_FILE).read_text()
    else:
        model, config = model_from_checkpoint(load_checkpoint(path), path)
        pipe = pipeline_from_model(model, config)
    return pipe.to(device) if device else pipe
