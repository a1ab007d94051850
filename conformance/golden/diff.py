"""What differs between two fixture versions: cases, keys, tensors, configs and expected outputs."""

from pathlib import Path

import torch

from .store import cases


def _unordered(value):
    """peft writes sets as lists in hash-seed order: compare them as sorted lists."""
    return sorted(value) if isinstance(value, list) else value


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
            out += [f"{name}: adapter_config.json {k}: {ca.get(k)!r} -> {cb.get(k)!r}"
                    for k in sorted(set(ca) | set(cb)) if _unordered(ca.get(k)) != _unordered(cb.get(k))]
        ea, eb = a.expected(), b.expected()
        for key in sorted(set(ea) & set(eb)):
            diff = (ea[key] - eb[key]).abs().max().item()
            if diff:
                out.append(f"{name}: expected {key} logits moved by {diff:.3g}")
    return out or ["no change"]
