"""Adapted models for a case: the implementation under test and, when peft is installed, the oracle, both
wrapped under the same seed and loaded with the same non-zero adapter values.

Adapter values are never left at their initial values (B = 0 would make most checks pass whatever the bug).
"""

import copy
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from . import checks, models
from .api import Driver
from .strategies import Case


@dataclass
class Adapted:
    """A wrapped model with the case it came from; `output()` runs the case's inputs through it."""

    driver: Driver
    model: nn.Module
    case: Case
    device: str
    dtype: torch.dtype
    values: dict = field(default_factory=dict)
    original: Optional[nn.Module] = None  # the base model object that was wrapped
    original_modules: dict = field(default_factory=dict)  # its modules by name, before wrapping
    original_params: dict = field(default_factory=dict)  # its parameters by name, before wrapping

    @property
    def inputs(self) -> dict:
        return models.inputs(self.case.model, self.case.inputs_seed, self.device, self.dtype)

    def output(self, model: Optional[nn.Module] = None) -> torch.Tensor:
        return models.run(self.case.model, self.model if model is None else model, self.inputs)

    def base(self) -> nn.Module:
        """A fresh copy of the unadapted base model."""
        return models.build(self.case.model, self.case.model_seed, self.device, self.dtype)


def wrap(driver: Driver, case: Case, device: str, dtype: torch.dtype, adapter_name: str = "default") -> Adapted:
    """Build the case's base model and wrap it, the torch seed set to case.init_seed just before, then switch
    it to eval mode: peft creates its LoRA layers in train mode even inside an eval-mode model."""
    base = models.build(case.model, case.model_seed, device, dtype)
    modules, params = dict(base.named_modules()), dict(base.named_parameters())
    torch.manual_seed(case.init_seed)
    model = driver.wrap(base, copy.deepcopy(case.config), adapter_name)
    model.eval()
    return Adapted(driver, model, case, device, dtype, original=base, original_modules=modules,
                   original_params=params)


def adapter_values(initial: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Non-zero values for every adapter tensor: its initial value plus N(0, 0.1^2) noise seeded per key."""
    values = {}
    for key, tensor in sorted(initial.items()):
        generator = torch.Generator().manual_seed((seed + zlib.crc32(key.encode())) % 2**63)
        noise = 0.1 * torch.randn(tuple(tensor.shape), generator=generator)
        values[key] = (tensor.detach().float().cpu() + noise).to(tensor.dtype)
    return values


def load_values(adapted: Adapted, values: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Load `values` through the driver and read them back: they must come back unchanged (LORA-KEYS-007)."""
    device_values = {k: v.to(adapted.device) for k, v in values.items()}
    adapted.driver.load_adapter_state_dict(adapted.model, device_values, adapter_name)
    readback = adapted.driver.adapter_state_dict(adapted.model, adapter_name)
    checks.same_keys(readback, values, "LORA-KEYS-001", "adapter keys (implementation vs the values loaded)")
    for key, value in values.items():
        checks.equal(readback[key].detach().cpu(), value, "LORA-KEYS-007", f"value read back for {key}")
    adapted.values = values


def adapted_pair(impl: Driver, oracle: Optional[Driver], case: Case, device: str,
                 dtype: torch.dtype = torch.float32) -> tuple[Adapted, Optional[Adapted]]:
    """The case wrapped by the implementation and by the oracle, both loaded with the same values, drawn
    around the oracle's initial values (the implementation's when there is no oracle)."""
    mine = wrap(impl, case, device, dtype)
    theirs = wrap(oracle, case, device, dtype) if oracle is not None else None
    source = theirs or mine
    values = adapter_values(source.driver.adapter_state_dict(source.model), case.values_seed)
    if theirs is not None:
        load_values(theirs, values)
    load_values(mine, values)
    return mine, theirs


def with_config(case: Case, **changes) -> Case:
    """The same case with some config fields changed; a field set to None is removed."""
    config = {**case.config, **changes}
    return case._replace(config={k: v for k, v in config.items() if v is not None})


def scaling(config: dict) -> float:
    """lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (peft's defaults: r 8, alpha 8)."""
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    return alpha / r ** 0.5 if config.get("use_rslora") else alpha / r


def factors(values: dict[str, torch.Tensor], path: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the adapted module at `path`, from peft-keyed values (Linear/conv or Embedding naming)."""
    prefix = f"base_model.model.{path}."
    if prefix + "lora_embedding_A" in values:
        return values[prefix + "lora_embedding_A"], values[prefix + "lora_embedding_B"]
    return values[prefix + "lora_A.weight"], values[prefix + "lora_B.weight"]


def adapted_modules(keys) -> set[str]:
    """The module paths that hold a LoRA adapter, from peft keys ("base_model.model." stripped)."""
    paths = {key.split(".lora_")[0] for key in keys if ".lora_" in key}
    return {p.removeprefix("base_model.model.") for p in paths}


def initial_state(driver: Driver, case: Case, device: str) -> dict[str, torch.Tensor]:
    """The adapter tensors right after wrapping the case (fp32 base), before any values are loaded."""
    return driver.adapter_state_dict(wrap(driver, case, device, torch.float32).model)
