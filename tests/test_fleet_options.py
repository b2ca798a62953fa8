"""`serve --ray`'s options, without starting Ray: what is refused, and what the fleet's front imports."""
import os
import subprocess
import sys

import pytest

from fixtures_worker import REPO_ROOT
from safety_worker.fleet import FleetError, parse_replicas

ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))


@pytest.mark.parametrize("spec, expected", [("2", (2, 2)), ("1,4", (1, 4)), ("0", (0, 0))])
def test_replicas_are_a_count_or_autoscaling_bounds(spec, expected):
    assert parse_replicas(spec) == expected


@pytest.mark.parametrize("spec", ["-1", "3,2", "0,2", "two", "1,2,3"])
def test_bad_replica_specs_are_refused_with_the_form_to_use(spec):
    with pytest.raises(FleetError, match="N or MIN,MAX"):
        parse_replicas(spec)


@pytest.mark.parametrize("args, message", [
    (["--replicas", "1,3"], "MIN,MAX \\(autoscaling\\) needs --ray"),
    (["--replica-gpus", "1"], "--replica-gpus apply to a Ray fleet only: add --ray"),
    (["--ray", "--replicas", "3,1"], "--replicas must be N or MIN,MAX"),
])
def test_serve_refuses_fleet_options_that_do_not_fit_before_starting_anything(tmp_path, args, message):
    endpoint = f"ipc://{tmp_path}/w/worker.sock"
    r = subprocess.run([sys.executable, "-m", "safety_worker", "serve", "--endpoint", endpoint, *args],
                       capture_output=True, text=True, env=ENV, timeout=120, cwd=str(REPO_ROOT))
    assert r.returncode == 2
    assert __import__("re").search(message, r.stderr), r.stderr[-2000:]


def test_the_fleet_front_module_imports_neither_torch_nor_ray_nor_the_guard():
    """The front is a Ray driver but holds no model: importing its module (and the front it shares with the
    --replicas front) loads nothing heavy; Ray itself is imported when the fleet starts."""
    code = ("import sys, safety_worker.fleet, safety_worker.proxy; "
            "print(sorted(m for m in ('torch', 'ray', 'cosmos_guardrail', 'retinaface') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
