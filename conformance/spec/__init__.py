"""The requirement registry and tolerance classes, read from requirements.toml and tolerances.toml.

SPEC.md is rendered from them by `render_markdown()` (CLI: `peft-conformance spec`).
"""

import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).parent
LEVELS = ("MUST", "SHOULD")
COMPARISONS = ("exact", "close", "structural")
SCOPES = ("driver", "reference", "plugin", "consumer")
DTYPES = ("float32", "bfloat16", "float16")
HALF_PRECISION_CLASSES = {"bfloat16": "bf16", "float16": "fp16"}
# The SPEC.md section of QLoRA and of each method besides LoRA (whose requirements are grouped by area).
METHOD_NAMES = {"QLORA": "QLoRA (LoRA on quantized bases)", "IA3": "IA3 (other methods)",
                "LOHA": "LoHa (other methods)", "LOKR": "LoKr (other methods)"}


@dataclass(frozen=True)
class Requirement:
    id: str
    title: str
    level: str
    comparison: str
    source: str
    scope: str
    tolerance: str = ""
    capabilities: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    quirk: str = ""
    notes: str = ""
    versions: str = ""
    deprecated: bool = False
    dtypes: tuple[str, ...] = ("float32",)  # the base-model dtypes it is checked in (--peft-dtype)

    def tolerance_class(self, dtype: str = "float32") -> str:
        """The class a comparison of this requirement uses on a base model of `dtype`: its own in float32 (and
        "exact" and structural comparisons stay exact in every dtype); bf16 or fp16 for a half-precision base."""
        if self.comparison != "close" or self.tolerance == "exact":
            return "exact"
        return self.tolerance if dtype == "float32" else HALF_PRECISION_CLASSES[dtype]

    @property
    def area(self) -> str:
        return self.id.split("-")[1]

    @property
    def method(self) -> str:
        """LORA, IA3, LOHA or LOKR: the PEFT method the requirement is about."""
        return self.id.split("-")[0]

    @property
    def anchor(self) -> str:
        return self.id.lower()


@dataclass(frozen=True)
class Tolerance:
    name: str
    description: str
    rtol: float = 0.0
    atol: float = 0.0
    atol_per_unit: bool = False  # atol scales with the tensor's largest |value| (when above 1)
    extra: dict = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return self.name == "exact"


@cache
def requirements() -> dict[str, Requirement]:
    raw = tomllib.loads((HERE / "requirements.toml").read_text())
    out = {}
    for req_id, entry in raw.items():
        entry = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
        out[req_id] = Requirement(id=req_id, **entry)
    return out


@cache
def tolerances() -> dict[str, Tolerance]:
    raw = tomllib.loads((HERE / "tolerances.toml").read_text())
    return {name: Tolerance(name=name, **entry) for name, entry in raw.items()}


def requirement(req_id: str) -> Requirement:
    try:
        return requirements()[req_id]
    except KeyError:
        raise KeyError(f"unknown requirement {req_id!r}; see conformance/spec/requirements.toml") from None


def render_markdown() -> str:
    """SPEC.md: every requirement by area, with level, comparison, tolerance, source and notes."""
    lines = ["# LoRA conformance spec, with QLoRA, IA3, LoHa and LoKr (version 1: peft 0.21.x semantics)", "",
             "Generated from `conformance/spec/requirements.toml` by `peft-conformance spec`; do not edit.", "",
             "Scopes: *driver* requirements are checked for every implementation by `conformance.suite`; "
             "*reference* ones on `reference_impl` by `tests/`; *plugin* ones on the suite itself; *consumer* ones on "
             "logits computed in another process from the consumer corpus, by `peft-conformance golden-check "
             "--corpus` (docs/consumers.md).", "",
             "A requirement applies to a driver that declares the capabilities it *needs*, on the cases inside the "
             "driver's scope; key, shape and value requirements on live adapter tensors are compared through the "
             "driver's layout mapping when it declares one (docs/verdicts.md).", "",
             "## Tolerance classes", "", "| class | rtol | atol | meaning |", "|---|---|---|---|"]
    for tol in tolerances().values():
        lines.append(f"| `{tol.name}` | {tol.rtol or '-'} | {tol.atol or '-'} | {tol.description} |")
    by_area: dict[str, list[Requirement]] = {}
    for req in requirements().values():
        by_area.setdefault(req.area if req.method == "LORA" else METHOD_NAMES[req.method], []).append(req)
    for area, reqs in by_area.items():
        lines += ["", f"## {area}", ""]
        for req in reqs:
            lines += [f'### <a id="{req.anchor}"></a>{req.id}{" (deprecated)" if req.deprecated else ""}', "",
                      f"**{req.level}**: {req.title}.", ""]
            facts = [f"comparison: {req.comparison}" + (f" (`{req.tolerance}`)" if req.tolerance else ""),
                     f"scope: {req.scope}"]
            if req.capabilities:
                facts.append("needs: " + ", ".join(f"`{c}`" for c in req.capabilities))
            if req.depends_on:
                facts.append("depends on: " + ", ".join(f"[{d}](#{d.lower()})" for d in req.depends_on))
            if req.dtypes != ("float32",):
                facts.append("base dtypes: " + ", ".join(req.dtypes))
            lines += ["- " + "; ".join(facts), f"- source: {req.source}"]
            lines += [f"- {label}: {text}" for label, text in
                      (("peft quirk", req.quirk), ("note", req.notes), ("other peft releases", req.versions)) if text]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
