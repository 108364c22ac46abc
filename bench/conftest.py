"""Collect ``bench_*.py`` when pytest walks ``bench/`` (``pytest bench/ --benchmark-only``);
files named on the command line are collected by pytest itself."""
import pytest


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
