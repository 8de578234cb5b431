"""The i-CLEVR evaluator, compatible with the course's: ResNet18 multi-label classifier and its accuracy.

The course's checkpoint is `{'model': resnet18.state_dict()}` with `fc = Sequential(Linear(512, 24),
Sigmoid())`, fed (B, 3, 64, 64) images in [-1, 1]; a user's real `checkpoint.pth` drops in by path.
For the synthetic default we train our own in the same format, once, and cache it (the recipe is in
`lab/evaluator_training.py`).
"""
import argparse
import atexit
import hashlib
import json
import multiprocessing
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lab.checkpoints import atomic_save, safe_load, write_atomic
from lab.data.iclevr import default_cache_dir
from lab.errors import UserError, reports_user_errors

EVALUATOR_SIZE = 64  # the evaluator reads 64x64 images whatever size the model draws


def build_resnet(num_labels=24):
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Sequential(nn.Linear(512, num_labels), nn.Sigmoid())
    return model


def course_accuracy(probs, labels):
    """The course's rule: per image take the top-k predictions (k = number of true labels) and count
    those that are true; divide the total by the number of true labels."""
    hits = total = 0
    for p, y in zip(probs, labels):
        k = int(y.sum().item())
        total += k
        hits += int(y[p.topk(k).indices].sum().item())
    return hits / max(total, 1)


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
    """A loaded evaluator on a device: probabilities, penultimate features and the course accuracy."""

    def __init__(self, model, device="cpu", batch_size=256):
        self.model = model.to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def _run(self, images, features):
        out = []
        for chunk in images.split(self.batch_size):
            x = chunk.to(self.device, torch.float32)
            if features:
                body = nn.Sequential(*list(self.model.children())[:-1])  # up to the pooled 512-d vector
                out.append(body(x).flatten(1).cpu())
            else:
                out.append(self.model(x).cpu())
        return torch.cat(out)

    def predict(self, images):
        """images (B, 3, 64, 64) in [-1, 1] -> label probabilities (B, num_labels)."""
        return self._run(images, features=False)

    def features(self, images):
        return self._run(images, features=True)

    def accuracy(self, images, labels):
        return course_accuracy(self.predict(images), labels.cpu())


def load_evaluator(path, device="cpu", num_labels=24):
    """A course-format checkpoint (`{'model': state_dict}`) -> Evaluator; bad files give one clear line."""
    path = Path(path).expanduser()
    state = safe_load(path, "evaluator checkpoint")
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(path, "expected the course format {'model': resnet18 state_dict}")
    model = build_resnet(num_labels)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(path, f"weights do not fit resnet18 with a {num_labels}-label head: "
                              f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    return Evaluator(model, device)


def save_evaluator(model, path):
    """The course format, {'model': state_dict}, written atomically."""
    atomic_save({"model": model.state_dict()}, path)


def resize(images, size):
    """Bilinear with antialiasing (as PIL's resize): what a root decoded at `size` looks like."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def for_evaluator(images):
    """Samples in [-1, 1] at any size -> the evaluator's 64x64 input."""
    return resize(images, EVALUATOR_SIZE).clamp(-1, 1)


def default_evaluator_path(root):
    """Where the evaluator trained on `root` is cached: keyed by the root's label files and the recipe."""
    from lab.evaluator_training import recipe_digest
    digest = hashlib.blake2b(recipe_digest().encode(), digest_size=8)
    for name in ("train.json", "objects.json", "synthetic.json"):
        if (Path(root) / name).is_file():
            digest.update((Path(root) / name).read_bytes())
    return default_cache_dir() / "evaluator" / f"evaluator-{digest.hexdigest()}.pth"


def ensure_evaluator(root, checkpoint=None, device="cpu", tracking_uri=None, beside=False):
    """The evaluator to use: the given checkpoint, or ours trained on `root` once and then reused. Its
    training is an MLflow run of the `evaluator` experiment in `tracking_uri` (None: the default store).
    beside: when ours must be trained on a CPU with 2 threads or more, train it in a child process on
    half of them and return at once (an EvaluatorInTraining), so that the caller goes on with the rest."""
    if checkpoint:
        return load_evaluator(checkpoint, device)
    path = default_evaluator_path(root)
    if path.is_file():
        try:
            return load_evaluator(path, device)
        except UserError as e:  # a cache damaged by a crash or a full disk: train it again
            print(f"notice: {e}; training it again", file=sys.stderr, flush=True)
    if path in _training_beside and _training_beside[path].process.is_alive():
        return _training_beside[path]  # a failed run's (a sweep's earlier trial): not a second one
    print(f"Training the evaluator on {root} (once; cached at {path})", flush=True)
    if beside and torch.device(device).type == "cpu" and torch.get_num_threads() >= 2:
        _training_beside[path] = EvaluatorInTraining(root, path, device, tracking_uri)
        return _training_beside[path]
    from lab.evaluator_training import summary_lines
    print("\n".join(summary_lines(train_and_check(root, path, device, tracking_uri, scenes=300))), flush=True)
    return load_evaluator(path, device)


_training_beside = {}  # checkpoint path -> its EvaluatorInTraining, in this process


class EvaluatorInTraining:
    """Our evaluator while it trains in a child process on half of this process's CPU threads; this process
    goes on with the other half (the generator's first minutes) and gets them back when the child ends. On
    2 cores one thread each does about 1.26x the work of two threads on one job after the other (README,
    What make demo does). `ready` looks without waiting; scoring waits for the evaluator."""

    def __init__(self, root, path, device, tracking_uri):
        from lab.evaluator_training import RECIPE, extra_root
        recipe = dict(RECIPE)
        extra_root(root, recipe)  # rendered here, on every core, before the threads are shared
        self.path, self.device, self.evaluator = path, device, None
        self.threads = torch.get_num_threads()
        # spawn: a child forked after OpenMP has run can hang in its first parallel region
        self.process = multiprocessing.get_context("spawn").Process(
            target=_train_in_child, name="evaluator",
            args=(str(root), str(path), device, tracking_uri, recipe, self.threads - self.threads // 2))
        self.process.start()
        torch.set_num_threads(self.threads // 2)
        atexit.register(self.stop)  # a run that fails meanwhile does not leave it training

    @property
    def ready(self):
        if self.evaluator is None and not self.process.is_alive():
            self.wait()
        return self.evaluator is not None

    def wait(self):
        """The trained Evaluator, once the child has written it."""
        if self.evaluator is None:
            self.process.join()
            atexit.unregister(self.stop)
            torch.set_num_threads(self.threads)
            if self.process.exitcode != 0:
                raise UserError(self.path, f"the evaluator's training failed (exit code {self.process.exitcode}; "
                                           "its error is printed above)")
            self.evaluator = load_evaluator(self.path, self.device)
        return self.evaluator

    def stop(self):
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()

    def predict(self, images):
        return self.wait().predict(images)

    def features(self, images):
        return self.wait().features(images)

    def accuracy(self, images, labels):
        return self.wait().accuracy(images, labels)


def evaluator_ready(evaluator):
    """False while an EvaluatorInTraining still trains (the caller's threads come back when it ends)."""
    return getattr(evaluator, "ready", True)


def _train_in_child(root, path, device, tracking_uri, recipe, threads):
    torch.set_num_threads(threads)
    from lab.evaluator_training import summary_lines
    results = train_and_check(root, path, device, tracking_uri, recipe, scenes=300, threads=threads)
    print("\n".join(summary_lines(results)), flush=True)


def train_and_check(root, out, device, tracking_uri=None, recipe=None, scenes=300, threads=None):
    """Train our evaluator into `out` and score it on `scenes` fresh held-out scenes, as one MLflow run;
    the figures also go to `out` with a .json suffix and to stdout. Returns the held-out results."""
    from lab.evaluator_training import (RECIPE, heldout_check, metric_key, recipe_digest, train_evaluator,
                                        training_set)
    from lab.tracking import resolve_uri, start_evaluator_run
    recipe = {**RECIPE, **(recipe or {})}
    data = training_set(root, recipe)  # rendered and decoded once, before the clock starts
    tracker = start_evaluator_run(resolve_uri(tracking_uri), recipe, {
        "data_root": str(root), "checkpoint": str(out), "recipe_digest": recipe_digest(recipe)})
    status = "FAILED"
    try:
        start = time.time()
        train_evaluator(root, out, recipe=recipe, device=device, tracker=tracker, data=data)
        seconds = time.time() - start
        beside = f" on {threads} thread{'s' * (threads > 1)}, beside the generator's training" if threads else ""
        print(f"evaluator trained in {seconds:.0f} s{beside} -> {out}", flush=True)
        results = heldout_check(out, scenes=scenes, device=device)
        report = {case: {"accuracy": r["accuracy"], "images": r["images"], "binding_errors": r["binding_errors"]}
                  for case, r in results.items()}
        record = {"train_seconds": round(seconds), "threads": torch.get_num_threads(), **report}
        write_atomic(json.dumps(record, indent=1).encode(), Path(out).with_suffix(".json"))
        tracker.log_metrics({"train_seconds": seconds, **{metric_key(case): r["accuracy"] for case, r in results.items()}},
                            step=0)
        tracker.log_artifact(Path(out).with_suffix(".json"))
        status = "FINISHED"
        return results
    finally:
        tracker.end(status)


@reports_user_errors
def main(argv=None):
    from lab.data import resolve_root
    from lab.evaluator_training import RECIPE, heldout_check, summary_lines
    parser = argparse.ArgumentParser(prog="python -m lab.eval", description="train or check the evaluator")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train our evaluator on a root (default: the synthetic set) and check it")
    train.add_argument("--root", default=None, help="data root (default: the synthetic i-CLEVR set)")
    train.add_argument("--out", default=None, help="checkpoint path (default: the cache)")
    train.add_argument("--phases", default=None, metavar="SIZE:IMAGES:LR,...",
                       help="input size, images seen and peak learning rate per phase (default "
                            + ",".join(":".join(map(str, phase)) for phase in RECIPE["phases"]) + ")")
    train.add_argument("--tracking-uri", default=None,
                       help="MLflow store for the training run (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    check = sub.add_parser("check", help="score a checkpoint on freshly rendered held-out scenes")
    check.add_argument("checkpoint")
    bench = sub.add_parser("bench", help="training images/s of the evaluator's step, layer4 as oneDNN's "
                                         "convolution and as a matmul, side by side")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 96])
    bench.add_argument("--steps", type=int, default=60, help="timed steps per case, after 5 untimed")
    for command in (train, check):
        command.add_argument("--scenes", type=int, default=1000,
                             help="held-out scenes of 3 objects (3 images each; a fifth as many of 5 objects)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.command == "bench":
        from lab.evaluator_training import step_benchmark
        table = step_benchmark(args.batch_sizes, args.steps, device=device)
        print(f"evaluator training step, {torch.get_num_threads()} threads on {device}:")
        print(table.to_string(index=False, float_format="%.2f"))
        return 0
    if args.command == "train":
        recipe = {"phases": parse_phases(args.phases)} if args.phases else None
        root = resolve_root(args.root)
        out = Path(args.out) if args.out else default_evaluator_path(root)
        results = train_and_check(root, out, device, args.tracking_uri, recipe, scenes=args.scenes)
    else:
        results = heldout_check(args.checkpoint, scenes=args.scenes, device=device)
    worst = min(results, key=lambda case: results[case]["accuracy"])
    print(f"per label, {worst}:")
    print(results[worst]["per_label"].to_string(index=False, float_format="%.3f"))
    print("\n".join(summary_lines(results)))
    return 0


def parse_phases(text):
    """'32:90000:2e-3,64:20000:1e-3' -> [[32, 90000, 0.002], [64, 20000, 0.001]]"""
    try:
        phases = [[int(size), int(images), float(lr)] for size, images, lr in (part.split(":") for part in text.split(","))]
    except ValueError:
        phases = None
    if not phases or any(size < 16 or images < 1 or not 0 < lr < 1 for size, images, lr in phases):
        raise UserError("--phases", "expected SIZE:IMAGES:LR,... with sizes >= 16, images >= 1 and 0 < lr < 1, "
                                    f"got {text!r}")
    return phases


if __name__ == "__main__":
    sys.exit(main())
