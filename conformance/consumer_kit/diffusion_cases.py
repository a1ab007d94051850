"""Diffusion cases of the consumer corpus: a Stable-Diffusion-style pipeline (the zoo's UNet and CLIP text encoder)
with a LoRA file in the kohya layout, as such LoRAs are shared (conformance/adapter_kit/kohya.py).

    bases/sd-tiny/unet/                 the UNet as diffusers writes it (config.json and its safetensors)
    bases/sd-tiny/text_encoder/         the CLIP text encoder as transformers writes it
    cases/<case>/lora.safetensors       the kohya file: lora_unet_* and lora_te_* modules, .alpha per module
    cases/<case>/inputs.safetensors     sample (rows, 4, 8, 8), timestep (rows,) int64, input_ids (rows, 5) int64
    cases/<case>/expected.safetensors   float32 denoiser output (rows, 4, 8, 8): unmerged, merged, disabled, weighted

The denoiser output is unet(sample, timestep, text_encoder(input_ids).last_hidden_state).sample: the adapter acts in
both models. Expected values are what peft computes with the adapters the file corresponds to (each module's scaling
alpha / r); "weighted" with every module's scaling times the case's adapter_weight (peft's set_scale, diffusers'
set_adapters weights).
"""

import copy
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapter_kit import kohya
from ..engine import harness
from ..zoo import models

BASE = "sd-tiny"
COMPONENTS = {"unet": "sd-unet", "text_encoder": "clip-text"}  # pipeline component -> zoo model
KOHYA_FILE = "lora.safetensors"
ADAPTER_WEIGHT = 0.5


def write_base(folder: Path) -> dict[str, torch.nn.Module]:
    built = {component: models.build(zoo, 0).eval() for component, zoo in COMPONENTS.items()}
    for component, model in built.items():
        model.save_pretrained(folder / component, safe_serialization=True)
    return built


def load_base(folder: Path) -> dict[str, torch.nn.Module]:
    """The pipeline's components from a corpus base folder (diffusers' UNet, transformers' CLIP text encoder)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").eval()}


def inputs(name: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    latents = models.ZOO[COMPONENTS["unet"]].make_inputs(generator)
    return {"sample": latents["sample"], "timestep": latents["timestep"],
            "input_ids": torch.randint(3, models.hf.IMAGE_TOKEN, (2, 5), generator=generator)}


def denoise(unet, text_encoder, case_inputs: dict) -> torch.Tensor:
    """The denoiser's output for the case's inputs, the text embeddings computed by `text_encoder`."""
    with torch.no_grad():
        text = text_encoder(input_ids=case_inputs["input_ids"]).last_hidden_state
        return unet(case_inputs["sample"], case_inputs["timestep"], encoder_hidden_states=text).sample.float()


def write_case(case, bases: dict[str, torch.nn.Module], root: Path) -> dict:
    """The kohya file for the case's per-component configs (adapter values drawn as the suite draws them), and what
    peft computes with the adapters that file corresponds to, read back by kohya.read."""
    import peft

    folder = root / "cases" / case.name
    adapters = {}
    for component, config in case.config.items():
        torch.manual_seed(0)
        model = peft.get_peft_model(copy.deepcopy(bases[component]), peft.LoraConfig(**copy.deepcopy(config)))
        seed = zlib.crc32(f"{case.name}/{component}".encode())
        adapters[component] = (harness.adapter_values(peft.get_peft_model_state_dict(model), seed), config)
    state = kohya.write(adapters)
    if not case.kohya_alphas:  # trainers that save no .alpha: a reader takes alpha = r
        state = {key: value for key, value in state.items() if not key.endswith(kohya.ALPHA)}
    state = {key: value.to(getattr(torch, case.dtype)) for key, value in state.items()}  # .alpha too, as kohya does
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / KOHYA_FILE, metadata={"format": "pt"})

    adapted = {}
    for component, (values, config) in kohya.read(load_file(folder / KOHYA_FILE), bases).items():
        model = peft.get_peft_model(copy.deepcopy(bases[component]), peft.LoraConfig(**config))
        peft.set_peft_model_state_dict(model, values)
        adapted[component] = model.eval()
    unet = adapted.get("unet", bases["unet"])
    text_encoder = adapted.get("text_encoder", bases["text_encoder"])
    case_inputs = inputs(case.name)
    expected = {"unmerged": denoise(unet, text_encoder, case_inputs)}
    _scale(adapted.values(), ADAPTER_WEIGHT)
    expected["weighted"] = denoise(unet, text_encoder, case_inputs)
    _scale(adapted.values(), 1.0)
    expected["disabled"] = denoise(bases["unet"], bases["text_encoder"], case_inputs)
    for model in adapted.values():
        model.merge_adapter()
    expected["merged"] = denoise(unet, text_encoder, case_inputs)
    save_file(case_inputs, folder / "inputs.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in expected.items()}, folder / "expected.safetensors",
              metadata={"format": "pt"})
    relative = lambda path: str(path.relative_to(root))  # noqa: E731
    return {"name": case.name, "kind": "diffusion", "base": f"bases/{BASE}", "adapter": relative(folder / KOHYA_FILE),
            "adapter_format": "kohya", "adapter_name": "default", "adapter_dtype": case.dtype,
            "adapter_weight": ADAPTER_WEIGHT, "features": list(case.features),
            "requirements": list(case.requirements), "inputs": relative(folder / "inputs.safetensors"),
            "expected": relative(folder / "expected.safetensors"), "outputs": ["unmerged", "merged", "disabled",
                                                                               "weighted"],
            "tolerance": "golden", "config": case.config, "note": case.note}


def _scale(adapted, weight: float) -> None:
    for model in adapted:
        for module in model.modules():
            if hasattr(module, "set_scale") and hasattr(module, "scaling"):
                for name in list(module.scaling):
                    module.set_scale(name, weight)
