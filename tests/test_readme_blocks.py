"""Every command in the README (and in docs/) runs as written.

Each fenced ``bash``/``sh``/``shell``/``console`` or ``python`` block of ``README.md`` and ``docs/*.md``
is one test. It runs exactly as written, in a fresh empty temporary directory (the working directory),
with this checkout importable and the offline defaults of ``conftest.py``: a shell block with
``bash -e`` (a failing command fails the block), a ``console`` block as its ``$ `` lines, a Python
block with ``python``. Shell blocks run in their own process group, which is killed afterwards, so a
server a block starts with ``&`` is stopped with it. The README's commands are written for the
repository root; of the checkout, only ``scripts/`` is reachable from the temporary directory (a link).
After a block, each ``-m theworld.train`` command in it must have written its ``summary.json`` (in its
``--output-dir``, default ``runs/theworld``) from as many processes as the command asked for
(``--nproc-per-node``/``--num_processes``), and every summary must account for each sample exactly
(``seen == trained + blocked + errors``).

Markers. A block that cannot run as written says so, in the document itself, on the line directly
above its opening fence (visible to readers; no blank line between):

    *Not run in CI: <reason>.*                              the test is skipped with that reason
    *Slow, run only by `pytest -m slow`: <reason>.*         the test is marked ``slow`` (not run by CI)
    *Long, run by `python -m pytest -m long`: <reason>.*    the test is marked ``long``: CI runs it with
                                                            its long test command, not the quick one

Fences without a language (diagrams, printed output) and other languages are not commands and are
not run. ``test_required_commands_run_in_ci`` keeps the commands CI must run (the safety worker's
shell commands, ``generate``, the default training run, the two-process forms) in blocks that CI runs
(unmarked or ``long``).

Run ``python -m pytest tests/test_readme_blocks.py -v -rs`` to see every block with its outcome and
every skipped block with its reason; ``-m long`` runs the full-budget ones, ``-m slow`` the others.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
PYTHON_LANGUAGES = {"python", "py"}
SKIP_MARKER = re.compile(r"^\*Not run in CI: (?P<reason>.+)\*$")
SLOW_MARKER = re.compile(r"^\*Slow, run only by `pytest -m slow`: (?P<reason>.+)\*$")
LONG_MARKER = re.compile(r"^\*Long, run by `python -m pytest -m long`: (?P<reason>.+)\*$")
FENCE = re.compile(r"^```\s*(?P<language>[\w+-]*)\s*$")
BLOCK_TIMEOUT = 1500  # seconds for one block; the two-process training run is the longest in CI
STOP_GRACE = 20  # seconds a block's leftover processes get to exit on SIGTERM before SIGKILL


@dataclass(frozen=True)
class Block:
    document: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    heading: str
    language: str
    code: str
    skip: str | None  # reason, from a "Not run in CI" marker
    slow: str | None  # reason, from a "Slow" marker
    long: str | None  # reason, from a "Long" marker

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}"


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower().replace("`", "")).strip("-")[:40]


def extract_blocks(path: Path) -> list[Block]:
    """The runnable fenced blocks of one Markdown file, with the marker on the line above each."""
    lines = path.read_text().splitlines()
    blocks, heading, i = [], "", 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip()
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        language = fence["language"].lower()
        if language in SHELL_LANGUAGES | PYTHON_LANGUAGES:
            above = lines[i - 1].strip() if i > 0 else ""
            skip, slow, long = (marker.match(above) for marker in (SKIP_MARKER, SLOW_MARKER, LONG_MARKER))
            blocks.append(Block(str(path.relative_to(REPO_ROOT)), i + 1, _slug(heading), language,
                                "\n".join(lines[i + 1 : end]) + "\n", skip and skip["reason"].rstrip("."),
                                slow and slow["reason"].rstrip("."), long and long["reason"].rstrip(".")))
        i = end + 1
    return blocks


BLOCKS = [block for document in DOCUMENTS for block in extract_blocks(document)]


def training_runs(code: str) -> list[tuple[str, int]]:
    """``(output_dir, processes)`` of each ``-m theworld.train`` command line of a shell block."""
    runs = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0]
        if not re.search(r"-m theworld\.train\b", line):
            continue
        words = shlex.split(line)

        def value(flags: tuple[str, ...], default: str) -> str:
            for i, word in enumerate(words):
                if word in flags and i + 1 < len(words):
                    return words[i + 1]
                if word.split("=")[0] in flags and "=" in word:
                    return word.split("=", 1)[1]
            return default

        runs.append((value(("--output-dir", "--output_dir"), "runs/theworld"),
                     int(value(("--nproc-per-node", "--nproc_per_node", "--num_processes", "--num-processes"), "1"))))
    return runs


def _param(block: Block):
    marks = [pytest.mark.slow] if block.slow else [pytest.mark.long] if block.long else []
    return pytest.param(block, id=f"{block.id}-{block.heading}", marks=marks)


def _environment() -> dict:
    """The test session's environment (offline) with this checkout first on the import path
    and this interpreter's scripts (python, torchrun, accelerate) first on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _stop_group(pgid: int):
    """SIGTERM every process the block left behind (servers started with ``&``), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_block(block: Block, workdir: Path, scratch: Path) -> tuple[int, str]:
    """Run one block as written with ``workdir`` as its working directory; ``(exit status, output)``."""
    if block.language in PYTHON_LANGUAGES:
        script, command = scratch / "block.py", [sys.executable]
        script.write_text(block.code)
    else:
        code = block.code
        if block.language == "console":  # the commands are the lines after a "$ " prompt
            code = "\n".join(line[2:] for line in code.splitlines() if line.startswith("$ ")) + "\n"
        script, command = scratch / "block.sh", ["bash", "-e"]
        script.write_text(code)
    log = scratch / "output.log"
    # Output goes to a file, not a pipe: a server left running in the background would hold a pipe open.
    with open(log, "w") as out:
        proc = subprocess.Popen([*command, str(script)], cwd=workdir, env=_environment(), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            status = proc.wait(timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            _stop_group(proc.pid)
            proc.wait()
    output = log.read_text(errors="replace")
    return (status if status is not None else -1), output + ("" if status is not None else
                                                             f"\n[timed out after {BLOCK_TIMEOUT} s]")


# Blocks share fixed endpoints as a reader types them (ipc:///tmp/sw/worker.sock, port 8000): they must run one
# at a time, which the test command's `--dist loadfile` gives as long as they all run from this one file.
@pytest.mark.timeout(BLOCK_TIMEOUT + 120)
@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_block_runs_as_written(block: Block, tmp_path):
    if block.skip:
        pytest.skip(f"{block.id} ({block.heading}): {block.skip}")
    workdir, scratch = tmp_path / "cwd", tmp_path / "scratch"
    workdir.mkdir()
    scratch.mkdir()
    (workdir / "scripts").symlink_to(REPO_ROOT / "scripts", target_is_directory=True)
    started = time.monotonic()
    status, output = run_block(block, workdir, scratch)
    print(f"{block.id} ({block.heading}): exit {status} after {time.monotonic() - started:.0f} s\n{output[-3000:]}")
    assert status == 0, f"{block.id} failed with exit status {status}:\n{block.code}\n--- output ---\n{output[-6000:]}"
    if block.language in SHELL_LANGUAGES:
        for output_dir, processes in training_runs(block.code):
            path = workdir / output_dir / "summary.json"
            assert path.is_file(), f"{block.id}: the run with --output-dir {output_dir} wrote no summary.json"
            ran = json.loads(path.read_text())["num_processes"]
            assert ran == processes, f"{block.id}: {output_dir} trained in {ran} process(es), the command asked for {processes}"
    for path in sorted(workdir.rglob("summary.json")):
        summary = json.loads(path.read_text())
        print(f"{path.relative_to(workdir)}: seen {summary['seen']} = trained {summary['trained']} + blocked "
              f"{summary['blocked']} + errors {summary['errors']} ({summary['num_processes']} processes)")
        assert summary["seen"] == summary["trained"] + summary["blocked"] + summary["errors"], path


def _shell_blocks_ci_runs() -> list[str]:
    """README shell blocks that one of CI's two test commands runs: unmarked (the test command) or
    ``long`` (the long test command)."""
    return [b.code for b in BLOCKS if b.document == "README.md" and b.language in SHELL_LANGUAGES
            and not b.skip and not b.slow]


@pytest.mark.parametrize("command", [
    re.compile(r"^python -m theworld\.train(\s+#.*)?$", re.M),  # the default run, no flags at all
    re.compile(r"^ACCELERATE_USE_CPU=true torchrun --nproc-per-node 2 -m theworld\.train(\s+--output-dir \S+)?(\s+#.*)?$", re.M),
    re.compile(r"^ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m theworld\.train\b", re.M),
    re.compile(r"^python -m theworld\.generate\b", re.M),
    re.compile(r"^python -m safety_worker serve\b", re.M),
    re.compile(r"^python -m safety_worker check\b", re.M),
    re.compile(r"^python -m safety_worker status\b", re.M),
], ids=lambda pattern: pattern.pattern.split(r"\b")[0].split("(")[0].replace("\\", "").strip("^"))
def test_required_commands_run_in_ci(command):
    """The commands CI must run stay in README blocks that carry no skip or slow marker."""
    assert any(command.search(code) for code in _shell_blocks_ci_runs()), (
        f"no README shell block that CI runs has {command.pattern!r} (it is missing, or marked skip or slow; "
        "see this module's docstring)")


def test_every_marker_belongs_to_a_block():
    """A marker line that is not directly above a runnable fence is a mistake: it would mark nothing."""
    for document in DOCUMENTS:
        lines = document.read_text().splitlines()
        for i, line in enumerate(lines):
            if any(marker.match(line.strip()) for marker in (SKIP_MARKER, SLOW_MARKER, LONG_MARKER)):
                following = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
                assert following and following["language"].lower() in SHELL_LANGUAGES | PYTHON_LANGUAGES, (
                    f"{document.name}:{i + 1}: marker not directly above a bash/python fence")


TEST_COMMAND = 'python -m pytest -n 2 --dist loadfile -m "not slow and not long"'
LONG_TEST_COMMAND = "python -m pytest -m long"


def test_ci_runs_the_readme_test_commands_as_written():
    """The README's quick start shows the test command, its Development section both commands, and `.ci/run`
    runs both, the long one after the quick one; the ``long`` marker is registered and names its command."""
    readme = (REPO_ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    development = readme.split("## Development", 1)[1].split("\n## ", 1)[0]
    assert TEST_COMMAND in quick_start
    assert TEST_COMMAND in development and LONG_TEST_COMMAND in development
    ci = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in ci if line.startswith("python -m pytest")]
    assert commands[0] == TEST_COMMAND and commands[1].startswith(LONG_TEST_COMMAND), commands
    import tomllib

    markers = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("long:") and LONG_TEST_COMMAND in m for m in markers), markers
