"""The judges of generated images: the i-CLEVR evaluator, compatible with the course's (a ResNet18 multi-label
classifier and the course's top-k rule), and the strict judge (a count head on the same network that says how
many objects of each label an image holds, so that a scene is judged exact only when it holds the asked
objects, each once, and nothing else).

The course's checkpoint is `{'model': resnet18.state_dict()}` with `fc = Sequential(Linear(512, 24),
Sigmoid())`, fed (B, 3, 64, 64) images in [-1, 1]; a user's real `checkpoint.pth` drops in by path. Ours keeps
that format and puts the count head beside it under `counts`, which the course's loader never reads. We train
ours once per data root and cache it (lab/evaluator_training.py trains it, lab/evaluator_cache.py keeps it;
`python -m lab.eval` is their command line, lab/evaluator_cli.py).

    judged = judge_samples(images, labels, evaluator, strict_judge)   # a Judgement
    judged.metrics("val_")    # val_accuracy (the course's rule), val_exact_accuracy, val_extra_objects, ...
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lab.checkpoints import atomic_save, safe_load
from lab.errors import UserError

EVALUATOR_SIZE = 64  # the evaluator reads 64x64 images whatever size the model draws
# Where the strict judge's expected count of a label steps from 0 to 1, 1 to 2 and 2 to 3 (3 meaning 3 or more).
# The 1-to-2 step at 1.35 rather than 1.5 was chosen on a validation render of every kind, apart from the check's
# (`python -m lab.eval thresholds`): a second object of one kind is often seen as less than a whole one.
COUNT_STEPS = (0.5, 1.35, 2.5)


def build_resnet(num_labels=24):
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Sequential(nn.Linear(512, num_labels), nn.Sigmoid())
    return model


class CountHead(nn.Module):
    """The strict judge: per label and cell of layer2's 8x8 grid (at the 64x64 input), the logit of an object's
    centre lying there, read from layer2 with layer3 and layer4 brought up to its size; an image's count of a label
    is the sum of the cells' probabilities. Taught where each object's centre is, it counts two of a kind as two
    wherever they stand; heads that classified the count from layer4's pooled vector, its 2x2 map or layer3's 4x4
    map lost a second object of one kind in 14-30% of held-out scenes (docs/evaluator.md)."""

    def __init__(self, num_labels=24, hidden=128):
        super().__init__()
        self.reduce = nn.Conv2d(128 + 256 + 512, hidden, 1)
        self.mix = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, num_labels, 1)
        nn.init.constant_(self.out.bias, -6.0)  # starts near empty: an object's centre is in few cells

    def forward(self, layer2_map, layer3_map, layer4_map):
        """(B, 128, h, w), (B, 256, h/2, w/2), (B, 512, h/4, w/4) -> (B, num_labels, h, w) logits of centres."""
        size = layer2_map.shape[-2:]
        x = torch.cat([layer2_map, F.interpolate(layer3_map, size=size), F.interpolate(layer4_map, size=size)], 1)
        return self.out(F.relu(self.mix(F.relu(self.reduce(x)))))


def expected_counts(centre_logits):
    """A count head's logits (B, num_labels, h, w) -> how many objects of each label (B, num_labels), unrounded."""
    return torch.sigmoid(centre_logits.float()).sum((2, 3))


def counted(centre_logits, steps=COUNT_STEPS):
    """A count head's logits -> objects of each label (B, num_labels): how many of `steps` the expected count
    reaches, 3 meaning 3 or more."""
    expected = expected_counts(centre_logits)
    return sum((expected >= step).long() for step in steps)


def build_count_head(num_labels=24):
    return CountHead(num_labels)


def course_hits(probs, labels):
    """Per image, how many of its true labels are among its top-k predictions (k = its number of true labels)."""
    return torch.tensor([int(y[p.topk(int(y.sum().item())).indices].sum().item()) for p, y in zip(probs, labels)])


def course_accuracy(probs, labels):
    """The course's rule: per image take the top-k predictions (k = number of true labels) and count
    those that are true; divide the total by the number of true labels."""
    return int(course_hits(probs, labels).sum()) / max(int(labels.sum().item()), 1)


VERDICTS = ("exact", "extra", "missing")


def scene_verdicts(counts, labels):
    """Per image, from the strict judge's counts (B, num_labels) and the asked multi-hot labels: `extra` when it
    holds an object nobody asked for (a second of an asked one counts), `missing` when an asked object is absent,
    `exact` when neither: every asked object once and nothing else. Bool tensors (B,)."""
    asked = labels.round().long().to(counts.device)
    extra, missing = (counts > asked).any(1), (counts < asked).any(1)
    return {"exact": ~extra & ~missing, "extra": extra, "missing": missing}


def predicted_sets(probs, labels):
    """Multi-hot top-k predictions, k = the number of true labels of each image."""
    pred = torch.zeros_like(labels)
    for row, (p, y) in enumerate(zip(probs, labels)):
        pred[row, p.topk(int(y.sum().item())).indices] = 1
    return pred


def per_label_report(probs, labels, label_names):
    """Precision and recall of every label, counting the top-k predictions as predicted."""
    pred, labels = predicted_sets(probs, labels).bool(), labels.bool()
    tp = (pred & labels).sum(0).float()
    return pd.DataFrame({
        "label": label_names,
        "support": labels.sum(0).tolist(),
        "precision": (tp / pred.sum(0).clamp(min=1)).tolist(),
        "recall": (tp / labels.sum(0).clamp(min=1)).tolist(),
    })


BINDING_ERRORS = ("wrong_colour", "wrong_shape", "both_wrong")


def binding_errors(probs, labels, label_names):
    """Classify every wrong pick against the labels the image missed: right shape but wrong colour,
    right colour but wrong shape, or both wrong (BINDING_ERRORS), and their sum, misses. Names are 'colour shape'."""
    pred = predicted_sets(probs, labels).bool()
    counts = dict.fromkeys(BINDING_ERRORS, 0)
    split = [name.split(" ", 1) for name in label_names]
    for p, y in zip(pred, labels.bool()):
        missed = [split[i] for i in torch.nonzero(y & ~p).flatten().tolist()]
        for i in torch.nonzero(p & ~y).flatten().tolist():
            colour, shape = split[i]
            if any(s == shape for _, s in missed):
                counts["wrong_colour"] += 1
            elif any(c == colour for c, _ in missed):
                counts["wrong_shape"] += 1
            else:
                counts["both_wrong"] += 1
    counts["misses"] = sum(counts.values())
    return counts


class Evaluator:
    """A loaded evaluator on a device: label probabilities, penultimate features and, when it has a count head
    (`strict`), how many objects of each label an image holds."""

    def __init__(self, model, device="cpu", batch_size=256, count_head=None):
        self.model = model.to(device).eval()
        self.count_head = None if count_head is None else count_head.to(device).eval()
        self.device, self.batch_size = device, batch_size
        self.count_steps = COUNT_STEPS
        self.body = nn.Sequential(*list(self.model.children())[:-4])  # up to layer2's map

    @property
    def strict(self):
        return self.count_head is not None

    @torch.no_grad()
    def assess(self, images):
        """images (B, 3, 64, 64) in [-1, 1] -> (probabilities (B, num_labels), features (B, 512), counts (B,
        num_labels) or None without a count head), in one pass."""
        probs, features, counts = [], [], []
        for chunk in images.split(self.batch_size):
            layer2 = self.body(chunk.to(self.device, torch.float32))
            layer3 = self.model.layer3(layer2)
            layer4 = self.model.layer4(layer3)
            pooled = self.model.avgpool(layer4).flatten(1)
            features.append(pooled.cpu())
            probs.append(self.model.fc(pooled).cpu())
            if self.count_head is not None:
                counts.append(counted(self.count_head(layer2, layer3, layer4), self.count_steps).cpu())
        return torch.cat(probs), torch.cat(features), torch.cat(counts) if counts else None

    def predict(self, images):
        """images (B, 3, 64, 64) in [-1, 1] -> label probabilities (B, num_labels)."""
        return self.assess(images)[0]

    def features(self, images):
        return self.assess(images)[1]

    def counts(self, images):
        """How many objects of each label (B, num_labels), 3 meaning 3 or more; needs a count head."""
        if self.count_head is None:
            raise ValueError("this evaluator has no count head (not a strict judge)")
        return self.assess(images)[2]

    def accuracy(self, images, labels):
        return course_accuracy(self.predict(images), labels.cpu())


@dataclass
class Judgement:
    """What the judges say of generated images for the label sets they were asked for."""
    probs: torch.Tensor      # the course-rule evaluator's probabilities
    accuracy: float          # the course's rule, non-finite images counted as misses
    verdicts: dict | None    # the strict judge's per image (scene_verdicts), None without one
    finite: torch.Tensor     # (B,) bool: images without a non-finite pixel
    features: torch.Tensor   # the course-rule evaluator's features of the finite images

    def metrics(self, prefix=""):
        """`<prefix>accuracy`, and with a strict judge `<prefix>exact_accuracy` (share of images holding exactly
        the asked objects), `<prefix>extra_objects` (share with any object not asked, duplicates counted) and
        `<prefix>missing_objects` (share with an asked object absent)."""
        out = {f"{prefix}accuracy": self.accuracy}
        if self.verdicts is not None:
            out.update({f"{prefix}exact_accuracy": float(self.verdicts["exact"].float().mean()),
                        f"{prefix}extra_objects": float(self.verdicts["extra"].float().mean()),
                        f"{prefix}missing_objects": float(self.verdicts["missing"].float().mean())})
        return out


def judge_samples(images, labels, evaluator, strict_judge=None):
    """Judge samples in [-1, 1] at any size, asked for multi-hot `labels`: the course's rule from `evaluator`, the
    verdicts from `strict_judge` (None: no strict figures). An image with a non-finite pixel is a miss on every
    rule: no label found, every asked object missing."""
    labels = labels.cpu()
    finite = images.flatten(1).isfinite().all(1).cpu()
    x = for_evaluator(images.nan_to_num(0.0))
    probs, features, counts = evaluator.assess(x)
    if strict_judge is not None and strict_judge is not evaluator:
        counts = strict_judge.counts(x)
    hits = course_hits(probs, labels) * finite
    verdicts = None
    if strict_judge is not None:
        verdicts = scene_verdicts(counts, labels)
        verdicts = {"exact": verdicts["exact"] & finite, "extra": verdicts["extra"] & finite,
                    "missing": verdicts["missing"] | ~finite}
    return Judgement(probs=probs, accuracy=int(hits.sum()) / max(int(labels.sum()), 1), verdicts=verdicts,
                     finite=finite, features=features[finite])


def over_seeds(judgements, prefix=""):
    """The metrics of several sampling seeds' Judgements of one label-set file: each metric's mean over the seeds
    and its spread (`_std`)."""
    per_seed = [judged.metrics(prefix) for judged in judgements]
    out = {}
    for key in per_seed[0]:
        values = [metrics[key] for metrics in per_seed]
        out[key], out[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    return out


def nonfinite(judgements):
    """How many of the judged images had a non-finite pixel (counted as misses)."""
    return sum(int((~judged.finite).sum()) for judged in judgements)


def load_evaluator(path, device="cpu", num_labels=24):
    """A course-format checkpoint (`{'model': state_dict}`, and ours with `counts` beside it) -> Evaluator; bad
    files give one clear line."""
    path = Path(path).expanduser()
    state = safe_load(path, "evaluator checkpoint")
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(path, "expected the course format {'model': resnet18 state_dict}")
    model, count_head = build_resnet(num_labels), None
    _load_weights(model, state["model"], path, f"resnet18 with a {num_labels}-label head")
    if state.get("counts") is not None:
        count_head = build_count_head(num_labels)
        _load_weights(count_head, state["counts"], path, "the strict judge's count head")
    return Evaluator(model, device, count_head=count_head)


def _load_weights(module, weights, path, what):
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        lines = str(e).splitlines()
        raise UserError(path, f"weights do not fit {what}: {lines[1].strip() if len(lines) > 1 else e}") from None


def save_evaluator(model, path, count_head=None):
    """The course format, {'model': state_dict}, written atomically; the strict judge's count head, when there is
    one, beside it under `counts` (the course's loader reads `model` only)."""
    atomic_save({"model": model.state_dict(),
                 **({"counts": count_head.state_dict()} if count_head is not None else {})}, path)


def resize(images, size):
    """Bilinear with antialiasing (as PIL's resize): what a root decoded at `size` looks like."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def for_evaluator(images):
    """Samples in [-1, 1] at any size -> the evaluator's 64x64 input."""
    return resize(images, EVALUATOR_SIZE).clamp(-1, 1)


if __name__ == "__main__":  # `python -m lab.eval`: the command line lives in lab/evaluator_cli.py
    from lab.evaluator_cli import main
    sys.exit(main())
