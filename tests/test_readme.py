"""The README and docs/ stay honest: a guide of at most 15 KB whose every command is one the project has (its
script or module answers --help and knows every option used; make targets and config files exist), and
neither it nor the reports speak of how the project was made or of a developer's machine."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
# words about how the project was made, and traces of one machine
BANNED = [r"\bsession\b", r"\bscratch\b", r"\bthe issue\b", r"/work/", r"/tmp/", r"/root/",
          r"(?<![-\w])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b"]  # a commit hash (not a cache file's key)
DATE = r"\b20\d\d-\d\d-\d\d\b|\bUTC\b"


def shell_blocks(text):
    """The text of each fenced block without a language or with a shell's (not yaml, python, ...)."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = [] if line[3:].strip() in ("", "sh", "bash", "console") else False
            else:
                if current is not False:
                    blocks.append("\n".join(current))
                current = None
        elif current:
            current.append(line)
        elif current == []:
            current = [line]
    return blocks


def commands(text):
    """The command lines of the README's shell blocks (continuations joined; comments, output and YAML left out)."""
    found = []
    for block in shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            words = shlex.split(line, comments=True) if line else []
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                words = words[1:]
            if words and words[0] in ("python", "make", "mlflow", "torchrun", "accelerate"):
                found.append(words)
            for part in line.split("&&")[1:]:  # python -m venv .venv && .venv/bin/pip ...
                words = shlex.split(part)
                if words and words[0] in ("python", "make"):
                    found.append(words)
    return found


def entry_point(words):
    """(argv that prints the command's --help, the options it is given) or None for make."""
    if words[0] == "make":
        return None
    if words[0] in ("torchrun", "accelerate"):
        script = next(w for w in words if w.endswith(".py"))
        return [sys.executable, script], [w for w in words[words.index(script) + 1:] if w.startswith("--")]
    if words[0] == "mlflow":
        return [sys.executable, "-m", "mlflow", words[1]], [w for w in words[2:] if w.startswith("--")]
    if words[1] == "-m":
        subcommand = words[3:4] if words[2] in SUBCOMMANDS else []
        return [sys.executable, "-m", words[2], *subcommand], [w for w in words[3:] if w.startswith("--")]
    return [sys.executable, words[1]], [w for w in words[2:] if w.startswith("--")]


SUBCOMMANDS = {"lab.data", "lab.eval"}  # their options belong to a subcommand's --help


def test_the_readme_is_a_short_guide():
    text = README.read_text()
    assert len(text.encode()) <= 15 * 1024
    assert text.index("make demo") < text.index("## Real i-CLEVR") < text.index("## Drawing from a checkpoint")
    for pattern in [*BANNED, DATE]:
        assert not re.search(pattern, text), f"README.md holds {re.search(pattern, text)[0]!r}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_the_reports_name_no_machine_and_date_only_their_measurements(doc):
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for pattern in BANNED:
            assert not re.search(pattern, line), f"{doc.name}:{number} holds {re.search(pattern, line)[0]!r}"
        if re.search(DATE, line):
            assert "measured on" in line.lower(), f"{doc.name}:{number}: a date or time outside a 'Measured on' line"


def test_every_readme_command_is_one_the_project_has():
    found = commands(README.read_text())
    assert len(found) >= 20
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
    helps = {}
    for words in found:
        for word in words:
            if word.startswith("experiments/"):
                assert (ROOT / word).exists(), f"{' '.join(words)}: no {word}"
        call = entry_point(words)
        if call is None:
            assert set(w for w in words[1:] if "=" not in w) <= targets, f"{' '.join(words)}: no such make target"
            continue
        argv, options = call
        key = tuple(argv)
        if key not in helps:
            done = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{' '.join(argv)} --help: {done.stderr[-500:]}"
            helps[key] = done.stdout
        for option in options:
            assert option.split("=")[0] in helps[key], f"{' '.join(words)}: {option} is not an option of it"
