"""Which modules get an adapter, and with which rank and alpha.

Spec area MATCH. Every rule here works on a module's full name in `model.named_modules()`, for example
`transformer.h.0.attn.c_attn`, never on the module object, except the type checks of "all-linear".
Reference: peft 0.21.2 `tuners/tuners_utils.py` check_target_module_exists (facts only; see SPEC.md).
"""

import re
from typing import Optional

from torch import nn

from .config import LoraConfig
from .peft_format import is_conv1d

# The names peft treats as a transformers model's input and output embeddings (its EMBEDDING_LAYER_NAMES): adapting
# one saves its base weight beside the adapter (LORA-KEYS-010) and, on a tied model, touches both (LORA-MERGE-010).
EMBEDDING_NAMES = ("embed_tokens", "lm_head")

# peft's per-architecture defaults for target_modules=None (peft/utils/constants.py); a few common ones.
DEFAULT_TARGETS = {
    "gpt2": {"c_attn"},
    "llama": {"q_proj", "v_proj"},
    "mistral": {"q_proj", "v_proj"},
    "bert": {"query", "value"},
    "opt": {"q_proj", "v_proj"},
}


def matches_names(name: str, names: set[str]) -> bool:
    """A name list matches a module by its full name or a dotted suffix of it: "c_proj" hits "h.0.attn.c_proj"."""
    return name in names or any(name.endswith("." + n) for n in names)


def is_excluded(name: str, config: LoraConfig) -> bool:
    """exclude_modules uses the target rules; modules_to_save excludes itself and its children. LORA-MATCH-003."""
    exclude = config.exclude_modules
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return True
    if isinstance(exclude, set) and matches_names(name, exclude):
        return True
    return any(re.match(rf"(^|.*\.){saved}($|\..*)", name) for saved in config.modules_to_save or ())


def matches_target(name: str, config: LoraConfig) -> bool:
    """target_modules: a str is a regex for the whole name; a list holds names or dotted suffixes, and then
    layers_to_transform may narrow it down. Spec: LORA-MATCH-001, -002, -005."""
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if targets is None:  # only target_parameters
        return False
    if name in targets:  # peft applies no layer filter to an exact full name
        return True
    if not matches_names(name, targets):
        return False
    wanted = getattr(config, "layers_to_transform", None)  # IA3 has no layer fields
    if wanted is None or wanted == []:
        return True
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def layer_index(name: str, layers_pattern) -> Optional[int]:
    """The block number of a module: the first `.<digits>.` segment, or the one after `layers_pattern`."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        matches = (re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name) for p in patterns)
        match = next((m for m in matches if m), None)
    return int(match.group(1)) if match else None


def pattern_value(name: str, patterns: dict, default):
    """rank_pattern / alpha_pattern: the first key (a regex) matching the name or a dotted suffix of it wins.

    Spec: LORA-MATCH-009.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def unmatched_pattern_keys(patterns: dict, targeted: list[str]) -> list[str]:
    return [key for key in patterns if not any(re.match(rf"(.*\.)?({key})$", name) for name in targeted)]


def resolve_targets(model: nn.Module, config: LoraConfig, defaults: Optional[dict] = None) -> None:
    """Turn "all-linear" and None into explicit names, in the config (as peft saves them), then shorten a long
    name list. `defaults`: the method's targets per model type (LoRA's when None). Spec: LORA-MATCH-004,
    LORA-MATCH-008, LORA-MATCH-011."""
    defaults = DEFAULT_TARGETS if defaults is None else defaults
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = all_linear_names(model)
    elif config.target_modules is None and not getattr(config, "target_parameters", None):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ValueError("Please specify `target_modules` in the LoRA config: "
                             f"there is no default for model type {model_type!r}")
        config.target_modules = set(defaults[model_type])
    if isinstance(config.target_modules, set) and len(config.target_modules) >= 20:
        shorter = shortest_separating_suffixes(config.target_modules, [n for n, _ in model.named_modules()])
        if len(shorter) < len(config.target_modules):
            config.target_modules = shorter


def _dotted_suffixes(name: str) -> list[str]:
    """"a.b.c" -> ["c", "b.c", "a.b.c"]."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def shortest_separating_suffixes(targets: set[str], module_names: list[str]) -> set[str]:
    """peft rewrites a list of 20 or more names into short dotted suffixes that match the same modules and no
    other (peft 0.21.2 tuners_utils.py:923-934, 2246-2325): each name, in order of its suffixes, gets its
    shortest suffix that no other module ends with, unless a suffix chosen earlier already covers it."""
    others = {s for name in module_names if not matches_names(name, targets) for s in _dotted_suffixes(name)}
    chosen: set[str] = set()
    for name in sorted(targets, key=_dotted_suffixes):
        if any(name.endswith("." + suffix) for suffix in chosen):
            continue
        free = next((s for s in _dotted_suffixes(name) if s not in chosen and s not in others), None)
        if free is not None:
            chosen.add(free)
    return chosen or set(targets)


def all_linear_names(model: nn.Module) -> set[str]:
    """Every Linear and GPT-2 Conv1D, minus a transformers model's output layer (the LM head)."""
    names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name in names if head is None or model.get_submodule(name) is not head}


def no_match_error(config: LoraConfig, module_names: list[str], excluded: int) -> ValueError:
    """The error for "nothing was targeted": peft's message (tuners_utils.py:1051-1086) plus names to pick from."""
    if config.target_modules == set():
        message = "No `target_modules` passed but also no `target_parameters` found. Please check the values."
    elif excluded:
        message = ("No modules were targeted for adaptation. This might be caused by a combination of mismatched "
                   "target modules and excluded modules. Please check your `target_modules` and "
                   "`exclude_modules` configuration. You may also have only targeted modules that are marked to "
                   "be saved (`modules_to_save`).")
    else:
        targets = sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
        message = f"Target modules {targets!r} not found in the base model. Please check the target modules."
        if getattr(config, "layers_to_transform", None) is not None:
            message += f" Note: You specified 'layers_to_transform': {config.layers_to_transform}."
        if getattr(config, "layers_pattern", None) is not None:
            message += f" You also specified 'layers_pattern': {config.layers_pattern}."
    shown = [name for name in module_names if name][:12]
    more = f" (and {len(module_names) - 1 - len(shown)} more)" if len(module_names) - 1 > len(shown) else ""
    return ValueError(f"{message} Module names in this model: {', '.join(shown)}{more}.")
