"""The driver for LyCORIS (`lycoris-lora`), the independent LoHa and LoKr implementation of the diffusion
community, mapped onto peft's config and adapter format.

A peft LoHa / LoKr config dict becomes a LycorisNetwork on exactly the modules peft's rules select (its `target_name`
preset), with linear_dim = conv_dim = r, linear_alpha = conv_alpha = alpha, use_tucker = use_effective_conv2d,
decompose_both, factor = decompose_factor and the dropouts. LyCORIS names its module for '<path>' 'lycoris_<path with
dots as underscores>' and its factors as peft does (hada_w1_a, ..., lokr_w2_b), so the driver reads and writes them
under peft's keys; saving writes peft's two files (the converter a LyCORIS user would run), and where a LyCORIS
module computes with another alpha than the config's (LoKr with both factors whole uses alpha = r), that alpha goes
into alpha_pattern. Only LoHa and LoKr on nn.Linear and nn.Conv2d; LyCORIS' own LoRA ('locon') is not mapped.
"""

import contextlib
import json
import logging
import re
from importlib.metadata import version
from pathlib import Path

import torch
from lycoris import LycorisNetwork
from safetensors.torch import load_file, save_file
from torch import nn

from reference_impl import config_from_dict, peft_format
from reference_impl.peft_format import PREFIX
from reference_impl.targeting import EMBEDDING_NAMES

from ..engine import scope

logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # it logs every network it builds at INFO

ALGORITHMS = {"LOHA": "loha", "LOKR": "lokr"}
# Config fields with no LyCORIS counterpart, at the values the driver can map.
MAPPED_DEFAULTS = {"init_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                   "modules_to_save": None}


class LycorisModel(nn.Module):
    """The base model, whose targeted modules LyCORIS has hooked, with the network that holds the factors."""

    def __init__(self, model: nn.Module, network: LycorisNetwork, paths: dict[str, str]):
        super().__init__()
        self.model, self.network = model, network
        self.paths = paths  # LyCORIS module name -> the base module's path

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def loras(self):
        return [(self.paths[lora.lora_name], lora) for lora in self.network.loras]


class LycorisDriver:
    name = "lycoris"
    version = version("lycoris-lora")
    capabilities = frozenset({"loha", "lokr", "linear", "conv2d", "autograd", "disable", "merge", "unload",
                              "save_load"})

    def supports(self, model: nn.Module, config: dict):
        method = config.get("peft_type", "LORA")
        if method not in ALGORITHMS:
            return f"the LyCORIS driver maps LoHa and LoKr only, not {method}"
        for field, mapped in MAPPED_DEFAULTS.items():
            if config.get(field, mapped) != mapped:
                return f"{field}={config[field]!r} has no LyCORIS counterpart (LyCORIS initialises its own way)" \
                    if field == "init_weights" else f"{field} has no LyCORIS counterpart"
        return None

    # --- wrapping -------------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, config: dict, adapter_name: str = "default") -> LycorisModel:
        if adapter_name != peft_format.DEFAULT_ADAPTER:
            raise ValueError("the LyCORIS driver holds one adapter per model")
        targets = sorted(scope.targeted(model, config))
        if not targets:
            raise ValueError(f"target_modules {config.get('target_modules')!r} match no module")
        r, alpha = config.get("r", 8), config.get("alpha", 8)
        LycorisNetwork.apply_preset({"target_module": [], "target_name": targets, "use_fnmatch": False})
        extra = {"rank_dropout_scale": config.get("rank_dropout_scale", False)} if config["peft_type"] == "LOKR" else {}
        network = LycorisNetwork(model, multiplier=1.0, lora_dim=r, conv_lora_dim=r, alpha=alpha, conv_alpha=alpha,
                                 network_module=ALGORITHMS[config["peft_type"]],
                                 use_tucker=config.get("use_effective_conv2d", False),
                                 rank_dropout=config.get("rank_dropout", 0.0),
                                 module_dropout=config.get("module_dropout", 0.0),
                                 decompose_both=config.get("decompose_both", False),
                                 factor=config.get("decompose_factor", -1), **extra)
        network.apply_to()
        model.requires_grad_(False)
        network.requires_grad_(True)
        wrapped = LycorisModel(model, network, {f"{LycorisNetwork.LORA_PREFIX}_{p.replace('.', '_')}": p
                                                for p in targets})
        wrapped.config = dict(config)
        return wrapped

    def add_adapter(self, model, config, adapter_name):
        raise NotImplementedError("the LyCORIS driver holds one adapter per model")

    def set_adapter(self, model, adapter_name):
        if adapter_name != peft_format.DEFAULT_ADAPTER:
            raise ValueError(f"no adapter {adapter_name!r}")

    def delete_adapter(self, model, adapter_name):
        raise NotImplementedError("the LyCORIS driver holds one adapter per model")

    @contextlib.contextmanager
    def disable_adapter(self, model: LycorisModel):
        """multiplier 0: LyCORIS adds (W + 0 * delta) - W, exactly zero."""
        model.network.set_multiplier(0.0)
        try:
            yield
        finally:
            model.network.set_multiplier(1.0)

    # --- tensors under peft's keys ------------------------------------------------------------------------
    def adapter_state_dict(self, model: LycorisModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The factors, and, as peft's files carry them, the frozen weight of a targeted input or output embedding
        ('embed_tokens', 'lm_head') under '<path>.base_layer.weight'."""
        state = {f"{PREFIX}{path}.{name}": p for path, lora in model.loras()
                 for name, p in lora.named_parameters(recurse=False)}
        targets = model.config.get("target_modules") or []
        if isinstance(targets, list) and set(targets) & set(EMBEDDING_NAMES) and \
                hasattr(model.model, "get_input_embeddings"):
            embeddings = {id(model.model.get_input_embeddings()), id(model.model.get_output_embeddings())}
            state.update({f"{PREFIX}{path}.base_layer.weight": lora.org_module[0].weight
                          for path, lora in model.loras() if id(lora.org_module[0]) in embeddings})
        return state

    def load_adapter_state_dict(self, model: LycorisModel, state_dict: dict, adapter_name: str = "default") -> None:
        live = self.adapter_state_dict(model)
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".base_layer.weight")}  # the base's own
        unknown = sorted(set(state_dict) - set(live))
        if unknown:
            raise ValueError(f"no LyCORIS factor for {unknown[:4]}")
        with torch.no_grad():
            for key, value in state_dict.items():
                if live[key].shape != value.shape:
                    raise ValueError(f"{key}: LyCORIS' factor is {tuple(live[key].shape)}, the value "
                                     f"{tuple(value.shape)}")
                live[key].copy_(value)

    # --- files ------------------------------------------------------------------------------------------------
    def save(self, model: LycorisModel, directory: str, adapter_name: str = "default") -> None:
        """peft's two files: the factors under peft's keys, and the config with the alpha each module uses."""
        config = config_from_dict(model.config)
        for path, lora in model.loras():
            if not torch.isclose(torch.tensor(lora.scale * lora.lora_dim), torch.tensor(float(config.alpha))):
                config.alpha_pattern[re.escape(path)] = lora.scale * lora.lora_dim
        contents = {**config.to_dict(), "inference_mode": True, "peft_version": f"lycoris-lora {self.version}"}
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict(model).items()}
        save_file(tensors, folder / peft_format.WEIGHTS_NAME, metadata={"format": "pt"})
        (folder / peft_format.CONFIG_NAME).write_text(json.dumps(contents, indent=2))

    def load(self, base_model: nn.Module, directory: str, adapter_name: str = "default",
             is_trainable: bool = False) -> LycorisModel:
        folder = Path(directory)
        config = json.loads((folder / peft_format.CONFIG_NAME).read_text())
        patterns = config.pop("alpha_pattern", {}) or {}  # LyCORIS' per-module alphas, applied below
        model = self.wrap(base_model, config)
        for path, lora in model.loras():  # LyCORIS' per-module alpha, where the converter wrote one
            alpha = next((a for key, a in patterns.items() if re.match(rf"(.*\.)?({key})$", path)), None)
            if alpha is not None:
                lora.scale = alpha / lora.lora_dim
        self.load_adapter_state_dict(model, load_file(folder / peft_format.WEIGHTS_NAME))
        model.requires_grad_(False)
        model.network.requires_grad_(is_trainable)
        return model.eval() if not is_trainable else model

    # --- merging ------------------------------------------------------------------------------------------------
    def merge(self, model: LycorisModel) -> None:
        """LyCORIS' onfly_merge writes W + delta; its hook must come off, or it adds delta once more."""
        for _, lora in model.loras():
            lora.onfly_merge(1.0)
            lora.restore()

    def unmerge(self, model: LycorisModel) -> None:
        for _, lora in model.loras():
            lora.onfly_restore()
            lora.apply_to()

    def merge_and_unload(self, model: LycorisModel) -> nn.Module:
        for _, lora in model.loras():
            lora.merge_to(1.0)
            lora.restore()
        return model.model

    def unload(self, model: LycorisModel) -> nn.Module:
        for _, lora in model.loras():
            lora.restore()
        return model.model

    def trainable_parameters(self, model: LycorisModel) -> tuple[int, int]:
        params = list(model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
