"""llama.cpp as a consumer: the base model and the adapter converted with llama.cpp's own converters
(convert_hf_to_gguf.py, convert_lora_to_gguf.py), logits computed by llama.cpp through llama-cpp-python with the
adapter applied at scale 1 ("unmerged") and scale 0 ("disabled").

Set PEFT_CONFORMANCE_LLAMA_CPP_SOURCE to llama-cpp-python's source distribution (the .tar.gz, or the folder it
unpacks to): the converters and their gguf package are taken from the llama.cpp it vendors, the same version the
installed llama-cpp-python was built from. With PEFT_CONFORMANCE_LLAMA_EXPORT_LORA naming llama.cpp's
`llama-export-lora` (built from the same tree; `tox -e consumer-llama-cpp` builds it), "merged" is computed too: the
adapter merged into the base GGUF by llama.cpp, then evaluated without it. The KV cache is float32 (llama.cpp's
default f16 cache alone moves tiny logits by ~1e-4). Each evaluation runs in a subprocess, so that a crash in C
fails its case and not the run. A converter that refuses an adapter (DoRA, modules_to_save) makes the case "not
applicable", with its message.
"""

import os
import subprocess
import sys
import tarfile
import tempfile
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import NotApplicable, language_models_only

SOURCE_ENV = "PEFT_CONFORMANCE_LLAMA_CPP_SOURCE"
EXPORT_LORA_ENV = "PEFT_CONFORMANCE_LLAMA_EXPORT_LORA"
TIMEOUT_S = 600
_WORK = Path(tempfile.mkdtemp(prefix="peft-conformance-llama-cpp-"))


def identity() -> dict:
    import llama_cpp

    identity = {"name": "llama.cpp", "version": f"llama-cpp-python {llama_cpp.__version__}"}
    if not os.environ.get(EXPORT_LORA_ENV):
        identity["not_applicable"] = {"merged": "llama.cpp merges an adapter only with its llama-export-lora tool, "
                                                "which llama-cpp-python does not build (set " + EXPORT_LORA_ENV + ")"}
    return identity


@cache
def source() -> Path:
    """The llama.cpp folder holding convert_lora_to_gguf.py, unpacked from the sdist when given as a .tar.gz."""
    given = os.environ.get(SOURCE_ENV)
    if not given:
        raise FileNotFoundError(f"set {SOURCE_ENV} to llama-cpp-python's source distribution (pip download "
                                "llama-cpp-python --no-binary :all: --no-deps) or the folder it unpacks to")
    path = Path(given)
    if path.is_file():
        with tarfile.open(path) as archive:
            archive.extractall(_WORK / "source", filter="data")
        path = _WORK / "source"
    found = sorted(path.glob("**/convert_lora_to_gguf.py"))
    if not found:
        raise FileNotFoundError(f"{SOURCE_ENV}={given}: no convert_lora_to_gguf.py inside")
    return found[0].parent


def _convert(script: str, args: list, output: Path) -> Path:
    """Run one of llama.cpp's converters; its refusal (an exit status and the last error line) is NotApplicable."""
    folder = source()
    env = {**os.environ, "PYTHONPATH": str(folder / "gguf-py")}
    done = subprocess.run([sys.executable, str(folder / script), *map(str, args), "--outtype", "f32",
                           "--outfile", str(output)], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "ERROR" in line or "Error" in line] or lines[-1:]
        raise NotApplicable(f"llama.cpp's {script} refuses it: {' / '.join(errors[-3:]) or done.returncode}")
    return output


@cache
def _base_gguf(base_dir: Path) -> Path:
    return _convert("convert_hf_to_gguf.py", [base_dir], _WORK / f"{base_dir.name}.gguf")


def compute(case) -> dict:
    language_models_only(case, "llama.cpp")
    try:
        base = _base_gguf(case.base_dir)
    except NotApplicable as refusal:
        raise NotApplicable(f"the base model does not convert: {refusal}") from None
    adapter = _convert("convert_lora_to_gguf.py", ["--base", case.base_dir, case.adapter_dir],
                       _WORK / f"{case.name}.gguf")
    save_file(case.inputs(), _WORK / f"{case.name}.inputs.safetensors")
    runs = {"unmerged": (base, adapter, 1.0), "disabled": (base, adapter, 0.0)}
    if os.environ.get(EXPORT_LORA_ENV):
        merged = _WORK / f"{case.name}.merged.gguf"
        done = subprocess.run([os.environ[EXPORT_LORA_ENV], "-m", str(base), "--lora", str(adapter), "-o", str(merged)],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"llama-export-lora exited with {done.returncode}: {done.stderr[-2000:]}")
        runs["merged"] = (merged, "", 0.0)
    out = {}
    for name, (model, lora, scale) in runs.items():
        result = _WORK / f"{case.name}.{name}.safetensors"
        done = subprocess.run([sys.executable, "-m", __name__, str(model), str(lora), str(scale),
                               str(_WORK / f"{case.name}.inputs.safetensors"), str(result)],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp evaluation exited with {done.returncode}: {done.stderr[-2000:]}")
        out[name] = load_file(result)["logits"]
    return out


def _evaluate(base: str, adapter: str, scale: float, inputs: str, output: str) -> None:
    """In a subprocess: every row of input_ids through llama.cpp, one sequence at a time, all positions' logits."""
    import numpy
    from llama_cpp import GGML_TYPE_F32, Llama

    model = Llama(model_path=base, lora_path=adapter or None, lora_scale=scale, logits_all=True, n_ctx=64, n_batch=64,
                  n_threads=2, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, verbose=False)
    rows = []
    for tokens in load_file(inputs)["input_ids"].tolist():
        model.reset()
        model.eval(tokens)
        rows.append(torch.from_numpy(numpy.array(model.scores[:len(tokens)], dtype=numpy.float32)))
    save_file({"logits": torch.stack(rows).contiguous()}, output)


if __name__ == "__main__":
    _evaluate(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5])
