"""How our evaluator is trained and checked: its recipe, its data, its held-out figures.

The course's evaluator was "trained on iclevr dataset with 1 to 5 objects and the resolution is the
upsampled 64x64 images from 32x32 images", so ours sees the same: the generator's training root (1-3
objects) plus synthetic scenes of 1-5 objects, each image drawn at 64, 48 or 32 pixels and upsampled to
64x64 the way samples reach the evaluator (`lab.eval.for_evaluator`). Half of each batch revisits the
images it got most wrong when it last saw them. On a synthetic root the renderer also says which object
covers each pixel, and a throwaway head on layer2 learns that map beside the labels (dense supervision).
It trains at the evaluator's own 64x64 input throughout: cheaper 32x32 or 48x48 phases were measured and
lost more accuracy than the time they saved (README, Evaluator).
"""
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from lab.checkpoints import write_atomic
from lab.data.iclevr import TrainingSet, load_train, multi_hot, normalize
from lab.data.labels import label_indices, read_json
from lab.data.synthetic import GROUND, KINDS, default_root, object_maps, write_kinds_root, write_root
from lab.eval import (COUNT_STEPS, EVALUATOR_SIZE, VERDICTS, binding_errors, build_count_head, build_resnet,
                      course_accuracy, expected_counts, for_evaluator, load_evaluator, per_label_report, resize,
                      save_evaluator, scene_verdicts)
from lab.errors import UserError
from lab.hardware import fast_bf16
from lab.stores import resolve_uri
from lab.tracking import Tracker

# Everything that decides what the evaluator learns. Its digest is part of the cache key, so an
# evaluator trained with another recipe is never reused silently.
RECIPE = {
    "extra_scenes": 2000,       # synthetic scenes of `extra_objects` objects, one image per prefix
    "extra_objects": 5,
    "extra_repeats": 0.8,       # of them, scenes that repeat labels: what the count head learns to count
    # Weight of the count head's loss (roots whose scenes repeat labels only): its cross-entropy against where the
    # objects' centres lie plus `count_sum_weight` times the error of the count
    "count_weight": 2.0,
    "count_sum_weight": 0.5,
    # [input size, images seen, peak learning rate] per phase: one phase at the evaluator's own 64x64 (a 32x32
    # phase runs faster but transfers badly); accuracy grows with the images seen (docs/evaluator.md).
    "phases": [[64, 125_000, 2e-3]],
    "draw_sizes": [64, 48, 32],   # resolutions an image is drawn at before it is upsampled to 64x64
    "batch_size": 64,
    # Of each batch, drawn again in proportion to their loss when last seen (the rest is a plain epoch order):
    # the misses are small far objects, which a uniform order rarely revisits.
    "hard_fraction": 0.5,
    "weight_decay": 5e-4,
    "warmup_fraction": [0.15, 0.05],  # of the first phase's steps, of each later phase's
    "recalibrate_images": 2048,
    # Weight of the dense loss on layer2 (synthetic roots only; 0: off). It mostly helped scenes of 4-5 objects.
    "dense_weight": 1.0,
    "seed": 0,
}
EXTRA_SEED = 1_000  # the extra scenes' seed, apart from the generator's roots (0, ...) and the checks'
HELDOUT_SEED = 10_001  # held-out scenes: a seed no training set uses
STRICT_SEED = 20_001  # the strict judge's held-out scenes: another unused seed
THRESHOLD_SEED = 30_001  # the scenes its count steps are chosen on: apart from the check's


def recipe_digest(recipe=None):
    return hashlib.blake2b(json.dumps(recipe or RECIPE, sort_keys=True).encode(), digest_size=4).hexdigest()


def teaches_counting(root, recipe=RECIPE):
    """Whether our evaluator for `root` gets the strict judge's count head: on synthetic roots, whose extra
    scenes repeat labels (a real root's scenes never do) and whose object maps say where each object is."""
    return (Path(root) / "synthetic.json").is_file() and bool(recipe["extra_scenes"] and recipe["extra_repeats"]
                                                              and recipe["count_weight"] and recipe["dense_weight"])


def extra_root(root, recipe):
    """The synthetic scenes of up to 5 objects added to a synthetic root (rendered once), else None (a real
    root is used alone: synthetic scenes would teach another look)."""
    if not (Path(root) / "synthetic.json").is_file() or not recipe["extra_scenes"]:
        return None
    return default_root(seed=EXTRA_SEED, scenes=recipe["extra_scenes"], objects=recipe["extra_objects"],
                        repeats=recipe["extra_repeats"])


def training_set(root, recipe):
    """The root's training images, plus the extra scenes of up to 5 objects when the root is synthetic, with
    their object maps when the recipe supervises layer2 densely (synthetic roots only: a real root has none)."""
    data, roots = load_train(root), [root]
    more = extra_root(root, recipe)
    if more is not None:
        extra = load_train(more)
        if extra.label_names != data.label_names:
            raise ValueError("the extra scenes' labels differ from the root's")
        data = TrainingSet(torch.cat([data.images, extra.images]), torch.cat([data.labels, extra.labels]),
                           data.names + extra.names, data.label_names, counts=torch.cat([data.counts, extra.counts]))
        roots.append(more)
    if recipe["dense_weight"] and (maps := [object_maps(r) for r in roots])[0] is not None:
        data.object_maps = torch.from_numpy(np.concatenate(maps))
    return data


def augment(x, generator, size=64, draw_sizes=(64,), shift=4, maps=None):
    """Label-preserving augmentation of a batch in [-1, 1]: horizontal flips (labels have no left or
    right), a shift of up to `shift` pixels, a little pixel noise (samples are noisier than renders);
    each image is drawn at one of `draw_sizes` and upsampled to 64 as samples are, then resized to the
    phase's input `size`. With `maps` (B, ..., 64, 64: object maps) returns them flipped and shifted alike too."""
    b, device = len(x), x.device
    flip = torch.rand(b, generator=generator, device=device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if maps is not None:
        maps = torch.where(flip.view(-1, *[1] * (maps.dim() - 1)), maps.flip(-1), maps)
    if shift:
        h, w = x.shape[-2:]
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=generator, device=device).tolist()
        x = F.pad(x, (shift,) * 4, mode="replicate")[..., dy:dy + h, dx:dx + w]
        if maps is not None:
            padded = F.pad(maps.flatten(0, -3)[:, None].float(), (shift,) * 4, mode="replicate")
            maps = padded[:, 0, dy:dy + h, dx:dx + w].to(maps.dtype).view(maps.shape)
    if size == EVALUATOR_SIZE:
        drawn = torch.randint(0, len(draw_sizes), (b,), generator=generator, device=device)
        for i, draw in enumerate(draw_sizes):
            rows = drawn == i
            if draw != x.shape[-1] and rows.any():
                x[rows] = for_evaluator(resize(x[rows], draw))
    x = resize(x, size)
    x = x + 0.04 * torch.randn(x.shape, generator=generator, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    return x if maps is None else (x, maps)


def coverage(maps, classes, cells):
    """(B, classes, cells, cells): the fraction of each cell of square label maps covered by each label (a
    count per image, label and cell: a one-hot of every pixel cost as much as the network's forward)."""
    b, size = len(maps), maps.shape[-1]
    cell = (torch.arange(size, device=maps.device) * cells // size)
    cell = (cell[:, None] * cells + cell[None, :]).expand(b, size, size)
    label = maps.long().clamp(max=classes)  # GROUND -> one bin past the labels, dropped below
    image = torch.arange(b, device=maps.device)[:, None, None]
    counts = torch.bincount(((image * (classes + 1) + label) * cells * cells + cell).flatten(),
                            minlength=b * (classes + 1) * cells * cells)
    pixels = (size // cells) ** 2
    return (counts.view(b, classes + 1, cells, cells)[:, :classes] / pixels).float()


def centres(maps, classes, cells, slots=8):
    """(B, classes, cells, cells): a unit of mass per object seen in object maps (B, 2, size, size), at the centre
    of its visible pixels, split bilinearly between the four nearest cell centres; summed over the cells, how many
    objects of each label an image shows."""
    b, size = len(maps), maps.shape[-1]
    labels, objects = maps[:, 0].long(), maps[:, 1].long()
    seen = objects != GROUND
    key = (torch.arange(b, device=maps.device)[:, None, None] * slots + objects)[seen]
    ys, xs = torch.meshgrid(torch.arange(size, device=maps.device), torch.arange(size, device=maps.device),
                            indexing="ij")
    pixels = torch.bincount(key, minlength=b * slots)
    present = pixels > 0
    where = [torch.bincount(key, weights=grid.expand(b, size, size)[seen].float(), minlength=b * slots)[present]
             / pixels[present] for grid in (ys, xs)]
    label = torch.zeros(b * slots, dtype=torch.long, device=maps.device).scatter_(0, key, labels[seen])[present]
    image = torch.arange(b * slots, device=maps.device)[present] // slots
    density = torch.zeros(b, classes, cells, cells, device=maps.device)
    # pixel centre -> cell coordinates (cell centres at integers), kept inside the grid
    y, x = [((w + 0.5) * cells / size - 0.5).clamp(0, cells - 1) for w in where]
    y0, x0 = y.floor().long(), x.floor().long()
    y1, x1 = (y0 + 1).clamp(max=cells - 1), (x0 + 1).clamp(max=cells - 1)
    wy, wx = y - y0, x - x0
    for rows, cols, weight in ((y0, x0, (1 - wy) * (1 - wx)), (y0, x1, (1 - wy) * wx), (y1, x0, wy * (1 - wx)),
                               (y1, x1, wy * wx)):
        density.index_put_((image, label, rows, cols), weight, accumulate=True)
    return density


def count_loss(centre_logits, target, sum_weight):
    """Per image: a count head's binary cross-entropy against the centres' mass in each cell (a cell holding two
    centres of one label counts as sure), summed over the cells and averaged over the labels, plus `sum_weight`
    times the smooth L1 error of the expected count."""
    where = F.binary_cross_entropy_with_logits(centre_logits, target.clamp(max=1), reduction="none").sum((2, 3))
    how_many = F.smooth_l1_loss(expected_counts(centre_logits), target.sum((2, 3)), reduction="none")
    return where.mean(1) + sum_weight * how_many.mean(1)


def batches(last_loss, steps, batch_size, hard_fraction):
    """`steps` index batches: batch_size * (1 - hard_fraction) from plain epoch orders of every image, the
    rest drawn without replacement in proportion to `last_loss`, which the caller updates in place between
    batches."""
    hard = int(hard_fraction * batch_size)
    plain = batch_size - hard
    order = torch.cat([torch.randperm(len(last_loss)) for _ in range(steps * plain // len(last_loss) + 1)])
    for idx in order[:steps * plain].split(plain):
        yield torch.cat([idx, torch.multinomial(last_loss, hard)]) if hard else idx


def _small_map_forward(conv):
    """On a map of at most 2x2 (layer4: 2x2 at 64x64 input, 1x1 at 32x32) every tap of a 3x3 convolution with
    padding 1 that reads the map is one block of a matmul: input positions x channels against output positions
    x channels, the padding's zeros skipped (4/9 of the multiply-adds at 2x2). Same outputs and gradients;
    oneDNN's bf16 convolution backward there ran at half its forward's rate. 1.14x the images/s of the whole
    step at batch 64 on 2 CPU cores (`python -m lab.eval bench`)."""
    full = conv.forward

    def forward(x):
        h, w = x.shape[-2:]
        if h > 2 or w > 2:
            return full(x)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        # taps[dy][dx]: (out, in) slices of the weight; unbind, not indexing, so that the backward is one stack
        taps = [row.unbind(-1) for row in conv.weight.to(dtype).unbind(-2)]
        cells = [(i, j) for i in range(h) for j in range(w)]
        block = torch.cat([torch.cat([taps[i - oi + 1][j - oj + 1] for i, j in cells], 1) for oi, oj in cells], 0)
        bias = None if conv.bias is None else conv.bias.to(dtype).repeat(h * w)
        y = F.linear(x.permute(0, 2, 3, 1).reshape(len(x), -1).to(dtype), block, bias)
        return y.view(len(x), h, w, -1).permute(0, 3, 1, 2)  # channels_last memory, as the input
    return forward


def training_modules(num_labels, device, small_maps=True):
    """The course's ResNet18 (channels_last) and the two halves the trainer runs: conv1 to layer2 (whose
    features the dense head reads) and layer3 to layer4's map (which the count head reads; pooled, fc's Linear
    turns it into logits, a stable BCE, the saved model keeping the course's Sigmoid). `small_maps`: layer4's 3x3
    convolutions run as `_small_map_forward` (an instance attribute: the saved weights are unchanged)."""
    model = build_resnet(num_labels).to(device).to(memory_format=torch.channels_last)
    children = list(model.children())[:-1]
    cut = children.index(model.layer2) + 1
    if small_maps:
        for conv in [m for m in model.layer4.modules() if isinstance(m, nn.Conv2d)]:
            if conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1):
                conv.forward = _small_map_forward(conv)
    return model, nn.Sequential(*children[:cut]), nn.Sequential(*children[cut:-1])


def step_benchmark(batch_sizes=(64, 96), steps=60, warmup=5, device="cpu"):
    """Training images/s of the evaluator's step (forward, BCE, backward, fused AdamW; bf16 where native) with
    layer4's convolutions as oneDNN runs them and as `_small_map_forward`, and the latter with the strict judge's
    count head and its loss (what RECIPE trains on synthetic roots), side by side, on random 64x64 input."""
    cases = {"oneDNN": (False, False), "small-map matmul": (True, False), "+ count head": (True, True)}
    rows = []
    for batch_size in batch_sizes:
        x = torch.randn(batch_size, 3, EVALUATOR_SIZE, EVALUATOR_SIZE, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        target = (torch.rand(batch_size, 24, device=device) < 0.1).float()
        cells = (batch_size, 24, 8, 8)  # layer2's grid at the 64x64 input, a few centres in it
        centre_target = torch.rand(cells, device=device) * (torch.rand(cells, device=device) < 0.01)
        speed = {}
        for case, (small_maps, counting) in cases.items():
            torch.manual_seed(0)
            model, lower, upper = training_modules(24, device, small_maps)
            count_head = build_count_head(24).to(device) if counting else None
            opt = torch.optim.AdamW([*model.parameters(), *(count_head.parameters() if counting else ())], fused=True)
            for i in range(warmup + steps):
                if i == warmup:
                    start = time.perf_counter()
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=fast_bf16(device)):
                    layer2 = lower(x)
                    layer3 = upper[0](layer2)
                    layer4 = upper[1](layer3)
                    logits = model.fc[0](layer4.mean((2, 3)))
                    centre_logits = count_head(layer2, layer3, layer4) if counting else None
                loss = F.binary_cross_entropy_with_logits(logits.float(), target)
                if counting:
                    loss = loss + RECIPE["count_weight"] * count_loss(centre_logits.float(), centre_target,
                                                                      RECIPE["count_sum_weight"]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            speed[case] = steps * batch_size / (time.perf_counter() - start)
        rows.append({"batch size": batch_size, **{f"{case} images/s": value for case, value in speed.items()},
                     "matmul / oneDNN": speed["small-map matmul"] / speed["oneDNN"],
                     "count head / without": speed["+ count head"] / speed["small-map matmul"]})
    return pd.DataFrame(rows)


def recalibrate_batchnorm(body, images, size, draw_sizes, generator, count, batch_size=128):
    """Re-estimate BatchNorm's running statistics at a new input size from `count` images, forward only
    (FixRes): a network trained at 32x32 input sees other statistics at 64x64."""
    norms = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    with torch.no_grad():
        for idx in torch.randperm(len(images))[:count].split(batch_size):
            body(augment(normalize(images[idx]).to(generator.device), generator, size=size, draw_sizes=draw_sizes,
                         shift=4 * size // EVALUATOR_SIZE))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def train_evaluator(root, out, recipe=None, device="cpu", log=print, tracker=None, data=None):
    """Train the ResNet18 evaluator by `recipe` (default RECIPE) and save it in the course format, with the strict
    judge's count head beside it when the training scenes repeat labels (synthetic roots: a real root's never
    do, and a count head that never saw two of a kind would not be a judge of them). Each phase has its own
    one-cycle learning rate; BatchNorm is recalibrated when the input size changes.
    `tracker` (a lab.tracking.Tracker) receives the loss, learning rate and images/s as they happen.
    `data`: `training_set(root, recipe)` when the caller already has it (so its rendering is not timed)."""
    recipe = {**RECIPE, **(recipe or {})}
    torch.manual_seed(recipe["seed"])
    data = data if data is not None else training_set(root, recipe)
    images, labels = data.images, data.labels
    model, lower, upper = training_modules(labels.shape[1], device)
    body = nn.Sequential(lower, upper)
    # Dense supervision: a 1x1 convolution on layer2 predicts how much of each cell every label covers, so that
    # small far objects teach the early layers directly. Trained alongside, never saved: the checkpoint stays
    # the course's. The count head learns from the same maps where each object's centre lies.
    maps = data.object_maps if recipe["dense_weight"] else None
    counting = maps is not None and recipe["count_weight"] and data.counts.max() > 1
    count_head = build_count_head(labels.shape[1]).to(device) if counting else None
    dense_head = None if maps is None else nn.Conv2d(model.layer2[-1].bn2.num_features, labels.shape[1], 1).to(device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=fast_bf16(device))
    batch_size, draw_sizes = recipe["batch_size"], recipe["draw_sizes"]
    # fused: one kernel for all parameters (4% more images/s on 2 CPU cores than the per-tensor loop)
    parameters = [*model.parameters(), *(dense_head.parameters() if dense_head is not None else ()),
                  *(count_head.parameters() if count_head is not None else ())]
    opt = torch.optim.AdamW(parameters, weight_decay=recipe["weight_decay"], fused=True)
    generator = torch.Generator(device).manual_seed(recipe["seed"])
    plan = [(size, math.ceil(count / batch_size), lr) for size, count, lr in recipe["phases"]]
    bar = tqdm(total=sum(steps for _, steps, _ in plan), desc="evaluator", unit="step", mininterval=2, disable=None)
    last_loss = torch.ones(len(images))  # each image's loss when last seen (recipe["hard_fraction"])
    step, start = 0, time.time()
    for phase, (size, steps, lr) in enumerate(plan):
        if phase and size != plan[phase - 1][0]:
            recalibrate_batchnorm(body, images, size, draw_sizes, generator, recipe["recalibrate_images"])
        for group in opt.param_groups:
            group["lr"] = lr
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                    pct_start=recipe["warmup_fraction"][min(phase, 1)])
        model.train()
        total, phase_start = 0.0, time.time()
        for i, idx in enumerate(batches(last_loss, steps, batch_size, recipe["hard_fraction"]), 1):
            x = normalize(images[idx]).to(device)
            how = dict(size=size, draw_sizes=draw_sizes, shift=4 * size // EVALUATOR_SIZE)
            if maps is None:
                x = augment(x, generator, **how)
            else:
                x, batch_maps = augment(x, generator, **how, maps=maps[idx].to(device))
            with autocast:
                features = lower(x)
                layer3 = upper[0](features)
                layer4 = upper[1](layer3)
                logits = model.fc[0](layer4.mean((2, 3)))
            per_image = F.binary_cross_entropy_with_logits(logits.float(), labels[idx].to(device), reduction="none").mean(1)
            if count_head is not None:
                with autocast:
                    centre_logits = count_head(features, layer3, layer4).float()
                target = centres(batch_maps, labels.shape[1], centre_logits.shape[-1])
                per_image = per_image + recipe["count_weight"] * count_loss(centre_logits, target,
                                                                            recipe["count_sum_weight"])
            loss = per_image.mean()
            if dense_head is not None:
                with autocast:
                    dense_logits = dense_head(features).float()
                target = coverage(batch_maps[:, 0], labels.shape[1], dense_logits.shape[-1])
                loss = loss + recipe["dense_weight"] * F.binary_cross_entropy_with_logits(dense_logits, target)
            last_loss[idx] = per_image.detach().cpu()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += loss.item()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if tracker is not None and (i % 20 == 0 or i == steps):
                tracker.log_metrics({"loss": loss.item(), "lr": sched.get_last_lr()[0], "input_size": size,
                                     "images_per_s": i * batch_size / (time.time() - phase_start)}, step)
        log(f"evaluator phase {phase + 1}/{len(plan)} at {size}x{size}: {steps * batch_size} images, "
            f"mean loss {total / steps:.4f} ({time.time() - start:.0f} s)")
    bar.close()
    for conv in model.modules():
        conv.__dict__.pop("forward", None)
    save_evaluator(model.cpu().to(memory_format=torch.contiguous_format), out,
                   None if count_head is None else count_head.cpu())
    return out


def upsample_pil(images):
    """uint8 (B, 3, s, s) -> (B, 3, 64, 64) through PIL's bilinear Resize, as a course user's script does."""
    return torch.from_numpy(np.stack([
        np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((EVALUATOR_SIZE,) * 2, Image.BILINEAR))
        for image in images]).transpose(0, 3, 1, 2).copy())


def _score(evaluator, images, labels, label_names):
    probs = evaluator.predict(images)
    return {"accuracy": course_accuracy(probs, labels), "images": len(images),
            "binding_errors": binding_errors(probs, labels, label_names),
            "per_label": per_label_report(probs, labels, label_names)}


def heldout_check(checkpoint, scenes=1000, seed=HELDOUT_SEED, device="cpu"):
    """Score an evaluator on freshly rendered scenes it never saw (`scenes` of 3 objects, a fifth as
    many of 5 objects): see `score_heldout`."""
    with tempfile.TemporaryDirectory() as tmp:
        roots = {objects: write_root(Path(tmp) / f"heldout{objects}", scenes=count, seed=seed + objects,
                                     objects=objects, progress=False)
                 for objects, count in ((3, scenes), (5, max(scenes // 5, 2)))}
        return score_heldout(load_evaluator(checkpoint, device), roots[3], roots[5], cache_dir=tmp)


def score_heldout(evaluator, root3, root5, cache_dir=None):
    """{case: {accuracy, images, binding_errors, per_label}} for 1-3 objects (root3) native at 64x64 and
    drawn at 32x32 then upsampled (as the trainer does, and through PIL), and for the images of 4-5
    objects of root5 at both resolutions."""
    results = {}
    for root, name in ((root3, "1-3 objects"), (root5, "4-5 objects")):
        native, small = load_train(root, cache_dir=cache_dir), load_train(root, image_size=32, cache_dir=cache_dir)
        keep = native.labels.sum(1) >= 4 if root is root5 else slice(None)
        labels, names = native.labels[keep], native.label_names
        results[f"{name}, 64x64"] = _score(evaluator, normalize(native.images[keep]), labels, names)
        results[f"{name}, 32->64"] = _score(evaluator, for_evaluator(normalize(small.images[keep])), labels, names)
        if root is root3:
            results[f"{name}, 32->64 PIL"] = _score(evaluator, normalize(upsample_pil(small.images[keep])), labels,
                                                    names)
    return results


# What each kind of held-out scene should be judged: exact, or which fault the judge should name.
EXPECTED = {"correct": {"exact": True, "extra": False, "missing": False},
            "duplicated": {"exact": False, "extra": True, "missing": False},
            "extra": {"exact": False, "extra": True, "missing": False},
            "missing": {"exact": False, "extra": False, "missing": True}}


def strict_check(checkpoint, per_kind=250, seed=STRICT_SEED, device="cpu"):
    """Score a strict judge on freshly rendered scenes of every kind (lab.data.synthetic.write_kinds_root): see
    `score_kinds`. None when the checkpoint has no count head."""
    evaluator = load_evaluator(checkpoint, device)
    if not evaluator.strict:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return score_kinds(evaluator, write_kinds_root(Path(tmp) / "kinds", per_kind, seed, progress=False), tmp)


def score_kinds(evaluator, root, cache_dir=None):
    """{"<kind>, <resolution>": {right, named, images}} for each kind of scene, native at 64x64 and drawn at 32x32
    then upsampled: `right`, the share whose exact-scene verdict is right (exact for correct scenes, not exact
    for the others); `named`, the share judged exactly as expected (duplicated and extra: extra objects only;
    missing: missing only; correct: exact)."""
    asked_table, kinds = read_json(Path(root) / "asked.json"), read_json(Path(root) / "kinds.json")
    results = {}
    for size, resolution in ((64, "64x64"), (32, "32->64")):
        data = load_train(root, image_size=size, cache_dir=cache_dir)
        asked = multi_hot(label_indices([asked_table[n] for n in data.names], data.label_names, root / "asked.json"),
                          len(data.label_names))
        verdicts = scene_verdicts(evaluator.counts(for_evaluator(normalize(data.images))), asked)
        for kind in KINDS:
            rows = torch.tensor([kinds[n] == kind for n in data.names])
            right = verdicts["exact"][rows] == EXPECTED[kind]["exact"]
            named = torch.stack([verdicts[v][rows] == EXPECTED[kind][v] for v in VERDICTS]).all(0)
            results[f"{kind}, {resolution}"] = {"right": float(right.float().mean()),
                                                "named": float(named.float().mean()), "images": int(rows.sum())}
    return results


def threshold_scan(checkpoint, two_at, per_kind=1000, seed=THRESHOLD_SEED, device="cpu"):
    """How COUNT_STEPS is chosen: the strict judge's exact-scene verdict right per kind and resolution (`score_kinds`)
    with its expected count stepping from 1 to 2 at each of `two_at`, on scenes of every kind rendered from `seed`
    (by default one apart from the check's). A DataFrame, a row per step."""
    evaluator = load_evaluator(checkpoint, device)
    if not evaluator.strict:
        raise UserError(checkpoint, "has no count head (not a strict judge)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_kinds_root(Path(tmp) / "kinds", per_kind, seed, progress=False)
        for two in two_at:
            evaluator.count_steps = (COUNT_STEPS[0], two, *COUNT_STEPS[2:])
            right = {case: r["right"] for case, r in score_kinds(evaluator, root, tmp).items()}
            rows.append({"1 to 2 at": two, **right})
    return pd.DataFrame(rows)


def metric_key(case, prefix="heldout"):
    """'1-3 objects, 32->64 PIL' -> 'heldout/1-3 objects 32 to 64 PIL' (characters MLflow accepts)"""
    return f"{prefix}/" + case.replace(",", "").replace("->", " to ")


def summary_lines(results, strict=None):
    """One line per case: accuracy, image count and the binding errors of the misses; then one per kind of scene
    for the strict judge."""
    lines = [f"held-out accuracy {case}: {r['accuracy']:.4f} on {r['images']} fresh images "
             f"(misses: {r['binding_errors']['wrong_colour']} wrong colour, {r['binding_errors']['wrong_shape']} "
             f"wrong shape, {r['binding_errors']['both_wrong']} both)" for case, r in results.items()]
    if strict is None:
        return lines + ["strict judge: none (this evaluator has no count head)"]
    return lines + [f"strict judge, {case}: exact-scene verdict right on {r['right']:.4f}, the fault named on "
                    f"{r['named']:.4f} of {r['images']} fresh images" for case, r in strict.items()]


def train_and_check(root, out, device, tracking_uri=None, recipe=None, scenes=300, threads=None):
    """Train our evaluator into `out` and score it on `scenes` fresh held-out scenes (and its strict judge on as
    many of each kind), as one MLflow run; the figures also go to `out` with a .json suffix. Returns (the
    held-out results, the strict judge's or None)."""
    recipe = {**RECIPE, **(recipe or {})}
    data = training_set(root, recipe)  # rendered and decoded once, before the clock starts
    tracker = Tracker(resolve_uri(tracking_uri))
    with tracker.lifetime():
        tracker.start_evaluator(recipe, {"data_root": str(root), "checkpoint": str(out),
                                         "recipe_digest": recipe_digest(recipe)})
        start = time.time()
        train_evaluator(root, out, recipe=recipe, device=device, tracker=tracker, data=data)
        seconds = time.time() - start
        beside = f" on {threads} thread{'s' * (threads > 1)}, beside the generator's training" if threads else ""
        print(f"evaluator trained in {seconds:.0f} s{beside} -> {out}", flush=True)
        results = heldout_check(out, scenes=scenes, device=device)
        strict = strict_check(out, per_kind=scenes, device=device)
        report = {case: {"accuracy": r["accuracy"], "images": r["images"], "binding_errors": r["binding_errors"]}
                  for case, r in results.items()}
        record = {"train_seconds": round(seconds), "threads": torch.get_num_threads(), **report,
                  "strict": strict}
        write_atomic(json.dumps(record, indent=1).encode(), Path(out).with_suffix(".json"))
        tracker.log_metrics({"train_seconds": seconds, **{metric_key(case): r["accuracy"] for case, r in results.items()},
                             **{metric_key(case, "strict"): r["right"] for case, r in (strict or {}).items()}}, step=0)
        tracker.log_artifact(Path(out).with_suffix(".json"))
        return results, strict
