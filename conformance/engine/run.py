"""`run`, the one fixture a conformance test works through: the driver under test and the oracle, the device and
dtype of the test's axis, the draws (always inside the driver's scope) and the assertions (bound to the test's
requirements and recorded on its pytest item).

    @pytest.mark.req("LORA-FWD-006")
    @given(data=st.data())
    def test_output_matches_peft(run, device, dtype, data):
        mine, theirs = run.pair(run.draw(data))
        run.close(mine.output(), theirs.output(), "adapted output vs peft's")

A test opts into the device and dtype axes by naming `device` and `dtype` among its arguments (the plugin then
parametrizes it); `run.device` and `run.dtype` are the axis values (cpu and float32 otherwise).
"""

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import currently_in_test_context, reject

from .. import api, spec
from ..zoo import models
from . import checks, harness, scope
from .harness import PREFIX, Adapted
from .strategies import Case, cases, overlap_candidates, overlapping_patterns
from .verdict import SuiteError, Verdict

NOT_APPLICABLE, NOT_RUN = "not applicable: ", "not run: "


class EntitledDriver:
    """The driver as one test sees it: a member that only a capability provides (unload, save, merge, ...) may be
    called only when a requirement the test checks declares that capability. Otherwise a driver without the member
    would fail a requirement it never claimed, so the call is a suite bug (LORA-LOAD-007 once called unload with only
    save_load declared). Equal to, and hashed as, the driver it wraps, so caches keyed on the driver still hit."""

    def __init__(self, driver, entitled: frozenset, requirements: tuple):
        self.driver, self._entitled, self._requirements = driver, entitled, requirements

    def __getattr__(self, name):
        if name in api.GATED_MEMBERS and name not in self._entitled:
            raise SuiteError(f"the test calls the driver's {name}(), which none of its requirements "
                             f"{list(self._requirements)} entitles by its capabilities")
        return getattr(self.driver, name)

    def __eq__(self, other):
        return self.driver == getattr(other, "driver", other)

    def __hash__(self):
        return hash(self.driver)


@dataclass(repr=False)
class Run:
    impl: api.Driver
    oracle_driver: Optional[api.Driver]
    device: str
    dtype: torch.dtype
    verdict: Verdict

    def __repr__(self) -> str:  # hypothesis prints the test's arguments with a failure: keep it short
        return f"run({self.impl.name}, {self.device}, {str(self.dtype).removeprefix('torch.')})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis' printer would list every field, measurements too
        printer.text(repr(self))

    def __post_init__(self):
        needed = {c for req in self.verdict.applicable for c in spec.requirement(req).capabilities}
        self.impl = EntitledDriver(self.impl, api.members_entitled(needed), self.verdict.applicable)
        # The assertions, bound to this test's requirements and recorded on its item (conformance/engine/verdict.py).
        for name in ("check", "fail", "raises", "same_keys", "close", "equal", "all_close", "require", "compared_as"):
            setattr(self, name, getattr(self.verdict, name))

    # --- the implementations ------------------------------------------------------------------------------------

    @property
    def oracle(self) -> api.Driver:
        """peft's driver; without peft, the test stops as "not run"."""
        if self.oracle_driver is None:
            pytest.skip(f"{NOT_RUN}peft is not installed, so there is no oracle to compare with")
        return self.oracle_driver

    # --- cases --------------------------------------------------------------------------------------------------

    def draw(self, data, *, single_layer: Optional[bool] = None, kinds: Optional[set] = None, extras: bool = True,
             model: Optional[str] = None, config: Optional[dict] = None, overlap: bool = True,
             label: str = "case") -> Case:
        """A case in the driver's scope; `config` overrides drawn fields (None removes one). A requirement with no
        case in the scope is "not applicable"; a drawn case the driver's `supports` refuses is not used."""
        if not model and not scope.models_in_scope(self.impl, kinds, single_layer):
            wanted = f" with {'/'.join(sorted(kinds))} layers" if kinds else ""
            pytest.skip(f"{NOT_APPLICABLE}no zoo model{wanted} is in {self.impl.name}'s scope")
        case = data.draw(cases(self.impl, single_layer, kinds, extras, model, overlap), label=label)
        return self.admit(with_config(case, **(config or {})))

    def draw_overlapping_patterns(self, data) -> Case:
        """A case whose pattern keys overlap (strategies.overlapping_patterns), in the driver's scope."""
        if not overlap_candidates(self.impl):
            pytest.skip(f"{NOT_APPLICABLE}no zoo model with nested linear layers is in {self.impl.name}'s scope")
        return self.admit(data.draw(overlapping_patterns(self.impl), label="case"))

    def admit(self, case: Case) -> Case:
        """Check a drawn case against the driver's scope (the example is dropped when outside) and start it."""
        self.within_scope(case)
        self.verdict.start_example(case)
        return case

    def within_scope(self, case: Case, adapter_name: str = "default") -> None:
        """Drop the current example when `case` (or another adapter added to it) is outside the driver's scope."""
        base = models.build(case.model, case.model_seed, self.device, self.dtype)  # `supports` sees the axis
        reason = scope.out_of_scope(self.impl, base, case.config, adapter_name)
        if reason:
            self.verdict.out_of_scope[reason] = self.verdict.out_of_scope.get(reason, 0) + 1
            reject()

    def fixed(self, model: str, config: dict, adapter_name: str = "default", base: Optional[torch.nn.Module] = None
              ) -> Case:
        """A fixed case (not drawn): "not applicable" when outside the driver's scope."""
        base = base if base is not None else models.build(model, 0, self.device, self.dtype)
        reason = scope.out_of_scope(self.impl, base, config, adapter_name)
        if reason:
            pytest.skip(f"{NOT_APPLICABLE}{reason}")
        case = Case(model, config)
        self.verdict.start_example(case)
        return case

    def fixed_target(self, kinds: Optional[set] = None, prefer: tuple = ("gpt2-tiny", "mlp")) -> tuple[str, str]:
        """A (model, target) in the driver's scope, for a test about something other than targeting."""
        found = scope.first_case(self.impl, kinds, prefer)
        if found is None:
            pytest.skip(f"{NOT_APPLICABLE}no zoo model is in {self.impl.name}'s scope")
        return found

    # --- adapted models (conformance/engine/harness.py does the work; these check what comes back) ---------------

    def wrap(self, case: Case, driver: Optional[api.Driver] = None, dtype: Optional[torch.dtype] = None,
             adapter_name: str = "default") -> Adapted:
        return harness.wrap(driver or self.impl, case, self.device, dtype or self.dtype, adapter_name)

    def pair(self, case: Case, dtype: Optional[torch.dtype] = None) -> tuple[Adapted, Adapted]:
        """The case wrapped by the implementation and by peft, both loaded with the same values, drawn around
        peft's initial values."""
        mine, theirs = harness.pair(self.impl, self.oracle, case, self.device, dtype or self.dtype)
        self._read_back(mine)
        return mine, theirs

    def adapted(self, case: Case, dtype: Optional[torch.dtype] = None) -> Adapted:
        """The case wrapped by the implementation alone, loaded with values drawn around its initial values."""
        mine = self.wrap(case, dtype=dtype)
        self.load(mine, harness.adapter_values(harness.initial_values(mine), case.values_seed))
        return mine

    def add_second_adapter(self, adapted: Adapted, config: dict, values: Optional[dict] = None,
                           adapter_name: str = "other") -> dict:
        """Add an adapter to `adapted` through its driver and load `values` into it (drawn around its initial values
        when None, seeded by the case); returns the values, for the other implementation."""
        harness.add_adapter(adapted, config, adapter_name)
        if values is None:
            values = harness.adapter_values(self.peft_state(adapted.model, adapter_name), adapted.case.values_seed + 1)
        self.load(adapted, values, adapter_name)
        return values

    def load(self, adapted: Adapted, values: dict, adapter_name: str = "default") -> None:
        """Load peft-layout `values` through the driver (mapped to its layout); the implementation under test must
        read them back unchanged."""
        harness.load(adapted, values, adapter_name)
        self._read_back(adapted, adapter_name)

    def _read_back(self, adapted: Adapted, adapter_name: str = "default") -> None:
        """The same keys (LORA-KEYS-001) and values (LORA-KEYS-007) come back as were handed to the driver: both are
        preconditions of every test that loads values. peft's side is not checked (it is the oracle). Values are
        compared in the dtype the driver stores them in: a driver that keeps adapters in the base's half precision
        rounds peft's float32 values as it loads them, which LORA-INIT-006 judges once, not every test that loads."""
        if adapted.driver is not self.impl:
            return
        own, readback = adapted.handed[adapter_name], self.impl.adapter_state_dict(adapted.model, adapter_name)
        problem = checks.key_difference(readback, own, "adapter keys read back (vs the values loaded)")
        self.require(problem is None, "LORA-KEYS-001", str(problem))
        for key in sorted(own):
            stored = readback[key].detach().cpu()
            same = torch.equal(stored, own[key].detach().cpu().to(stored.dtype))
            self.require(same, "LORA-KEYS-007", f"{key} reads back different from the value loaded (compared in "
                                                f"{stored.dtype}, the dtype it reads back in)")

    def peft_state(self, model: torch.nn.Module, adapter_name: str = "default") -> dict:
        """The implementation's adapter in peft's layout. Where its layout has no exact peft form (layout.to_peft
        raises NoExactMapping), the drawn case is dropped and another drawn: other targets, or values loaded from
        peft's layout, may map. A fixed test stops as "not run", naming why."""
        try:
            return harness.peft_state(self.impl, model, adapter_name)
        except api.NoExactMapping as error:
            reason = f"{self.impl.name}'s tensors have no exact form in peft's layout: {error}"
            if currently_in_test_context():
                self.verdict.unmappable[reason] = self.verdict.unmappable.get(reason, 0) + 1
                reject()
            pytest.skip(NOT_RUN + reason)

    def peft_keys(self, adapted: Adapted, adapter_name: str = "default") -> set[str]:
        """The peft keys of the implementation's adapter: names only, so values need not map. Where the driver's
        own tensors have no peft form (a fresh fused adapter whose copies of A differ), the same case loaded with
        values from peft's layout names them: the keys depend on what is adapted, not on the values."""
        try:
            return set(harness.peft_state(self.impl, adapted.model, adapter_name))
        except api.NoExactMapping:
            return set(self.peft_state(self.adapted(adapted.case).model, adapter_name))

    def initial_state(self, case: Case, driver: Optional[api.Driver] = None) -> dict:
        """The adapter tensors right after wrapping the case (fp32 base), in peft's layout."""
        driver = driver or self.impl
        model = harness.wrap(driver, case, self.device, torch.float32).model
        return self.peft_state(model) if driver is self.impl else driver.adapter_state_dict(model)

    def initial_keys(self, case: Case, driver: Optional[api.Driver] = None) -> set[str]:
        """The peft keys right after wrapping the case (names only: see peft_keys)."""
        if driver is not None and driver is not self.impl:
            return set(self.initial_state(case, driver))
        return self.peft_keys(harness.wrap(self.impl, case, self.device, torch.float32))

    def gradients(self, adapted: Adapted) -> dict[str, torch.Tensor]:
        """The gradients of the adapter's tensors after a backward pass, in peft's layout; the implementation's must
        reach its live tensors (LORA-KEYS-008)."""
        trained = harness.trainable(adapted)
        if adapted.driver is self.impl and trained:
            self.require(any(t.grad is not None for t in trained.values()), "LORA-KEYS-008",
                         f"none of the {len(trained)} trainable adapter tensors has a .grad after backward: "
                         "adapter_state_dict must return live tensors")
        return harness.gradients(adapted, trained)

    def factors(self, values: dict, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the adapted module at `path` from peft-keyed values, on the run's device."""
        prefix = f"{PREFIX}{path}."
        for a, b in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
            if prefix + a in values and prefix + b in values:
                return values[prefix + a].to(self.device), values[prefix + b].to(self.device)
        self.require(False, "LORA-KEYS-001", f"no {prefix}lora_A.weight / lora_B.weight (nor lora_embedding_A/B) "
                                             f"among the adapter keys {sorted(values)[:6]}")

    def adapted_paths(self, keys, base: torch.nn.Module) -> set[str]:
        """The modules that peft `keys` (or a peft-keyed state's) adapt; one `base` lacks fails LORA-KEYS-001."""
        paths, modules = harness.adapted_modules(keys), dict(base.named_modules())
        self.require(paths <= set(modules), "LORA-KEYS-001", "adapter keys for modules the base model does not "
                                                             f"have: {sorted(paths - set(modules))[:4]}")
        return paths

    def tensor(self, values: dict, key: str, req: str = "LORA-KEYS-001") -> torch.Tensor:
        """values[key] on the run's device; a missing key fails the keys requirement `req` (never a KeyError)."""
        self.require(key in values, req, f"no key {key} among the adapter keys {sorted(values)[:6]}")
        return values[key].to(self.device)


def with_config(case: Case, **changes) -> Case:
    """The same case with some config fields changed; a field set to None is removed."""
    config = {**case.config, **changes}
    return case._replace(config={k: v for k, v in config.items() if v is not None})
