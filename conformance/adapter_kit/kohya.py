"""The kohya-ss layout, in which Stable Diffusion LoRAs are shared (sd-scripts, A1111, ComfyUI, LyCORIS' LoCon): one
safetensors file for the whole pipeline, each module's tensors under its path with every '.' written as '_':

    lora_unet_<path>.lora_down.weight   A, (r, in) or (r, in, kh, kw)     = peft's <path>.lora_A.weight
    lora_unet_<path>.lora_up.weight     B, (out, r) or (out, r, 1, 1)     = peft's <path>.lora_B.weight
    lora_unet_<path>.alpha              0-d: this module's alpha; scaling = alpha / r, r = lora_down's first dim

`lora_te_` (or `lora_te1_`) is the text encoder, `lora_te2_` SDXL's second one, their paths as transformers 4 names
CLIPTextModel's modules (`text_model.encoder.layers...`; transformers 5 dropped the `text_model` level, so the
reader and the writer add or remove it). A module without `.alpha` has alpha = r (scaling 1), as kohya and diffusers
read it. rsLoRA has no kohya form: `write` stores alpha = scaling * r,
which computes the same.

The flattened names lose the difference between '.' and '_', so `read` finds each module in the base by its
flattened path (the one reading that cannot guess wrong). diffusers rebuilds paths with string rules instead and
turns per-module alphas into peft's alpha_pattern; adapter_kit/diffusion_check.py measures what it does to each
module.
"""

import collections
import re

import torch
from torch import nn

from reference_impl.peft_format import PREFIX, scaling
from reference_impl.targeting import pattern_value

COMPONENTS = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
TEXT_MODEL = "text_model."  # the level transformers 4's CLIPTextModel has and 5's lacks; kohya names include it
ALIASES = {"lora_te1_": "text_encoder"}  # SDXL trainers name the first text encoder te1
PREFIXES = (*ALIASES, *COMPONENTS.values())  # te1 before te, te2: no prefix starts another one that follows it
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
# What kohya files hold besides LoRA, named so that a reader can say what it is refusing.
NOT_LORA = {"dora_scale": "DoRA's magnitude (LyCORIS); diffusers drops it with a warning and computes plain LoRA",
            "hada_w1_a": "LoHa (LyCORIS)", "lokr_w1": "LoKr (LyCORIS)", "lokr_w2": "LoKr (LyCORIS)"}


def flat(path: str) -> str:
    return path.replace(".", "_")


def write(adapters: dict[str, tuple[dict, dict]]) -> dict[str, torch.Tensor]:
    """A kohya state dict from peft adapters, one per component ("unet", "text_encoder", "text_encoder_2"): each
    given as (its tensors keyed as peft saves them, its LoraConfig fields). What kohya cannot hold is refused."""
    out = {}
    for component, (values, config) in adapters.items():
        if component not in COMPONENTS:
            raise ValueError(f"component {component!r}: expected one of {', '.join(COMPONENTS)}")
        _refuse_what_kohya_cannot_hold(component, values, config)
        for path in adapted_paths(values):
            r, module_scaling = rank_and_scaling(path, config)
            named = path if component == "unet" or path.startswith(TEXT_MODEL) else TEXT_MODEL + path
            name = COMPONENTS[component] + flat(named)
            out[name + DOWN] = values[f"{PREFIX}{path}.lora_A.weight"]
            out[name + UP] = values[f"{PREFIX}{path}.lora_B.weight"]
            out[name + ALPHA] = torch.tensor(module_scaling * r)
    return out


def adapted_paths(values: dict) -> list[str]:
    """The module paths that peft-keyed adapter tensors adapt."""
    return sorted({key.removeprefix(PREFIX).split(".lora_A.")[0] for key in values if ".lora_A." in key})


def rank_and_scaling(path: str, config: dict) -> tuple[int, float]:
    """A module's rank and scaling under LoraConfig fields (its rank_pattern / alpha_pattern entry, else r and
    lora_alpha; rsLoRA if set)."""
    r = pattern_value(path, config.get("rank_pattern") or {}, config.get("r", 8))
    alpha = pattern_value(path, config.get("alpha_pattern") or {}, config.get("lora_alpha", 8))
    return r, scaling(alpha, r, config.get("use_rslora", False))


def _refuse_what_kohya_cannot_hold(component: str, values: dict, config: dict) -> None:
    refused = {"peft_type": config.get("peft_type", "LORA") != "LORA", "use_dora": config.get("use_dora"),
               "lora_bias": config.get("lora_bias"), "modules_to_save": config.get("modules_to_save"),
               "bias": config.get("bias", "none") != "none",
               "trainable_token_indices": config.get("trainable_token_indices")}
    for field, used in refused.items():
        if used:
            raise ValueError(f"{component}: {field}={config[field]!r} has no form in the kohya layout (only lora_down, "
                             "lora_up and alpha per module)")
    embedded = sorted(key for key in values if "lora_embedding_" in key)
    if embedded:
        raise ValueError(f"{component}: {embedded[0]} is a LoRA on an embedding, which the kohya layout cannot hold")


def read(state: dict[str, torch.Tensor], bases: dict[str, nn.Module]) -> dict[str, tuple[dict, dict]]:
    """The peft adapters a kohya state dict holds, per component: (tensors keyed as peft saves them, LoraConfig
    fields). Each module is found in `bases[component]` by its flattened path; a name that matches no module, or
    more than one, is an error that names it. r and lora_alpha are the most common values, the others go into
    rank_pattern / alpha_pattern under the module's full path."""
    modules = _by_component(state)
    out = {}
    for component, names in modules.items():
        if component not in bases:
            raise ValueError(f"the file holds {component} modules ({COMPONENTS[component]}...) but no {component} "
                             f"base was given (given: {', '.join(bases) or 'none'})")
        paths = _resolve(names, bases[component], component)
        values, ranks, alphas = {}, {}, {}
        for name, path in paths.items():
            down, up = state[name + DOWN], state[name + UP]
            values[f"{PREFIX}{path}.lora_A.weight"], values[f"{PREFIX}{path}.lora_B.weight"] = down, up
            ranks[path] = down.shape[0]
            alphas[path] = state[name + ALPHA].item() if name + ALPHA in state else float(ranks[path])
        out[component] = (values, config_from(ranks, alphas))
    return out


def _by_component(state: dict) -> dict[str, dict[str, str]]:
    """Per component, module name (the key up to '.lora_down.weight') -> that name without its component prefix;
    a tensor of any other kind is an error."""
    found = collections.defaultdict(dict)
    for key in sorted(state):
        what = next((about for part, about in NOT_LORA.items() if part in key), None)
        if what:
            raise ValueError(f"{key}: {what}, not a kohya LoRA tensor (lora_down, lora_up, alpha)")
        if not key.endswith((DOWN, UP, ALPHA)):
            raise ValueError(f"{key}: expected a name ending in {DOWN}, {UP} or {ALPHA}")
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{key}: expected a name starting with one of {', '.join(PREFIXES)}")
        if key.endswith(DOWN):
            name = key.removesuffix(DOWN)
            if name + UP not in state:
                raise ValueError(f"{key} has no {name + UP}")
            component = ALIASES.get(prefix) or next(c for c, p in COMPONENTS.items() if p == prefix)
            found[component][name] = name.removeprefix(prefix)
    return dict(found)


def _resolve(names: dict[str, str], base: nn.Module, component: str) -> dict[str, str]:
    """kohya module name -> the base's module path whose flattened form it is."""
    by_flat = collections.defaultdict(list)
    for path, module in base.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            by_flat[flat(path)].append(path)
    paths = {}
    for name, flattened in names.items():
        candidates = by_flat.get(flattened) or by_flat.get(flattened.removeprefix(flat(TEXT_MODEL)), [])
        if len(candidates) != 1:
            problem = "matches no Linear or Conv layer" if not candidates else f"matches {candidates}"
            raise ValueError(f"{name}: {problem} of the {component} base (a kohya name is the module path with '.' "
                             "written as '_')")
        paths[name] = candidates[0]
    return paths


def config_from(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """LoraConfig fields for modules (full paths) with these ranks and alphas: the most common as r and lora_alpha,
    the others as anchored rank_pattern / alpha_pattern entries."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks)}
    rank_pattern = {_anchored(p): v for p, v in sorted(ranks.items()) if v != r}
    alpha_pattern = {_anchored(p): v for p, v in sorted(alphas.items()) if v != alpha}
    return {**config, **({"rank_pattern": rank_pattern} if rank_pattern else {}),
            **({"alpha_pattern": alpha_pattern} if alpha_pattern else {})}


def _anchored(path: str) -> str:
    """A pattern key that matches this module alone (peft matches pattern keys as regexes against path suffixes)."""
    return "^" + re.escape(path)
