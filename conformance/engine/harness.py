"""An adapted model under test, and everything done to one: wrapping a case's base under the case's seed, loading
adapter values through the driver (in its own layout), reading its adapter back in peft's layout, adding a second
adapter, and carrying gradients back to peft's layout. `pair` gives the implementation's and peft's, loaded with the
same non-zero values. run.py checks what these return against requirements; nothing here asserts or calls back up.

Values are drawn in peft's layout (keys and shapes as peft saves them) and reach a driver with its own layout
through `layout.to_driver`. Adapter values are never left at their initial values (B = 0 would make most checks
pass whatever the bug).
"""

import copy
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from reference_impl import peft_format
from reference_impl.peft_format import PREFIX  # peft keys: PREFIX + module path + ".lora_A.weight"

from .. import api
from ..api import Driver
from ..zoo import models
from .strategies import Case


@dataclass
class Adapted:
    """A wrapped model with the case it came from; `output()` runs the case's inputs through it."""

    driver: Driver
    model: nn.Module
    case: Case
    device: str
    dtype: torch.dtype
    values: dict = field(default_factory=dict)  # the values loaded, in peft's layout
    original: Optional[nn.Module] = None  # the base model object that was wrapped
    original_modules: dict = field(default_factory=dict)  # its modules by name, before wrapping
    original_params: dict = field(default_factory=dict)  # its parameters by name, before wrapping
    handed: dict = field(default_factory=dict)  # adapter name -> the tensors handed to the driver, in its layout

    @property
    def inputs(self) -> dict:
        return models.inputs(self.case.model, self.case.inputs_seed, self.device, self.dtype)

    def output(self, model: Optional[nn.Module] = None) -> torch.Tensor:
        return models.run(self.case.model, self.model if model is None else model, self.inputs)

    def base(self) -> nn.Module:
        """A fresh copy of the unadapted base model, frozen as wrapping leaves a base. The module state matters to
        the numbers: torch picks its attention kernel by whether the attention mask requires grad (T5's position
        bias comes from a parameter), and on the CPU the flash kernel and the math path round half precision
        differently (bf16: 0.03 apart in T5's logits)."""
        return models.build(self.case.model, self.case.model_seed, self.device, self.dtype).requires_grad_(False)

    @property
    def path(self) -> str:
        """The adapted layer of a single-layer model ("layer", "c_attn")."""
        return models.ZOO[self.case.model].layer

    def base_layer(self) -> nn.Module:
        """A fresh copy of that layer, unadapted."""
        return self.base().get_submodule(self.path)


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
    """Non-zero values for every adapter tensor: its initial value plus N(0, 0.1^2) noise seeded per key. Frozen base
    weights saved beside the adapter ('...embed_tokens.base_layer.weight', LORA-KEYS-010) keep their values: they
    are the base model's, and tests compare with the unadapted base."""
    values = {}
    for key, tensor in sorted(initial.items()):
        if key.endswith(BASE_WEIGHT) and not tensor.requires_grad:
            values[key] = tensor.detach().cpu().clone()
            continue
        generator = torch.Generator().manual_seed((seed + zlib.crc32(key.encode())) % 2**63)
        noise = 0.1 * torch.randn(tuple(tensor.shape), generator=generator)
        values[key] = (tensor.detach().float().cpu() + noise).to(tensor.dtype)
    return values


def load(adapted: Adapted, values: dict[str, torch.Tensor], adapter_name: str = "default") -> dict:
    """Load peft-layout `values` into the adapted model through its driver (mapped to the driver's own layout);
    returns what was handed to the driver (also kept in `adapted.handed`, for the read-back check)."""
    own = to_driver(adapted.driver, adapted.model, values, adapter_name)
    adapted.driver.load_adapter_state_dict(adapted.model, {k: v.detach().to(adapted.device) for k, v in own.items()},
                                           adapter_name)
    adapted.handed[adapter_name] = own
    if adapter_name == "default":
        adapted.values = values
    return own


def add_adapter(adapted: Adapted, config: dict, adapter_name: str) -> None:
    """A second adapter added through the driver, switched to eval mode: new LoRA layers start in train mode
    (LORA-FWD-004)."""
    adapted.driver.add_adapter(adapted.model, dict(config), adapter_name)
    adapted.model.eval()


def initial_values(adapted: Adapted, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors as wrapping left them, in peft's layout; where the driver's own have no peft form,
    reference_impl's for the same case (the shapes are what matter: values are drawn around them)."""
    try:
        return peft_state(adapted.driver, adapted.model, adapter_name)
    except api.NoExactMapping:
        from ..drivers.reference import ReferenceDriver

        return ReferenceDriver().adapter_state_dict(wrap(ReferenceDriver(), adapted.case, "cpu", torch.float32).model)


def pair(impl: Driver, oracle: Driver, case: Case, device: str, dtype: torch.dtype = torch.float32
         ) -> tuple[Adapted, Adapted]:
    """The case wrapped by the implementation and by peft, both loaded with the same values drawn around peft's
    initial values."""
    mine, theirs = wrap(impl, case, device, dtype), wrap(oracle, case, device, dtype)
    values = adapter_values(oracle.adapter_state_dict(theirs.model), case.values_seed)
    load(theirs, values)
    load(mine, values)
    return mine, theirs


# --- layouts: the driver's own tensors and peft's ---------------------------------------------------------------

def to_driver(driver: Driver, model: nn.Module, tensors: dict[str, torch.Tensor],
              adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft-layout tensors in the driver's own layout (the same dict for a driver in peft's layout). Base weights
    saved beside an adapter ('...embed_tokens.base_layer.weight', LORA-KEYS-010) hold unchanged base values; a
    driver that does not keep them with its adapter is not handed them (KEYS-010 judges that on its own)."""
    if any(key.endswith(BASE_WEIGHT) for key in tensors) and not _keeps_base_weights(driver, model, adapter_name):
        tensors = {key: value for key, value in tensors.items() if not key.endswith(BASE_WEIGHT)}
    layout = api.layout_of(driver)
    return dict(tensors) if layout is None else layout.to_driver(model, dict(tensors))


BASE_WEIGHT = ".base_layer.weight"


def _keeps_base_weights(driver: Driver, model: nn.Module, adapter_name: str) -> bool:
    try:
        return any(key.endswith(BASE_WEIGHT) for key in peft_state(driver, model, adapter_name))
    except api.NoExactMapping:
        return False


def peft_state(driver: Driver, model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft's layout: the live ones, or their image under `layout.to_peft` (which raises
    api.NoExactMapping where there is none)."""
    live = driver.adapter_state_dict(model, adapter_name)
    layout = api.layout_of(driver)
    if layout is None:
        return live
    with torch.no_grad():
        return layout.to_peft(model, {k: v.detach() for k, v in live.items()})


def trainable(adapted: Adapted) -> dict[str, torch.Tensor]:
    """The adapter's floating-point tensors that require grad, live, in the driver's layout."""
    return {key: tensor for key, tensor in adapted.driver.adapter_state_dict(adapted.model).items()
            if tensor.is_floating_point() and tensor.requires_grad}


def gradients(adapted: Adapted, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradients of `trained` after a backward pass, in peft's layout. A tensor the forward pass never uses
    (LLaVA's vision post_layernorm under bias="all") has no .grad in any implementation: its gradient is zero."""
    own = {key: (torch.zeros_like(t) if t.grad is None else t.grad).detach().cpu() for key, t in trained.items()}
    return peft_gradients(adapted.driver, adapted.model, adapted.values, own)


def peft_gradients(driver: Driver, model: nn.Module, values: dict[str, torch.Tensor],
                   own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of the driver's own tensors carried back to peft's layout: the vector-Jacobian product of
    `to_driver` at `values` (a copied factor gets the sum of its copies' gradients, a split one the pieces)."""
    layout = api.layout_of(driver)
    if layout is None:
        return own
    leaves = {k: v.detach().float().clone().requires_grad_(True) for k, v in values.items() if v.is_floating_point()}
    mapped = layout.to_driver(model, leaves)
    pairs = [(mapped[k], own[k].to(mapped[k].dtype)) for k in own if k in mapped and mapped[k].requires_grad]
    grads = torch.autograd.grad([p[0] for p in pairs], list(leaves.values()), [p[1] for p in pairs],
                                allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}


# --- helpers on peft-keyed tensors ------------------------------------------------------------------------------

def scaling(config: dict) -> float:
    """lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (peft's defaults: r 8, alpha 8)."""
    return peft_format.scaling(config.get("lora_alpha", 8), config.get("r", 8), config.get("use_rslora", False))


def adapted_modules(keys) -> set[str]:
    """The module paths that hold a LoRA adapter, from peft keys (PREFIX stripped)."""
    paths = {key.split(".lora_")[0] for key in keys if ".lora_" in key}
    return {p.removeprefix(PREFIX) for p in paths}
