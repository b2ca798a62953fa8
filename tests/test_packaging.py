import importlib


def test_packages_import():
    for name in ("theworld", "safety_worker"):
        assert importlib.import_module(name).__doc__
