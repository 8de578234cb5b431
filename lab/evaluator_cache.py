"""Our evaluator for a data root, trained once and then reused: where it is cached (keyed by the root's label
files and the recipe), and how it trains when missing, in a child process beside the generator's first minutes
on a CPU, or in this process.

    evaluator = ensure_evaluator(root)                 # lab.eval.Evaluator, trained first if not cached
    evaluator = ensure_evaluator(root, beside=True)    # on a CPU: an EvaluatorInTraining, ready later
"""
import atexit
import hashlib
import multiprocessing
import sys
from pathlib import Path

import torch

from lab.data import default_cache_dir
from lab.errors import UserError
from lab.eval import load_evaluator
from lab.evaluator_training import RECIPE, extra_root, recipe_digest, summary_lines, teaches_counting, train_and_check


def default_evaluator_path(root):
    """Where the evaluator trained on `root` is cached: keyed by the root's label files and the recipe."""
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
    print("\n".join(summary_lines(*train_and_check(root, path, device, tracking_uri, scenes=300))), flush=True)
    return load_evaluator(path, device)


_training_beside = {}  # checkpoint path -> its EvaluatorInTraining, in this process


def strict_judge_expected(root, checkpoint=None):
    """Whether a run on `root` (None: the synthetic default, rendered or not) with the evaluator `checkpoint`
    (None: ours) will have a strict judge, decided without training or rendering anything."""
    if checkpoint is None:
        return root is None or teaches_counting(root)
    if load_evaluator(checkpoint).strict:
        return True
    return root is not None and teaches_counting(root) and default_evaluator_path(root).is_file() and \
        load_evaluator(default_evaluator_path(root)).strict


def strict_judge_for(root, evaluator, checkpoint=None, device="cpu"):
    """The strict judge of images drawn for `root`: `evaluator` when it is ours (`checkpoint` None: trained for
    this root, with a count head where the root's scenes teach one) or a given checkpoint with a count head;
    for a user's evaluator without one, ours for this root when it is cached. Otherwise None, with a one-line
    notice: no strict figure ever comes from a judge not trained for these images."""
    if checkpoint is None and teaches_counting(root):
        return evaluator
    if checkpoint is not None:
        if evaluator.strict:
            return evaluator
        path = default_evaluator_path(root)
        if teaches_counting(root) and path.is_file() and (ours := load_evaluator(path, device)).strict:
            return ours
    why = (f"{checkpoint} has no count head and none of ours is trained for {root} (python -m lab.eval train "
           f"--root {root})" if checkpoint else
           f"{root} is no synthetic root, whose scenes would teach our evaluator to count objects")
    print(f"notice: no strict figures (exact scenes, extra and missing objects): {why}", file=sys.stderr, flush=True)
    return None


class EvaluatorInTraining:
    """Our evaluator while it trains in a child process on half of this process's CPU threads; this process
    goes on with the other half (the generator's first minutes) and gets them back when the child ends. On
    2 cores one thread each does about 1.26x the work of two threads on one job after the other (README,
    What make demo does). `ready` looks without waiting; scoring waits for the evaluator."""

    def __init__(self, root, path, device, tracking_uri):
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

    @property
    def strict(self):
        return self.wait().strict

    def assess(self, images):
        return self.wait().assess(images)

    def predict(self, images):
        return self.wait().predict(images)

    def features(self, images):
        return self.wait().features(images)

    def counts(self, images):
        return self.wait().counts(images)

    def accuracy(self, images, labels):
        return self.wait().accuracy(images, labels)


def evaluator_ready(evaluator):
    """False while an EvaluatorInTraining still trains (the caller's threads come back when it ends)."""
    return getattr(evaluator, "ready", True)


def _train_in_child(root, path, device, tracking_uri, recipe, threads):
    torch.set_num_threads(threads)
    results = train_and_check(root, path, device, tracking_uri, recipe, scenes=300, threads=threads)
    print("\n".join(summary_lines(*results)), flush=True)
