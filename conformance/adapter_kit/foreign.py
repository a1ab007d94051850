"""Adapter files written by other tools: recognise them by their files, config keys and tensor names, so that
check-adapter can say what a directory is and why peft cannot load it, instead of listing symptoms.

Only file names, JSON and safetensors headers are read (no tensor data, no pickles).
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from reference_impl.peft_format import PREFIX

MLX_ADVICE = ("convert it: lora_A = lora_a.T, lora_B = lora_b.T, lora_alpha = scale * rank "
              "(conformance/drivers/mlx.py: mlx_to_peft)")


ADAPTERHUB_ADVICE = (
    f"AdapterHub keys are '<path>.loras.<name>.lora_A' / '.lora_B': drop '.loras.<name>', add '{PREFIX}' and "
    "'.weight', and write a peft adapter_config.json (lora_alpha = AdapterHub's alpha, r = its r). A fused projection "
    "(GPT-2's c_attn: q, k and v in one layer) holds one r-row block of lora_A per part it adapts (attn_matrices, "
    "q and v by default) and one block of lora_B per part: peft has one A for the whole layer, so give that module "
    "rank parts * r (rank_pattern) and lora_alpha parts * alpha (alpha_pattern, so that alpha / r is unchanged), "
    "keep the stacked lora_A as it is, and build lora_B as a zero (out_features, parts * r) matrix with part i's "
    "block in that part's output rows (q: the first third, k: the second, v: the last) and in columns i*r to "
    "(i+1)*r. On GPT-2, c_attn's lora_A is then (2r, in) and lora_B (3 * hidden, 2r) for q and v.")


@dataclass(frozen=True)
class Foreign:
    tool: str  # e.g. "mlx-lm"
    evidence: str  # what gave it away
    advice: str  # how to get a peft adapter from it

    def message(self, path: Path) -> str:
        return (f"{path} was written by {self.tool} ({self.evidence}), not by peft: peft's "
                f"PeftModel.from_pretrained cannot load it. {self.advice}")


def _header_keys(path: Path) -> tuple[list[str], dict]:
    """Tensor names and metadata of a safetensors file, from its header alone; ([], {}) if unreadable."""
    try:
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            if size > 100_000_000:
                return [], {}
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error):
        return [], {}
    metadata = header.pop("__metadata__", {}) or {}
    return sorted(header), metadata


CHECK_WITH_A_PIPELINE = ("check-adapter checks it against a diffusion base: --base PIPELINE_DIR (unet/, text_encoder/) "
                         "or sd-tiny")


def _json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _from_keys(keys: list[str], metadata: dict, file: str) -> Optional[Foreign]:
    """Formats told apart by their tensor names."""
    sample = next(iter(keys), "")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys) or \
            any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys) or "ss_network_module" in metadata:
        return Foreign("kohya-ss (sd-scripts / A1111 / ComfyUI)",
                       f"{file} holds lora_down / lora_up / .alpha tensors such as {sample!r}",
                       "diffusers reads it (load_lora_weights); its alpha is per module, and peft has no reader for "
                       f"it; {CHECK_WITH_A_PIPELINE}")
    if any(part in k for k in keys if not k.startswith(PREFIX)  # peft's own LoHa / LoKr files use the same names
           for part in ("hada_w1_a", "lokr_w1", "lokr_w2", ".hada_", "lycoris_")):
        return Foreign("LyCORIS (LoHa / LoKr)", f"{file} holds tensors such as {sample!r}",
                       f"peft's LoHa and LoKr use the same tensor names under '{PREFIX}<module path>.' instead of "
                       "'lycoris_<path with _>.'; each module's 'alpha' tensor goes into adapter_config.json "
                       "(alpha, alpha_pattern), and LyCORIS' departures (docs/method-findings.md) apply; "
                       "conformance/drivers/lycoris.py does the mapping")
    if "lora_adapter_metadata" in metadata or any(k.startswith(("unet.", "transformer.", "text_encoder."))
                                                  and ".lora" in k for k in keys):
        return Foreign("diffusers", f"{file} is keyed {sample!r} without '{PREFIX}'",
                       f"diffusers' load_lora_weights reads it; for peft, prefix the keys with '{PREFIX}' and "
                       "write lora_alpha (diffusers assumes lora_alpha = r when its metadata is missing); "
                       f"{CHECK_WITH_A_PIPELINE}")
    if any(k.endswith((".lora_a", ".lora_b")) for k in keys):
        return Foreign("mlx-lm", f"{file} holds lora_a / lora_b factors such as {sample!r}, stored transposed "
                                 "against peft's", MLX_ADVICE)
    return None


def identify(path) -> Optional[Foreign]:
    """What tool wrote `path` (an adapter directory or a single file), when it is not peft; None for a peft adapter
    (broken or not) or anything not recognised."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return Foreign("llama.cpp (GGUF)", f"{path.name} is a GGUF file",
                           "it is an export (convert_lora_to_gguf.py) from a peft adapter; keep the peft directory")
        if path.suffix == ".safetensors":
            return _from_keys(*_header_keys(path), path.name)
        return None
    config = _json(path / "adapter_config.json") or {}
    if "lora_parameters" in config or "fine_tune_type" in config or (path / "adapters.safetensors").is_file():
        return Foreign("mlx-lm", "adapters.safetensors with an adapter_config.json holding lora_parameters / "
                                 "fine_tune_type", MLX_ADVICE)
    hub_config = "config" in config and "peft_type" not in config and "model_class" in config
    if (path / "pytorch_adapter.bin").is_file() or hub_config:
        found = sorted(p.name for p in path.iterdir() if p.is_file())
        evidence = ("an adapter_config.json with 'config' and 'model_class', no peft_type" if hub_config
                    else "pytorch_adapter.bin")
        return Foreign("AdapterHub (adapters)", f"{evidence}; files: {', '.join(found)}", ADAPTERHUB_ADVICE)
    if not (path / "adapter_model.safetensors").is_file():
        for pickle_name in ("adapter_model.pt", "adapter_0.pt"):
            if (path / pickle_name).is_file():
                return Foreign("torchtune (a training checkpoint)", f"{pickle_name}, a pickle",
                               "torchtune writes the peft format itself when asked (adapter_model.safetensors with "
                               "tune_to_peft_adapter_weights); use that")
        for candidate in sorted(path.glob("*.safetensors")):
            found = _from_keys(*_header_keys(candidate), candidate.name)
            if found:
                return found
    return None
