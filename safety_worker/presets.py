"""Where the guard models come from: the `tiny`, `hub` and `local` presets, resolved in one place.

`use_preset` sets the process environment the real `cosmos_guardrail` checker loads from
(`HF_HOME`, and `HF_HUB_OFFLINE=1` for local files) and returns the `models` description that
`hello` reports. `serve`, the benchmarks and the tests all load the checker through it, so a
checker built in-process for a comparison reads exactly what a worker reads. Call it before
anything imports huggingface_hub (it reads HF_HOME once, at import).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from . import tiny

PRESETS = ("tiny", "hub", "local")
DEFAULT_GUARDRAIL_REPO = tiny.GUARDRAIL_REPO
TEXT_GUARD_REPO = tiny.TEXT_GUARD_REPO  # hard-coded in cosmos_guardrail


class PresetError(ValueError):
    """Options that do not fit the preset (the message names them)."""


def use_preset(preset: str = "tiny", *, tiny_dir: str | os.PathLike | None = None, tiny_faces: str = "none",
               hf_home: str | None = None, guardrail_repo: str = DEFAULT_GUARDRAIL_REPO,
               guardrail_dir: str | None = None, text_guard_dir: str | None = None) -> dict[str, Any]:
    """Point this process at the preset's checkpoints (see the module docstring); returns `models`.

    tiny: build the offline tiny checkpoint once (`tiny_dir`, default `tiny.default_tiny_dir()`) for
    face variant `tiny_faces`. hub: real weights in the Hugging Face cache `hf_home` (default: the
    environment's HF_HOME), guardrail checkpoint `guardrail_repo`. local: plain local copies of the
    two repositories, served through a private hub cache of links."""
    if preset not in PRESETS:
        raise PresetError(f"preset must be one of {PRESETS}, got {preset!r}")
    models: dict[str, Any] = {"preset": preset, "guardrail_repo": guardrail_repo}
    if preset == "tiny":
        if guardrail_repo != DEFAULT_GUARDRAIL_REPO or hf_home or guardrail_dir or text_guard_dir:
            raise PresetError("--guardrail-repo/--hf-home/--guardrail-dir/--text-guard-dir do not apply to --preset tiny")
        root = Path(tiny_dir) if tiny_dir else tiny.default_tiny_dir()
        os.environ["HF_HOME"] = str(root / tiny.variant_key(tiny_faces))
        os.environ["HF_HUB_OFFLINE"] = "1"
        tiny.build_tiny_guardrail(root, faces=tiny_faces)
        models.update(tiny_faces=tiny_faces, blocked_phrase=tiny.BLOCKED_PHRASE)
    elif preset == "local":
        if not (guardrail_dir and text_guard_dir):
            raise PresetError("--preset local needs --guardrail-dir and --text-guard-dir")
        try:
            home = tiny.link_local_checkpoints(tempfile.mkdtemp(prefix="safety-worker-hf-"), guardrail_dir, text_guard_dir)
        except FileNotFoundError as e:
            raise PresetError(str(e)) from None
        os.environ["HF_HOME"] = str(home)
        os.environ["HF_HUB_OFFLINE"] = "1"
        models.update(guardrail_dir=str(Path(guardrail_dir).resolve()), text_guard_dir=str(Path(text_guard_dir).resolve()))
    elif hf_home:
        os.environ["HF_HOME"] = hf_home
    models["hf_home"] = os.environ.get("HF_HOME")
    models["text_guard_repo"] = TEXT_GUARD_REPO
    if preset == "local":  # the private hub cache's revisions name paths: fingerprint the files instead
        models["checkpoints"] = {repo: directory_fingerprint(d)
                                 for repo, d in ((guardrail_repo, guardrail_dir), (TEXT_GUARD_REPO, text_guard_dir))}
    else:
        models["checkpoints"] = {repo: hub_revision(repo) for repo in (guardrail_repo, TEXT_GUARD_REPO)}
    return models


# Where a checkpoint lies, not what it holds: left out of the checker identity (`proxy.checker_identity`), so a
# worker started with `--preset local` (a fresh private HF_HOME every start) or another --hf-home/--tiny-dir
# holding the same checkpoints keeps its identity; `checkpoints` (revisions, or content fingerprints) stands
# for the content instead.
LOCATION_KEYS = ("hf_home", "guardrail_dir", "text_guard_dir")


def hub_revision(repo_id: str) -> str | None:
    """The commit the hub cache in this process's HF_HOME resolves `repo_id` to (`refs/main`), None if absent.

    A hub revision is a commit hash: the same revision is the same files."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME") or
                                                         os.path.expanduser("~/.cache/huggingface"), "hub")
    ref = Path(hub) / ("models--" + repo_id.replace("/", "--")) / "refs" / "main"
    try:
        return ref.read_text().strip()
    except OSError:
        return None


def directory_fingerprint(directory: str | os.PathLike) -> str:
    """`sha256:` of every file under `directory` (links followed): relative path, size and content.

    Read in full once per start (about a second per GB): a local copy holds no revision that says what it is."""
    import hashlib

    root = Path(directory).resolve()
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()
