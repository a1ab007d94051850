"""Quantized bases for the QLoRA requirements: the zoo's float model saved once, then loaded back through
transformers' BitsAndBytesConfig as users load a QLoRA base (from_pretrained, device_map), so the quantized weights
are the same for a given seed on every run.

Two settings of bitsandbytes 0.50.2 are fixed here, both for a CPU run:
- its CPU inference path (taken in eval mode when the input needs no grad, on CPUs with AVX512-BF16) repacks a 4-bit
  weight in place, after which `dequantize_4bit`, which peft's merge and DoRA call, returns other values (0.13 apart
  on a 64-wide layer) and layers narrower than 64 fail to repack at all. The zoo turns that path off, so every
  forward computes with the weight that was stored; docs/qlora.md has the reproducer.
- it logs a failed kernel download at import and a cast warning on each 8-bit matmul: both quietened.
"""

import atexit
import functools
import logging
import shutil
import tempfile
from pathlib import Path
import torch
from torch import nn

# scheme -> BitsAndBytesConfig fields; "compute" is the 4-bit compute dtype: None for the run's dtype
SCHEMES = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "compute": None},
    "fp4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True,
               "compute": None},
    "nf4-bf16": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "compute": torch.bfloat16},
    "int8": {"load_in_8bit": True},
    # the QLoRA paper's recipe, as users run it: then prepared for k-bit training (reference_impl.quantized)
    "qlora": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
              "compute": torch.bfloat16, "prepared": True},
}
_QUIET = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions")


def quiet() -> None:
    """Before bitsandbytes is imported (peft imports it when installed): the kernel download is tried there."""
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)


def available() -> bool:
    quiet()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def missing_reason() -> str:
    return "bitsandbytes is not installed (pip install 'peft-conformance[qlora]')"


@functools.lru_cache(maxsize=None)
def _saved(model: nn.Module) -> Path:
    """A float zoo model (one cached object per name and seed), saved once per process."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    folder = Path(tempfile.mkdtemp(prefix="peft-conformance-qlora-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model.save_pretrained(folder)
    return folder


def bnb_fields(scheme: str, dtype: torch.dtype) -> dict:
    """The BitsAndBytesConfig fields of `scheme` on a run in `dtype`, JSON-ready (dtypes by name)."""
    fields = {k: v for k, v in SCHEMES[scheme].items() if k not in ("compute", "prepared")}
    if fields.get("load_in_4bit"):
        fields["bnb_4bit_compute_dtype"] = str(SCHEMES[scheme]["compute"] or dtype).removeprefix("torch.")
    return fields


def from_folder(folder: Path, fields: dict, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A saved float model loaded through BitsAndBytesConfig(**fields), as users load a QLoRA base."""
    if not available():
        raise ImportError(missing_reason())
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**fields),
                                                 dtype=dtype, device_map=device)
    return without_cpu_repacking(model).eval()


def from_float(model: nn.Module, fields: dict) -> nn.Module:
    """A float transformers `model` quantized as from_pretrained quantizes it (the golden fixtures store the float
    weights and `fields`: quantizing is deterministic, so that rebuilds the same quantized weights)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = from_folder(Path(folder), fields)
    loaded.name_or_path = loaded.config._name_or_path = ""  # peft would write the scratch folder into its config
    return loaded


@functools.lru_cache(maxsize=32)
def _loaded(scheme: str, device: str, dtype: torch.dtype, folder: Path) -> nn.Module:
    model = from_folder(folder, bnb_fields(scheme, dtype), device, dtype)
    if SCHEMES[scheme].get("prepared"):
        from reference_impl.quantized import prepare_for_kbit_training  # as peft's (tests/unit/test_quantized.py)

        prepare_for_kbit_training(model)
    return model


def without_cpu_repacking(model: nn.Module) -> nn.Module:
    """`model` with bitsandbytes' CPU repacking of 4-bit weights turned off (see the module docstring): every forward
    then computes with the stored weight, and dequantizing it gives what was quantized."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load(model: nn.Module, scheme: str, device: str, dtype: torch.dtype) -> nn.Module:
    """The float zoo `model` quantized by `scheme`, on `device`, its other weights in `dtype` (cached: callers
    copy it)."""
    return _loaded(scheme, device, dtype, _saved(model))


# --- what the QLORA tests compute on their own, with bitsandbytes' functions --------------------------------------

def dense(layer: nn.Module) -> torch.Tensor:
    """The float weight a bitsandbytes layer computes with, (out, in)."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return bnbf.int8_vectorwise_dequant(weight.data, scales)


def quantized_and_back(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` quantized with `layer`'s settings, then dequantized: what a layer holding it computes with.
    8-bit quantization goes through float16, as Int8Params does."""
    import bitsandbytes.functional as bnbf

    stored = layer.weight
    if type(stored).__name__ == "Params4bit":
        codes, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=stored.blocksize,
                                          compress_statistics=stored.compress_statistics,
                                          quant_type=stored.quant_type, quant_storage=stored.quant_storage)
        return bnbf.dequantize_4bit(codes, state)
    codes, scales, _ = bnbf.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return bnbf.int8_vectorwise_dequant(codes, scales)
