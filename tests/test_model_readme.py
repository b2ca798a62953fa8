"""The README's model example runs as written (on the session's tiny models)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_model_example_runs(tiny_models, tmp_path, monkeypatch, capsys):
    section = README.read_text().split("<!-- section: model -->")[1].split("<!-- /section: model -->")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setenv("THEWORLD_TINY_DIR", str(tiny_models[0].parent))  # already built: reused
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md#model", "exec"), {})
    assert (tmp_path / "theworld-demo" / "config.json").is_file()
    assert capsys.readouterr().out.startswith("[")
