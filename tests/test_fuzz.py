"""The config fuzzer: hypothesis mutates a valid tiny config (wrong types, out-of-range and special floats, huge
and negative numbers, unknown and misspelt keys, odd strings and paths, nested junk, YAML tags) and `--dry-run`
must accept it or refuse it in one line, never with a traceback; an accepted one must also build and train two
steps (what the dry run accepted, a run accepts: the same checks), and a refused one must leave nothing behind.
The fast variant runs in `make test`; the slow one tries many more examples. Each prints what it tried."""
import contextlib
import io
import math
import tempfile
from collections import Counter
from pathlib import Path

import hypothesis
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.config import flatten, load_config

JUNK_STRINGS = ["", " ", "..", "/", "../../etc", "a/b", "nul\0byte", "ünïcødé", "x" * 300, "~", "${HOME}", "-1",
                "1e-3", "null", "true", "[", "{a: 1}", "sqlite:///", "foo://bar", "http://127.0.0.1:9", "*", "\n"]
TAGGED = ["!!python/object/apply:os.system ['echo fuzz']", "!!python/name:os.system", "!!binary aGk=",
          "!!timestamp 2001-12-14", "!!set {a, b}", "!!omap [a: 1]", "!!float .nan", "!!int 0x1F", "&anchor 3",
          "*undefined_alias"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**40, 2**40), st.integers(min_value=2**64), st.integers(max_value=-2**64),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, -1, 1e-300, 1e300, -0.0, 2**31]),
    st.sampled_from(JUNK_STRINGS), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["a", "lr", "unet", "0", ""]), inner, max_size=3), max_leaves=6)


def misspelt(key):
    return st.sampled_from([key + "s", key[:-1], key.upper(), key.replace("_", "-"), "x" + key])


NAMES = ["tiny", "cpu", "adagn", "cross_attn", "concat", "time_add", "ddim", "ddpm", "dpmsolver++", "cosine", "linear",
         "sigmoid", "epsilon", "v_prediction", "min_snr", "count", "learned", "cosine", "adamw", "off", "bf16", "auto"]


def plausible(original):
    """A value of the original's type, often near or past the edge of its range."""
    if isinstance(original, bool):
        return st.booleans()
    if isinstance(original, int):
        return st.integers(-3, 70) | st.sampled_from([0, 1, 2, 10_000, 2**31])
    if isinstance(original, float):
        return st.floats(-1, 20) | st.sampled_from([0.0, 1e-9, 0.999, 1.0, 1.5, 101.0, math.inf, math.nan])
    if isinstance(original, list):
        return st.lists(st.sampled_from(["test.json", "new_test.json", "val.json", "nope.json", 4, 8, 16]), max_size=3)
    return st.sampled_from(NAMES + JUNK_STRINGS)


@st.composite
def mutations(draw, raw):
    """A list of (dotted key, value or ('tag', text)) changes to a valid config."""
    flat = {k: v for k, v in flatten(raw).items() if k != "base"}
    keys = sorted(flat)
    changes = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        kind = draw(st.sampled_from(["plausible"] * 6 + ["value", "misspelt", "unknown", "tag", "section"]))
        if kind == "plausible":
            changes.append((key, draw(plausible(flat[key]))))
            continue
        if kind == "misspelt":
            parts = key.split(".")
            key = ".".join([*parts[:-1], draw(misspelt(parts[-1]))])
        elif kind == "unknown":
            key = draw(st.sampled_from(["", key.split(".")[0] + "."])) + draw(st.sampled_from(["foo", "seed2", "lr"]))
        elif kind == "section":
            key = key.split(".")[0]
        changes.append((key, ("tag", draw(st.sampled_from(TAGGED))) if kind == "tag" else draw(values)))
    return changes


def apply(raw, changes):
    """The config file's text: `raw` with the changes, tagged values written verbatim."""
    raw, tags = yaml.safe_load(yaml.safe_dump(raw)), {}
    for i, (key, value) in enumerate(changes):
        node, parts = raw, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if isinstance(value, tuple):
            tags[f"TAGGED{i}"] = value[1]
            value = f"TAGGED{i}"
        node[parts[-1]] = value
    text = yaml.safe_dump(raw, allow_unicode=True)
    for placeholder, tagged in tags.items():
        text = text.replace(placeholder, tagged)
    return text


def base_config(tiny_root, evaluator, folder):
    from tests.conftest import EXPERIMENTS
    raw = yaml.safe_load(Path(EXPERIMENTS / "base.yaml").read_text())
    raw.update(experiment="fuzz", tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", output_dir=str(folder / "runs"))
    raw["data"] = {"root": str(tiny_root), "image_size": 32}
    raw["model"] = {"unet": "tiny", "conditioning": "adagn", "cfg_dropout": 0.1}
    raw["diffusion"] = {"num_train_timesteps": 50}
    raw["train"] = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "compile": "off"}
    raw["eval"] = {"steps": 3, "evaluator": str(evaluator), "val_seeds": 1, "final_seeds": 1}
    return raw


def trainable(config, tiny_root):
    """Small enough to train two steps in a test: the tiny UNet on the tiny root at 64 pixels or less."""
    return (config.model.unet == "tiny" and config.data.root == str(tiny_root) and config.data.image_size <= 64
            and config.train.batch_size * config.train.grad_accum <= 64 and config.model.width <= 2
            and not config.model.overrides)


def two_steps(config, path):
    from lab import build, trainer
    setup = build.prepare(config, path, "cpu")
    step = trainer.TrainStep(setup)
    step.start_epoch(0)
    for i in range(2):
        step(i % step.steps_per_epoch, i + 1)


def fuzz(tiny_root, random_evaluator, examples, seed):
    from run_experiment import main
    found = Counter()
    errors = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        raw = base_config(tiny_root, random_evaluator, Path(tmp))

        @hypothesis.seed(seed)
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(changes=mutations(raw))
        def check(changes):
            with tempfile.TemporaryDirectory() as case:
                path = Path(case) / "fuzz.yaml"
                path.write_text(apply(raw, changes).replace(tmp, case))
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    code = main([str(path), "--dry-run"])
                lines = err.getvalue().splitlines()
                if code == 1:
                    assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
                    assert sorted(p.name for p in Path(case).iterdir()) == ["fuzz.yaml"], "a refusal wrote files"
                    found["refused"] += 1
                    errors[lines[0].split(": ", 2)[-1].split(" (")[0][:60]] += 1
                    return
                assert code == 0 and not lines, err.getvalue()
                found["accepted"] += 1
                config = load_config(path)
                if trainable(config, tiny_root) and found["accepted"] % 3 == 1:
                    with contextlib.redirect_stdout(io.StringIO()):
                        two_steps(config, path)
                    found["trained two steps"] += 1
        check()
    print(f"fuzzer (seed {seed}): {sum(found[k] for k in ('refused', 'accepted'))} configs tried: {dict(found)}")
    for message, count in errors.most_common(12):
        print(f"  refused {count}x: {message}")
    return found


def test_the_config_fuzzer(tiny_root, random_evaluator):
    found = fuzz(tiny_root, random_evaluator, examples=40, seed=0)
    assert found["refused"] and found["accepted"]


@pytest.mark.slow
def test_the_config_fuzzer_at_length(tiny_root, random_evaluator):
    found = fuzz(tiny_root, random_evaluator, examples=600, seed=1)
    assert found["refused"] > 100 and found["trained two steps"] > 10
