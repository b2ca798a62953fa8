"""`python -m theworld.train` configuration: dataclasses, a JSON/YAML file, command-line overrides."""
import dataclasses
import json

import pytest

from theworld.train import ARGUMENT_CLASSES, parse_args


def test_defaults_need_no_arguments():
    model_args, data_args, train_args = parse_args([])
    assert data_args.data == "synthetic" and model_args.gemma_model is None
    assert train_args.safety_endpoint is None and not train_args.resume


def test_config_file_is_overridden_by_the_command_line(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_steps: 7\nlearning_rate: 0.01\nenable_world: false\n")
    model_args, _, train_args = parse_args(["--config", str(yaml_file), "--max-steps", "9", "--resume"])
    assert train_args.max_steps == 9 and train_args.learning_rate == 0.01 and train_args.resume
    assert model_args.enable_world is False
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"output_dir": "x", "safety_endpoint": "ipc:///tmp/w"}))
    _, _, train_args = parse_args(["--config", str(json_file), "--output-dir", "y"])
    assert train_args.output_dir == "y" and train_args.safety_endpoint == "ipc:///tmp/w"


def test_unknown_config_keys_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_step: 3\n")
    with pytest.raises(ValueError, match=r"unknown keys \['max_step'\]"):
        parse_args(["--config", str(bad)])


def test_every_key_is_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for cls in ARGUMENT_CLASSES:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{f.name} has no help text"
            assert f"--{f.name.replace('_', '-')}" in text or f"--{f.name}" in text
    for flag in ("--output-dir", "--max-steps", "--safety-endpoint", "--resume", "--config"):
        assert flag in text
