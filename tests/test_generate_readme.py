"""The README's generate examples run as written (tiny models, a spawned tiny worker per command)."""
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_generate_examples_run(tiny_models, tmp_path):
    section = (REPO_ROOT / "README.md").read_text().split("<!-- section: generate -->")[1]
    script = re.search(r"```bash\n(.*?)```", section.split("<!-- /section: generate -->")[0], re.S).group(1)
    env = {**os.environ, "THEWORLD_TINY_DIR": str(tiny_models[0].parent), "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exit 1" in done.stdout  # the blocked prompt was refused
    assert "refused: the request was blocked" in done.stderr
    assert (tmp_path / "arrow.png").is_file() and (tmp_path / "rollout.mp4").is_file()
