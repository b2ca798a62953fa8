"""Keep the Cosmos guardrail (and the autograd switch it flips) out of every theworld process.

`cosmos_guardrail` imports `retinaface`, whose `inference_framework.py` runs
`torch.set_grad_enabled(False)` at import time; diffusers' Cosmos pipelines import `cosmos_guardrail`.
A process that touches any of them silently trains nothing. `import theworld` therefore

- refuses to start if they are already imported or if autograd is already off (the damage is done:
  failing loudly beats training silently), and
- installs a meta-path finder that turns every later import of them into an `ImportError` naming the
  fix: run the guard in the safety worker (`safety_worker.spawn_worker` / `SafetyClient`).

The finder answers `importlib.util.find_spec` with a spec (so diffusers still believes the package is
installed and keeps its real code path) whose loader raises on execution: importing
`Cosmos2VideoToWorldPipeline` in a theworld process fails with this module's message.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

BLOCKED_PACKAGES = ("cosmos_guardrail", "retinaface")

_USE_THE_WORKER = (
    "Run the Cosmos guardrail in the safety worker instead: `from safety_worker import spawn_worker, "
    "SafetyClient` (or `python -m safety_worker serve`) and check text and frames through the client. "
    "In a theworld process load Cosmos submodules directly (AutoencoderKLWan, CosmosTransformer3DModel), "
    "never diffusers' Cosmos pipelines."
)


class GuardrailImportError(ImportError):
    """Raised when the Cosmos guardrail (or retinaface) would be imported into a theworld process."""


class AutogradDisabledError(RuntimeError):
    """Raised when theworld would build or train a model while autograd is off."""


def _blocked_root(fullname: str) -> str | None:
    root = fullname.partition(".")[0]
    return root if root in BLOCKED_PACKAGES else None


class _RefusingLoader(importlib.abc.Loader):
    def create_module(self, spec):
        raise GuardrailImportError(
            f"`{spec.name}` cannot be imported in a theworld process: importing it runs "
            f"`torch.set_grad_enabled(False)` (retinaface) and silently switches autograd off for the whole "
            f"process. {_USE_THE_WORKER}"
        )

    def exec_module(self, module):  # pragma: no cover - create_module always raises first
        raise GuardrailImportError(f"`{module.__name__}` cannot be imported in a theworld process. {_USE_THE_WORKER}")


class _GuardrailBlocker(importlib.abc.MetaPathFinder):
    """Answers imports of the blocked packages with a loader that raises `GuardrailImportError`."""

    def find_spec(self, fullname, path=None, target=None):
        if _blocked_root(fullname) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _RefusingLoader())


def already_imported() -> list[str]:
    """The blocked packages (or any of their submodules) present in `sys.modules`."""
    return sorted({root for name, module in list(sys.modules.items())
                   if module is not None and (root := _blocked_root(name)) is not None})


def assert_grad_enabled(what: str = "training") -> None:
    """Raise `AutogradDisabledError` unless `torch.is_grad_enabled()`: call before building or training.

    Grad mode is thread-local and an import elsewhere can flip it; a loud error here replaces a run whose
    loss never requires grad.
    """
    import torch

    if torch.is_grad_enabled():
        return
    culprits = already_imported()
    cause = (
        f"{', '.join(culprits)} was imported in this process and switched it off"
        if culprits
        else "something turned it off (torch.no_grad(), torch.set_grad_enabled(False), or an import such as "
        "retinaface / cosmos_guardrail)"
    )
    raise AutogradDisabledError(
        f"autograd is disabled ({cause}), so {what} would silently not learn. Build and train TheWorld with grad "
        f"enabled; wrap only inference in torch.no_grad(). {_USE_THE_WORKER}"
    )


def install() -> None:
    """Fail if the guardrail is already here or autograd is off, then block later imports. Idempotent."""
    culprits = already_imported()
    if culprits:
        raise GuardrailImportError(
            f"{', '.join(culprits)} was imported before theworld; it switches autograd off process-wide "
            f"(torch.is_grad_enabled() may now be False in this thread). Import theworld in a process that never "
            f"imports them. {_USE_THE_WORKER}"
        )
    if "torch" in sys.modules:  # without torch imported yet, nothing can have switched grad off
        assert_grad_enabled("importing theworld")
    if not any(isinstance(finder, _GuardrailBlocker) for finder in sys.meta_path):
        sys.meta_path.insert(0, _GuardrailBlocker())
