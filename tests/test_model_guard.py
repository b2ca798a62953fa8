"""The Cosmos guardrail can never switch autograd off in a theworld process (each case in a fresh
interpreter, since imports are process-wide)."""
import subprocess
import sys

import pytest
import torch

import theworld
from theworld import AutogradDisabledError, assert_grad_enabled


def run_python(code: str, tmp_path=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_retinaface_imported_before_theworld_fails_loudly():
    # retinaface switches grad off at import; importing theworld afterwards must refuse, not train silently.
    result = run_python("import retinaface, torch\nassert not torch.is_grad_enabled()\nimport theworld\n")
    assert result.returncode != 0
    assert "GuardrailImportError" in result.stderr
    assert "retinaface was imported before theworld" in result.stderr
    assert "safety worker" in result.stderr


def test_grad_switched_off_before_theworld_fails_loudly_at_construction(tiny_models):
    # Even without the guardrail, a process with grad off cannot build or train TheWorld.
    gemma_dir, cosmos_dir = tiny_models
    code = f"""
import torch
import theworld
from theworld import TheWorld, AutogradDisabledError
torch.set_grad_enabled(False)
try:
    TheWorld.from_pretrained({str(gemma_dir)!r}, cosmos_model={str(cosmos_dir)!r})
except AutogradDisabledError as error:
    print("REFUSED", error)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED autograd is disabled" in result.stdout


@pytest.mark.parametrize("module", ["cosmos_guardrail", "retinaface", "retinaface.inference_framework"])
def test_guardrail_imports_after_theworld_raise_and_grad_stays_on(module):
    code = f"""
import torch, theworld
try:
    import {module}
except ImportError as error:
    print(type(error).__name__, error)
print("grad", torch.is_grad_enabled())
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "GuardrailImportError" in result.stdout and "safety worker" in result.stdout
    assert "grad True" in result.stdout


def test_cosmos_pipeline_cannot_be_touched_but_submodules_can():
    code = """
import torch, theworld
import diffusers
from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
try:
    diffusers.Cosmos2VideoToWorldPipeline
except Exception as error:
    print("BLOCKED", "safety worker" in str(error))
print("grad", torch.is_grad_enabled())
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "BLOCKED True" in result.stdout and "grad True" in result.stdout


def test_guard_is_installed_in_this_process():
    with pytest.raises(theworld.GuardrailImportError, match="safety worker"):
        import cosmos_guardrail  # noqa: F401
    assert torch.is_grad_enabled()


def test_assert_grad_enabled_names_the_fix():
    assert_grad_enabled()
    with torch.no_grad(), pytest.raises(AutogradDisabledError, match="wrap only inference in torch.no_grad"):
        assert_grad_enabled("training")
