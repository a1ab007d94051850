"""The house rules that keep reference_impl readable as a spec and each format fact in one place: checked, so that
they stay true."""

import ast
import dataclasses
import inspect
import re

import pytest

from reference_impl import METHODS, peft_format
from reference_impl.layers import LoraLayer
from tests.conftest import ROOT

LAYERS = ROOT / "reference_impl" / "layers.py"


def test_the_formula_comes_first_in_layers():
    lines = LAYERS.read_text().splitlines()
    formula = next(i for i, line in enumerate(lines, 1) if "self.lora_B[name](self.lora_A[name](" in line)
    assert formula <= 100, f"the LoRA formula is on line {formula} of layers.py"


def test_every_hook_the_base_class_calls_is_declared_on_it():
    """Every self.<method>(...) called in LoraLayer and its Merging mixin exists on LoraLayer itself (the base layer
    it holds is called too: it is an attribute, not a hook)."""
    called = set()
    for path in (LAYERS, ROOT / "reference_impl" / "merging.py"):
        tree = ast.parse(path.read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("LoraLayer", "Merging")):
            called |= {n.func.attr for n in ast.walk(cls) if isinstance(n, ast.Call)
                       and isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "self"}
    assert called and not {name for name in called - {"base_layer"} if not hasattr(LoraLayer, name)}


@pytest.mark.parametrize("config_class", [method.config_class for method in METHODS.values()],
                         ids=list(METHODS))
def test_every_config_field_says_what_it_does(config_class):
    """Each field, in the class that declares it (LoHa's shares LyCORISConfig's, IA3's TunerConfig's)."""
    for field in dataclasses.fields(config_class):
        owner = next(c for c in config_class.__mro__ if field.name in getattr(c, "__annotations__", {}))
        source = inspect.getsource(owner).splitlines()
        line = next(i for i, text in enumerate(source) if re.match(rf"\s+{field.name}: ", text))
        documented = "#" in source[line] or source[line - 1].strip().startswith("#")
        assert documented, f"{owner.__name__}.{field.name} has no comment"


def test_the_key_prefix_is_written_in_one_module():
    """As a string, anywhere in the code: everything else imports peft_format.PREFIX."""
    def writes_it(path) -> bool:
        return any(isinstance(node, ast.Constant) and isinstance(node.value, str) and peft_format.PREFIX in node.value
                   for node in ast.walk(ast.parse(path.read_text())))
    holders = sorted(str(p.relative_to(ROOT)) for folder in ("reference_impl", "conformance", "bench", "tests")
                     for p in (ROOT / folder).rglob("*.py") if writes_it(p))
    assert holders == ["reference_impl/peft_format.py"], holders


def test_the_readme_states_reference_impl_s_size():
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "reference_impl").glob("*.py"))
    assert f"about {round(lines, -2):,} readable lines" in (ROOT / "README.md").read_text(), lines


def test_no_import_circle_in_reference_impl():
    """Each module reads top to bottom: no module imports one that imports it back, directly or through others
    (lazy and TYPE_CHECKING imports included)."""
    package = ROOT / "reference_impl"
    graph = {}
    for path in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module} if node.module else {alias.name for alias in node.names}
        graph[path.stem] = {name.split(".")[0] for name in imported} & {p.stem for p in package.glob("*.py")}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in graph[start])

    circles = sorted(module for module in graph if reaches(module, module, {module}))
    assert not circles, f"modules on an import circle: {circles}"
