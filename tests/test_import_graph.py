"""The import graph: every module imports on its own, and no module imports a layer above it.

Why one fresh interpreter that forks a child per module: a module that only imports because something
else was imported first (a cycle `processing -> modeling -> processing` that works when `TheWorld` was
imported before, as it always was in the tests) is caught only by importing that module *first*, in an
interpreter where no project module is loaded yet. A new interpreter per module costs the third-party
imports (torch, transformers, diffusers: seconds) each time, ~55 times. Instead one fresh interpreter
(this file run as a script) imports only those third-party packages, then forks one child per project
module and the child imports that module alone: every child starts with no project module loaded, so a
cycle or a missing import among project modules still fails, and a child costs milliseconds plus the
module's own work (the whole file: ~19 s of CPU, measured with `time python -m pytest
tests/test_import_graph.py` on the shared 2-core machine, 52 s wall under its load). What this cannot see
is a project module that depends on a third-party import having happened first; the preloaded set is the
third-party packages every module here imports anyway. Whether the light side of `safety_worker` (protocol,
client) stays free of torch and cosmos_guardrail needs an interpreter *without* this preload: that is
tests/test_worker.py's `test_importing_the_client_side_imports_no_torch`.

The layer rules are read from the source (every `import`, at any depth, also inside functions), so an
upward import fails here even when it sits in a function that no test calls.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("theworld", "safety_worker")

# Third-party packages the parent imports before forking (never a project module, never the guardrail:
# `import theworld` refuses to start in a process that has it). Attribute access loads transformers'
# and diffusers' lazy submodules, where most of their import time goes.
PRELOAD = """
import os
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # as theworld.serving.demo sets it
import numpy, PIL.Image, torch, safetensors.torch, msgpack, zmq, tqdm, accelerate, pydantic, fastapi, gradio
import transformers, diffusers, diffusers.video_processor
transformers.Gemma3ForConditionalGeneration, transformers.Gemma3Processor, transformers.AutoProcessor
diffusers.AutoencoderKLWan, diffusers.CosmosTransformer3DModel, diffusers.FlowMatchEulerDiscreteScheduler
"""

# theworld's layers, lowest first: a module may import its own layer and the layers below it, never one
# above. Processing and modeling share a layer and never import each other (the rules below). The package
# root imports only the guard; it hands out the public classes (`theworld.TheWorld`, ...) lazily, by module
# name on first use, as transformers' root does, so `import theworld` stays cheap.
THEWORLD_LAYERS = (
    ("theworld", "theworld._import_guard", "theworld.configuration_theworld", "theworld.real_configs"),
    ("theworld.video_processing_theworld",),
    ("theworld.processing_theworld", "theworld.modeling"),
    ("theworld.data",),
    ("theworld.evaluation", "theworld.evaluation_world", "theworld.tiny"),
    ("theworld.inference",),
    ("theworld.training", "theworld.serving"),
    ("theworld.train", "theworld.train_world", "theworld.serve", "theworld.generate"),
)
# What the model may import of theworld: its configuration (transformers' layout: LLaVA, Gemma 3).
MODELING_MAY_IMPORT = ("theworld", "theworld._import_guard", "theworld.configuration_theworld", "theworld.modeling")
PROCESSING = ("theworld.processing_theworld", "theworld.video_processing_theworld")


def _within(module: str, prefix: str) -> bool:
    """`module` is `prefix` or inside it; a package root (`theworld`) stands for its `__init__` only."""
    return module == prefix or (prefix not in PACKAGES and module.startswith(prefix + "."))


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def project_modules() -> dict[str, Path]:
    """Every module of both packages, by dotted name."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def import_edges() -> set[tuple[str, str]]:
    """`(importer, imported)` for every import of a project module by a project module, at any depth."""
    modules = project_modules()
    edges = set()
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                # `from pkg import sub` imports the submodule; `from pkg import name` imports pkg.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {(name, target) for target in targets if target in modules and target != name}
    return edges


def layer_of(module: str) -> int | None:
    for rank, prefixes in enumerate(THEWORLD_LAYERS):
        if any(_within(module, prefix) for prefix in prefixes):
            return rank
    return None


def upward_edges(edges) -> list[tuple[str, str]]:
    """The edges from a theworld module to a theworld module of a higher layer."""
    upward = []
    for importer, imported in edges:
        if not (_in_package(importer, "theworld") and _in_package(imported, "theworld")):
            continue
        src, dst = layer_of(importer), layer_of(imported)
        assert src is not None and dst is not None, f"put {importer if src is None else imported} in THEWORLD_LAYERS"
        if dst > src:
            upward.append((importer, imported))
    return sorted(upward)


def processing_edges_to_the_model(edges) -> list[tuple[str, str]]:
    return sorted((a, b) for a, b in edges if a in PROCESSING and _within(b, "theworld.modeling"))


def model_edges_beyond_its_configuration(edges) -> list[tuple[str, str]]:
    return sorted((a, b) for a, b in edges if _within(a, "theworld.modeling") and _in_package(b, "theworld")
                  and not any(_within(b, p) for p in MODELING_MAY_IMPORT))


def import_each_module_in_a_fork() -> dict[str, dict]:
    """Run in a fresh interpreter: preload third-party packages, then import each project module in a
    forked child (as many at once as there are cores). Returns per module its exit code, error and the
    project modules the import loaded."""
    exec(PRELOAD, {})
    loaded_before = [m for m in sys.modules if m.split(".")[0] in PACKAGES]
    assert not loaded_before, f"the preload imported project modules: {loaded_before}"
    # `__main__` modules are left out: importing one runs the program; what it imports is imported below.
    waiting = [m for m in project_modules() if not m.endswith("__main__")]
    running, results = {}, {}
    while waiting or running:
        while waiting and len(running) < max(2, os.cpu_count() or 2):
            module = waiting.pop(0)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: import one module, report, exit without running atexit or teardown
                os.close(read)
                _import_and_report(module, write)
            os.close(write)
            running[pid] = (module, read)
        pid, status = os.wait()
        module, read = running.pop(pid)
        with os.fdopen(read, "rb") as pipe:  # the report is small: the child never blocks on a full pipe
            data = pipe.read()
        report = json.loads(data) if data else {"error": "the child died without a report"}
        results[module] = {"exit_code": os.waitstatus_to_exitcode(status), **report}
    return results


def _import_and_report(module: str, pipe: int) -> None:
    code, report = 0, {}
    try:
        import importlib

        importlib.import_module(module)
    except BaseException as e:  # noqa: BLE001  (SystemExit too: an import must not exit)
        code, report["error"] = 1, f"{type(e).__name__}: {e}"
    report["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in PACKAGES)
    os.write(pipe, json.dumps(report).encode())
    os._exit(code)


def registry_probe_in_a_fork() -> list[str]:
    """In a fork of the preloaded interpreter: what `TheWorld.from_pretrained`'s processor lookup says before
    and after the processor module is imported, and whether `theworld.TheWorldProcessor` is what it finds."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        lines = []
        try:
            import theworld.modeling.modeling_theworld as modeling

            try:
                modeling._processor_class()
                lines.append("found before the processor module was imported")
            except RuntimeError as e:
                lines.append(str(e))
            import theworld
            import theworld.processing_theworld  # noqa: F401

            lines += [modeling._processor_class().__name__, str(theworld.TheWorldProcessor is modeling._processor_class())]
        except BaseException as e:  # noqa: BLE001
            lines.append(f"{type(e).__name__}: {e}")
        os.write(write, json.dumps(lines).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _fork_results() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def fork_results() -> dict:
    """One fresh interpreter for the tests below: `{"modules": ..., "registry": ...}`."""
    return _fork_results()


def test_every_module_imports_on_its_own_in_a_fresh_interpreter(fork_results):
    results = fork_results["modules"]
    assert set(results) == {m for m in project_modules() if not m.endswith("__main__")}
    failed = {m: r.get("error") for m, r in results.items() if r["exit_code"] != 0}
    assert not failed, f"modules that fail to import first in a fresh interpreter: {failed}"
    # The model, loaded alone, brings no processor with it (checked on what the import really loaded).
    for module in ("theworld.modeling", "theworld.modeling.modeling_theworld"):
        assert not [m for m in results[module]["loaded"] if m in PROCESSING], results[module]["loaded"]
    for module in PROCESSING:
        assert not [m for m in results[module]["loaded"] if _within(m, "theworld.modeling")], results[module]["loaded"]


def test_the_model_finds_its_processor_in_the_registry_or_says_what_to_import(fork_results):
    said_before, *after = fork_results["registry"]
    assert "from theworld import TheWorld" in said_before and "import theworld.processing_theworld" in said_before
    assert after == ["TheWorldProcessor", "True"]


def test_the_model_imports_only_its_configuration():
    assert model_edges_beyond_its_configuration(import_edges()) == [], (
        "theworld.modeling may import only theworld's configuration (and the import guard) and its own modules")


def test_processing_never_imports_the_model():
    assert processing_edges_to_the_model(import_edges()) == []


def test_no_module_imports_a_layer_above_it():
    assert upward_edges(import_edges()) == []


# `curate`'s driver and read tasks read datasets with the trainer's own readers (issue 24: "the same readers and
# `--data-columns`"); its checker actors, like the worker, never load theworld (tests/test_curate.py reads each
# actor's `theworld_loaded`).
READS_WITH_THE_TRAINERS_READERS = {"safety_worker.curate": ("theworld.data",)}


def test_the_safety_worker_never_imports_theworld():
    # The worker is the other process: nothing of the trainer's side may load into it.
    def allowed(importer, imported):
        return any(_in_package(imported, p) for p in READS_WITH_THE_TRAINERS_READERS.get(importer, ()))

    assert sorted((a, b) for a, b in import_edges() if _in_package(a, "safety_worker") and _in_package(b, "theworld")
                  and not allowed(a, b)) == []


def test_the_rules_catch_the_edges_they_forbid():
    # A guard on the checker itself: the graph of main before this change (modeling imported the processor,
    # the processor a modeling module) and a data module importing the trainer must all be caught.
    old_graph = [("theworld.modeling.modeling_theworld", "theworld.processing_theworld"),
                 ("theworld.processing_theworld", "theworld.modeling.world_encoder"),
                 ("theworld.modeling.world_encoder", "theworld.video_processing_theworld"),
                 ("theworld.data.collator", "theworld.training.heldout"),
                 ("theworld.training.loop", "theworld.data.collator")]
    assert upward_edges(old_graph) == [("theworld.data.collator", "theworld.training.heldout")]
    assert processing_edges_to_the_model(old_graph) == [("theworld.processing_theworld", "theworld.modeling.world_encoder")]
    assert model_edges_beyond_its_configuration(old_graph) == [
        ("theworld.modeling.modeling_theworld", "theworld.processing_theworld"),
        ("theworld.modeling.world_encoder", "theworld.video_processing_theworld")]
    assert layer_of("theworld.training.loop") > layer_of("theworld.modeling.world_encoder") > layer_of("theworld")


def test_the_edge_reader_sees_imports_inside_functions():
    # The rules are only as good as the edges found.
    edges = import_edges()
    assert ("theworld.data.sources", "theworld.configuration_theworld") in edges  # a function-level import
    assert ("safety_worker.client", "safety_worker.protocol") in edges  # `from . import protocol as P`
    assert ("safety_worker.client", "safety_worker") not in edges


if __name__ == "__main__":
    modules = import_each_module_in_a_fork()
    print(json.dumps({"modules": modules, "registry": registry_probe_in_a_fork()}))
