"""TheWorld: Gemma 3 + Cosmos world tokens, trained with autograd intact.

`import theworld` first installs the import guard (see `theworld._import_guard`): the Cosmos guardrail,
which switches autograd off at import, can never enter this process; it runs in the safety worker.
The model classes are imported on first use, so `import theworld` stays cheap.
"""
from theworld import _import_guard

_import_guard.install()

from theworld._import_guard import (  # noqa: E402  (the guard must be in place first)
    AutogradDisabledError,
    GuardrailImportError,
    assert_grad_enabled,
)

_LAZY = {
    "TheWorld": "theworld.modeling.modeling_theworld",
    "TheWorldConfig": "theworld.configuration_theworld",
    "TheWorldProcessor": "theworld.processing_theworld",
    "TheWorldCollator": "theworld.data.collator",
}
# Imported with the model: `TheWorld.from_pretrained` finds the processor through transformers'
# `AutoProcessor` registry (the model never imports it), and this module is what registers it.
_ALSO_IMPORT = {"TheWorld": "theworld.processing_theworld"}

__all__ = ["TheWorld", "TheWorldConfig", "TheWorldProcessor", "TheWorldCollator", "assert_grad_enabled", "AutogradDisabledError",
           "GuardrailImportError"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        if name in _ALSO_IMPORT:
            importlib.import_module(_ALSO_IMPORT[name])
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'theworld' has no attribute {name!r}")
