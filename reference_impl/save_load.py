"""peft's adapter format: which tensors are saved under which keys, and the two files of an adapter directory.

    adapter_model.safetensors   keys PREFIX + "<module path>.lora_A.weight", ..., metadata {"format": "pt"}
    adapter_config.json         the config (LoraConfig: 41 keys), sorted, indented by 2

Spec areas: KEYS, SER, LOAD. The adapter name never appears in a saved key (LORA-KEYS-001); a non-default
adapter is saved in a subfolder named after it (LORA-SER-004).
"""

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_layer import AdapterLayer
from .methods import config_from_dict
from .model import TunerModel, adapter_parameters, bias_mode
from .peft_format import CONFIG_NAME, PICKLE_WEIGHTS_NAME, PREFIX, WEIGHTS_NAME
from .targeting import EMBEDDING_NAMES



class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _adapter_owner(model: nn.Module) -> tuple[dict, str]:
    """(peft_config, key prefix): a PeftModel's keys start with PREFIX, an injected model's don't."""
    if isinstance(getattr(model, "base_model", None), TunerModel):
        return model.base_model, PREFIX
    if hasattr(model, "peft_config"):
        return model, ""
    raise ValueError(f"{type(model).__name__} has no LoRA adapters: use get_peft_model or inject_adapter_in_model")


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """The live parameters of one adapter, keyed as peft saves them. Spec: LORA-KEYS-001..006."""
    owner, prefix = _adapter_owner(model)
    if adapter_name not in owner.peft_config:
        raise ValueError(f"Adapter {adapter_name!r} not found; adapters: {sorted(owner.peft_config)}")
    inner = owner.model if prefix else owner
    config = owner.peft_config[adapter_name]
    tensors = {prefix + path: p for path, p in adapter_parameters(inner, adapter_name, bias_mode(config))}
    return tensors | {prefix + path: p for path, p in saved_embeddings(inner, config)}


def _targets_embeddings(model: nn.Module, config) -> bool:
    """Does target_modules name embed_tokens or lm_head? Literally, for a list; for a regex, by matching a module
    whose name ends in one of them. GPT-2's 'wte' is not such a name."""
    targets = config.target_modules
    if isinstance(targets, str):
        return targets != "all-linear" and any(
            re.fullmatch(targets, name) for name, _ in model.named_modules()
            if name.rpartition(".")[2] in EMBEDDING_NAMES)
    return any(name in (targets or ()) for name in EMBEDDING_NAMES)


def saved_embeddings(model: nn.Module, config):
    """(path, tensor) of the base weights peft saves beside an adapter that targets embed_tokens or lm_head: those
    of the model's input and output embeddings that carry LoRA, as '<path>.base_layer.weight'. They are frozen base
    weights, saved so that a resized vocabulary travels with the adapter. Spec: LORA-KEYS-010."""
    if not _targets_embeddings(model, config) or not hasattr(model, "get_input_embeddings"):
        return
    paths = {id(module): path for path, module in model.named_modules()}
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if isinstance(layer, AdapterLayer) and isinstance(layer.base_layer, (nn.Linear, nn.Embedding)):
            path = paths[id(layer)]
            yield from ((f"{path}.base_layer.{name}", p) for name, p in layer.base_layer.named_parameters())


def get_peft_model_state_dict(model: nn.Module, state_dict=None, adapter_name: str = "default"):
    """What save_pretrained writes: the adapter's tensors under peft's keys, detached. Given `state_dict` (the model's
    own, keyed as in memory, e.g. `model.state_dict(keep_vars=True)` for live tensors), its tensors are returned
    under the saved keys instead, as peft maps the state dict it is given. Spec: LORA-SER-002."""
    params = adapter_state_dict(model, adapter_name)
    if state_dict is None:
        return {key: p.detach() for key, p in params.items()}
    in_memory = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        in_memory.setdefault(id(tensor), name)
    return {key: state_dict[in_memory[id(p)]] for key, p in params.items()
            if id(p) in in_memory and in_memory[id(p)] in state_dict}


def set_peft_model_state_dict(model: nn.Module, state_dict: dict, adapter_name: str = "default") -> IncompatibleKeys:
    """Copy saved tensors into adapter `adapter_name`. Keys with PREFIX are accepted by
    an injected model too. A key that names a parameter or buffer of the model itself (a layer norm's weight, an
    embedding's 'base_layer.weight') is copied into it, as peft's non-strict load_state_dict does: the base model
    changes, and unload keeps the change. Spec: LORA-LOAD-005, LORA-LOAD-007."""
    params = adapter_state_dict(model, adapter_name)
    if params and not next(iter(params)).startswith(PREFIX):
        state_dict = {k.removeprefix(PREFIX): v for k, v in state_dict.items()}
    base = {key: tensor for key, tensor in model.state_dict(keep_vars=True).items() if key not in params}
    targets = {key: params.get(key, base.get(key)) for key in state_dict if key in params or key in base}
    for key, tensor in targets.items():
        if tensor.shape != state_dict[key].shape:
            raise ValueError(f"Shape mismatch for {key}: the checkpoint has {tuple(state_dict[key].shape)}, "
                             f"the model expects {tuple(tensor.shape)}")
    with torch.no_grad():
        for key, tensor in targets.items():
            tensor.copy_(state_dict[key])
    missing = [key for key in params if key not in state_dict]
    return IncompatibleKeys(missing, [key for key in state_dict if key not in targets])




def write_adapter(directory, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write both files so that an interruption never leaves a pair that loads but does not belong together:
    the old config goes first, the new config comes last (a directory without one does not load). LORA-ERR-010."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Clone so that tied or non-contiguous tensors are written as plain, separate tensors (safetensors refuses
    # shared storage).
    tensors = {key: t.detach().clone().contiguous().cpu() for key, t in tensors.items()}
    weights_tmp = directory / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
    config_tmp = directory / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    try:
        save_file(tensors, weights_tmp, metadata={"format": "pt"})
        # Top-level keys come sorted (ConfigFile.to_dict); nested ones keep their order. peft sorts those too, which
        # reorders rank_pattern / alpha_pattern and so changes which key wins when the file is loaded. LORA-SER-006.
        config_tmp.write_text(json.dumps(config, indent=2))
        (directory / CONFIG_NAME).unlink(missing_ok=True)
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)


def module_path(key: str) -> str:
    """The module a saved key belongs to: the part before ".lora_", else before the last component."""
    return key.split(".lora_")[0] if ".lora_" in key else key.rpartition(".")[0]


def read_config(directory, ignore_unknown_keys: bool = False):
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} here; an adapter directory holds {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        return config_from_dict(data, ignore_unknown_keys)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def read_weights(directory, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The adapter tensors. A pickled adapter_model.bin runs code when loaded: only with allow_pickle=True."""
    path = Path(directory) / WEIGHTS_NAME
    pickle_path = Path(directory) / PICKLE_WEIGHTS_NAME
    if not path.is_file():
        if pickle_path.is_file() and allow_pickle:
            return torch.load(pickle_path, map_location="cpu", weights_only=True)
        hint = f" ({PICKLE_WEIGHTS_NAME} is there: pass allow_pickle=True to load it)" if pickle_path.is_file() else ""
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} here{hint}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {key} holds NaN or Inf values")
    return tensors
