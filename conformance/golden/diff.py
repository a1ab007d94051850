"""What differs between two fixture versions: cases, keys, tensors, configs and expected outputs."""

from pathlib import Path

import torch

from .store import cases


def _unordered(value):
    """peft writes sets as lists in hash-seed order: compare them as sorted lists."""
    return sorted(value) if isinstance(value, list) else value


MOVED_CLASS = "(a zoo class moved: auto_mapping records where, nothing computes differently)"


def _config_change(name: str, key: str, old, new) -> str:
    """peft writes auto_mapping (the base model's class and module) for a model transformers does not know: this
    project's zoo classes. Their module moving is named as such, apart from changes in what the adapter does."""
    if key == "auto_mapping" and isinstance(old, dict) and isinstance(new, dict) and \
            old.get("base_model_class") == new.get("base_model_class") and \
            str(old.get("parent_library")).startswith("conformance.") and \
            str(new.get("parent_library")).startswith("conformance."):
        return f"{name}: {old['base_model_class']} now in {new['parent_library']} {MOVED_CLASS}"
    return f"{name}: adapter_config.json {key}: {old!r} -> {new!r}"


def changes(folder: Path, old: str, new: str) -> list[str]:
    """What differs between two fixture versions: cases, keys, tensors, configs and expected outputs."""
    out = []
    old_cases = {c.name: c for c in cases(folder) if c.version == old}
    new_cases = {c.name: c for c in cases(folder) if c.version == new}
    out += [f"case {n} added" for n in sorted(set(new_cases) - set(old_cases))]
    out += [f"case {n} removed" for n in sorted(set(old_cases) - set(new_cases))]
    for name in sorted(set(old_cases) & set(new_cases)):
        a, b = old_cases[name], new_cases[name]
        for adapter in b.manifest["adapters"]:
            ta, tb = a.tensors(adapter), b.tensors(adapter)
            if ta.keys() != tb.keys():
                out.append(f"{name}: keys differ: {sorted(set(ta) ^ set(tb))[:4]}")
            for key in sorted(set(ta) & set(tb)):
                if not torch.equal(ta[key], tb[key]):
                    out.append(f"{name}: tensor {key} differs")
            ca, cb = a.config(adapter), b.config(adapter)
            out += [_config_change(name, k, ca.get(k), cb.get(k))
                    for k in sorted(set(ca) | set(cb)) if _unordered(ca.get(k)) != _unordered(cb.get(k))]
        ea, eb = a.expected(), b.expected()
        for key in sorted(set(ea) & set(eb)):
            diff = (ea[key] - eb[key]).abs().max().item()
            if diff:
                out.append(f"{name}: expected {key} logits moved by {diff:.3g}")
    return out or ["no change"]
