"""What a conformance test claims (its @pytest.mark.req IDs) against what its assertions can be bound to, read from
the source: a claim no assertion can bind is an over-claim, a requirement credited without being checked.
A test parametrized with one requirement per parameter (`pytest.param("IA3", marks=pytest.mark.req(...))`) claims
each of them, one per item: its unnamed assertions bind to whichever its item claims."""

import ast

ASSERTIONS = {"check", "fail", "same_keys", "close", "equal", "all_close", "raises"}


def claims_and_bindings(source: str) -> dict[str, tuple[set, set]]:
    """test name -> (claimed IDs, IDs its assertions can be bound to), for every test function in `source`."""
    tree = ast.parse(source)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    out = {}
    for name, node in functions.items():
        if not name.startswith("test_"):
            continue
        claimed, per_item = _claimed(node)
        named, unnamed = _bindings(node, functions, set())
        out[name] = (claimed, named | (claimed if unnamed and (len(claimed) == 1 or per_item) else set()))
    return out


def _claimed(node: ast.FunctionDef) -> tuple[set[str], bool]:
    """(IDs claimed, whether each parameter of the test claims its own)."""
    for decorator in node.decorator_list:
        if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "req":
            return {arg.value for arg in decorator.args if isinstance(arg, ast.Constant)}, False
    per_item = {arg.value for decorator in node.decorator_list for call in ast.walk(decorator)
                if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "req"
                for arg in call.args if isinstance(arg, ast.Constant)}
    return per_item, bool(per_item)


def _bindings(node, functions: dict, seen: set) -> tuple[set, bool]:
    """(IDs named by req=..., whether some assertion names none), through the module's helpers it calls."""
    named, unnamed = set(), False
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        func = call.func
        if isinstance(func, ast.Attribute) and func.attr in ASSERTIONS and getattr(func.value, "id", "") == "run":
            req = next((k.value for k in call.keywords if k.arg == "req"), None)
            if isinstance(req, ast.Constant):
                named.add(req.value)
            elif req is None:
                unnamed = True
        elif isinstance(func, ast.Name) and func.id in functions and func.id not in seen:
            more, also = _bindings(functions[func.id], functions, seen | {func.id})
            named |= more
            unnamed |= also
    return named, unnamed
