"""The paths users already rely on keep working wherever the modules behind them move (#30): the driver protocol,
the pytest plugin, the command, and every entry point pyproject.toml declares."""

import importlib

import pytest
import tomllib

from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ENTRY_POINTS = {f"{group}:{name}": target for group, points in PYPROJECT["project"]["entry-points"].items()
                for name, target in points.items()}
ENTRY_POINTS |= {f"scripts:{name}": target for name, target in PYPROJECT["project"]["scripts"].items()}


def test_the_driver_protocol_is_where_the_plug_in_guide_says():
    from conformance.api import Driver, Layout, NoExactMapping, load_driver, protocol_problems  # noqa: F401

    assert "NoExactMapping" in (ROOT / "docs" / "plug-in-your-library.md").read_text()


def test_the_plugin_and_the_suite_keep_their_paths():
    plugin = importlib.import_module("conformance.plugin")
    assert hasattr(plugin, "pytest_addoption") and hasattr(plugin, "run")
    assert importlib.util.find_spec("conformance.suite.test_fwd") is not None


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_declared_entry_point_resolves(name):
    module_name, _, attribute = ENTRY_POINTS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as missing:  # a driver for a library this environment lacks (torchtune, mlx-lm)
        if missing.name.split(".")[0] in ("conformance", "reference_impl"):
            raise
        pytest.skip(f"{module_name} needs {missing.name}, not installed here")
    target = module
    for part in filter(None, attribute.split(".")):
        target = getattr(target, part)
    assert callable(target) or module_name == "conformance.plugin"


def test_every_built_in_driver_name_points_at_a_declared_entry_point():
    from conformance import api

    declared = {target for name, target in ENTRY_POINTS.items() if name.startswith("peft_conformance.implementations")}
    assert set(api.BUILTIN_DRIVERS.values()) <= declared, set(api.BUILTIN_DRIVERS.values()) - declared
