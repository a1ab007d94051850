"""(IA)^3: a learned vector l rescales a layer's activations (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", section 3.3):

    y = base(x) * l          l has one entry per output feature (the default)
    y = base(x * l)          l has one entry per input feature, for modules in feedforward_modules

Several active adapters multiply their vectors. Merging multiplies the weight (and, on the output side, the bias)
by l; unmerging divides by l + 1e-8, so it is not exact. Saved key: '<module path>.ia3_l'.
Spec area IA3. Facts from peft 0.21.2 tuners/ia3 (config.py, layer.py, model.py).
"""

import re
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import config_checks
from .adapter_layer import AdapterLayer
from .config import Targets, TunerConfig
from .layers import warn_fan_in_fan_out
from .peft_format import is_conv1d

# peft's defaults for target_modules / feedforward_modules = None (peft/utils/constants.py); a few common ones.
DEFAULT_TARGETS = {"gpt2": {"c_attn", "mlp.c_proj"}, "llama": {"k_proj", "v_proj", "down_proj"},
                   "mistral": {"k_proj", "v_proj", "down_proj"}, "bert": {"key", "value", "output.dense"},
                   "opt": {"q_proj", "k_proj", "fc2"}}
DEFAULT_FEEDFORWARD = {"gpt2": {"mlp.c_proj"}, "llama": {"down_proj"}, "mistral": {"down_proj"},
                       "bert": {"output.dense"}, "opt": {"fc2"}}


@dataclass
class IA3Config(TunerConfig):
    """Spec: IA3-CFG-001 (fields, defaults, validation)."""

    feedforward_modules: Targets = None  # targets whose *input* is rescaled; a subset of target_modules. None: the
    #                                      architecture's default (an error on a model without one)
    fan_in_fan_out: bool = False  # corrected per layer, as in LoRA (GPT-2's Conv1D: True)
    init_ia3_weights: bool = True  # True: l = 1 (the model computes as the base); False: l ~ N(0, 1)
    peft_type: str = "IA3"  # the method

    def __post_init__(self):
        self.check_and_convert()
        owner = type(self).__name__
        ff = self.feedforward_modules
        config_checks.expect("feedforward_modules", ff, ff is None or isinstance(ff, str) or (
            isinstance(ff, (list, tuple, set)) and all(isinstance(v, str) for v in ff)),
            "None, a regex string or a list of module names", owner)
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            config_checks.expect(name, getattr(self, name), isinstance(getattr(self, name), bool), "true or false",
                                 owner)
        if isinstance(ff, (list, tuple, set)):
            self.feedforward_modules = set(ff)
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set) \
                and not self.feedforward_modules <= self.target_modules:
            raise ValueError("`feedforward_modules` should be a subset of `target_modules`")


def prepare(model: nn.Module, config: IA3Config) -> None:
    """feedforward_modules=None takes the architecture's default, as target_modules does. Spec: IA3-CFG-001."""
    if config.feedforward_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_FEEDFORWARD:
            raise ValueError("Please specify `feedforward_modules` in `peft_config`")
        config.feedforward_modules = set(DEFAULT_FEEDFORWARD[model_type])


def is_feedforward(path: str, config: IA3Config) -> bool:
    """A regex must match the whole name; a list entry matches any name that *ends with* it as a plain string, so
    'proj' also marks 'c_proj' (peft's rule, unlike target_modules' dotted suffixes). Spec: IA3-MATCH-001."""
    if isinstance(config.feedforward_modules, str):
        return re.fullmatch(config.feedforward_modules, path) is not None
    return any(path.endswith(name) for name in config.feedforward_modules)


class IA3Layer(AdapterLayer):
    """Linear, GPT-2's Conv1D, Conv2d and Conv3d with (IA)^3 vectors. Whether the layer rescales its input is
    fixed when the layer is created: later adapters on it follow, whatever their own feedforward_modules say."""

    containers = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = feedforward
        self.is_conv = isinstance(base_layer, nn.modules.conv._ConvNd)
        if self.is_conv:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        elif is_conv1d(base_layer):
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def vector_shape(self) -> tuple[int, ...]:
        """Linear: (out, 1), or (1, in) for feedforward. Conv: (1, channels, 1, ...), broadcasting over (N, C, ...).
        Spec: IA3-INIT-001 (shapes)."""
        if self.is_conv:
            channels = self.in_features if self.is_feedforward else self.out_features
            return (1, channels) + (1,) * (self.base_layer.weight.dim() - 2)
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def add_adapter(self, name: str, config: IA3Config, upcast_half: bool, initialize: bool = True) -> None:
        """peft draws l ~ N(0, 1) and, with init_ia3_weights, overwrites it with ones: the draw happens either way.
        Spec: IA3-INIT-001."""
        shape = self.vector_shape()
        vector = torch.randn(shape) if initialize else torch.zeros(shape)
        if initialize and config.init_ia3_weights:
            vector.fill_(1.0)
        self.ia3_l[name] = nn.Parameter(vector)
        self.move_adapter(name, upcast_half)

    def scaling(self, names: list[str]) -> torch.Tensor:
        """The product of the vectors of `names`: flat for Linear, in its broadcast shape for conv.
        Spec: IA3-FWD-001 (several active adapters multiply)."""
        product = 1
        for name in names:
            product = product * (self.ia3_l[name] if self.is_conv else self.ia3_l[name].flatten())
        return product

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Spec: IA3-FWD-001."""
        names = self.running_adapters()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        dtype, l = x.dtype, self.scaling(names)
        if self.is_feedforward:  # the input rescaled in the adapter's dtype, then cast for the base layer
            scaled = x.to(self.ia3_l[names[-1]].dtype) * l
            if not self.is_conv:
                return self.base_layer(scaled.to(dtype), *args, **kwargs)
            return self.base_layer(scaled.to(self.base_layer.weight.dtype), *args, **kwargs).to(dtype)
        result = self.base_layer(x, *args, **kwargs)
        if self.is_conv:
            return (result.to(self.ia3_l[names[-1]].dtype) * l).to(dtype)
        return (result * l).to(result.dtype)

    # --- merging -----------------------------------------------------------------------------------------------
    def weight_scale(self, name: str) -> torch.Tensor:
        """l laid out to multiply the stored weight: rows (outputs) or columns (inputs); Conv1D stores (in, out);
        a grouped conv's input channels repeat per group. Spec: IA3-MERGE-001."""
        l = self.ia3_l[name].data
        if not self.is_conv:
            return l.T if is_conv1d(self.base_layer) else l
        weight = self.base_layer.weight
        ones = (1,) * (weight.dim() - 2)
        if not self.is_feedforward:
            return l.reshape(-1, 1, *ones)
        groups, out, per_group = self.base_layer.groups, self.out_features, weight.shape[1]
        channel = (torch.arange(out) // (out // groups))[:, None] * per_group + torch.arange(per_group)[None, :]
        return l.flatten()[channel.to(l.device)].reshape(out, per_group, *ones)

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """W *= l (and, on the output side, bias *= l). Spec: IA3-MERGE-001."""
        base = self.base_layer
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name not in self.ia3_l or name in self.merged_adapters:
                continue
            weight = (base.weight.data * self.weight_scale(name)).to(base.weight.dtype)
            bias = None
            if not self.is_feedforward and base.bias is not None:
                bias = (base.bias.data * self.ia3_l[name].data.reshape(base.bias.shape)).to(base.bias.dtype)
            if safe_merge and not all(torch.isfinite(t).all() for t in (weight, bias) if t is not None):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W /= (l + 1e-8), last merged first: an l entry of 0 cannot be undone. Spec: IA3-MERGE-001."""
        if self.merged_adapters:
            warnings.warn("Unmerge result can be inaccurate for (IA)^3.")
        base = self.base_layer
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.weight.data = (base.weight.data / (self.weight_scale(name) + 1e-8)).to(base.weight.dtype)
            if not self.is_feedforward and base.bias is not None:
                l = self.ia3_l[name].data.reshape(base.bias.shape)
                base.bias.data = (base.bias.data / (l + 1e-8)).to(base.bias.dtype)


def make_layer(module: nn.Module, path: str, config: IA3Config) -> IA3Layer:
    """Spec: IA3-MATCH-002 (Linear, Conv1D, Conv2d, Conv3d; anything else is refused)."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)) or is_conv1d(module):
        return IA3Layer(module, is_feedforward(path, config))
    raise ValueError(f"Target module {path} ({type(module).__name__}) is not supported. Currently, only "
                     "`torch.nn.Linear`, `torch.nn.Conv2d`, and `Conv1D` are supported.")


def attach(layer: IA3Layer, adapter_name: str, path: str, config: IA3Config, upcast_half: bool,
           initialize: bool) -> None:
    """fan_in_fan_out corrected per layer and saved as LoRA does it (LORA-CFG-004), then the vector.
    Spec: IA3-INIT-001."""
    warn_fan_in_fan_out(layer.base_layer, config)
    layer.add_adapter(adapter_name, config, upcast_half, initialize)
