"""diffusers' own LoRA layout (`save_lora_weights`, pytorch_lora_weights.safetensors): peft's tensor names with
'<component>.' (unet, transformer, text_encoder, text_encoder_2) where peft writes its prefix (peft_format.PREFIX):

    unet.<path>.lora_A.weight            = peft's <prefix><path>.lora_A.weight
    text_encoder.<path>.lora_B.weight    (the text encoder's paths as the transformers that saved it names them)

Since diffusers 0.34 `save_lora_weights(..., unet_lora_adapter_metadata=config)` also stores each component's
LoraConfig fields in the safetensors metadata "lora_adapter_metadata" (JSON, keys '<component>.<field>'). Without it
the file does not say alpha, and diffusers 0.42.1 reads every module with alpha = r (scaling 1), measured.
"""

import dataclasses
import json

import torch
from torch import nn

from reference_impl.config import LoraConfig
from reference_impl.peft_format import PREFIX

from . import kohya

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
METADATA = "lora_adapter_metadata"
_FIELDS = {field.name for field in dataclasses.fields(LoraConfig)}


def read(state: dict[str, torch.Tensor], metadata: dict, bases: dict[str, nn.Module]
         ) -> dict[str, tuple[dict, dict]]:
    """The peft adapters a diffusers-layout state dict holds, per component: (tensors keyed as peft saves them,
    LoraConfig fields: the file's metadata, or alpha = r per module without it). Every tensor must belong to a
    component that `bases` has and name a module of it."""
    strays = sorted(key for key in state if key.split(".")[0] not in COMPONENTS)
    if strays:
        raise ValueError(f"{strays[0]}: expected a name starting with one of {', '.join(COMPONENTS)} and '.'")
    fields = json.loads((metadata or {}).get(METADATA) or "{}")
    out = {}
    for component in COMPONENTS:
        values = {PREFIX + key.removeprefix(component + "."): value for key, value in state.items()
                  if key.startswith(component + ".")}
        if not values:
            continue
        if component not in bases:
            raise ValueError(f"the file holds {component} tensors but no {component} base was given (given: "
                             f"{', '.join(bases) or 'none'})")
        ranks = {}
        for key, value in values.items():
            path = key.removeprefix(PREFIX).split(".lora_")[0]
            if not isinstance(_module(bases[component], path), (nn.Linear, nn.Conv2d, nn.Conv1d)):
                raise ValueError(f"{component}.{key.removeprefix(PREFIX)}: {path!r} is no Linear or Conv layer of "
                                 f"the {component} base")
            if ".lora_A." in key:
                ranks[path] = value.shape[0]
        saved = {k.removeprefix(component + "."): v for k, v in fields.items() if k.startswith(component + ".")}
        config = {k: v for k, v in saved.items() if k in _FIELDS and v is not None}
        out[component] = (values, config or kohya.config_from(ranks, {path: float(r) for path, r in ranks.items()}))
    return out


def has_alphas(metadata: dict) -> bool:
    return bool((metadata or {}).get(METADATA))


def _module(base: nn.Module, path: str):
    try:
        return base.get_submodule(path)
    except AttributeError:
        return None
