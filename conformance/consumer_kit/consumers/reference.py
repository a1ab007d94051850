"""reference_impl as a consumer: PeftModel.from_pretrained on the corpus files, then unmerged, disabled, merged; a
diffusion case's kohya file read by conformance/adapter_kit/kohya.py and applied by reference_impl to the UNet and
the text encoder."""

import copy
import importlib.util

import torch
from safetensors.torch import load_file

import reference_impl

from ...adapter_kit import kohya
from .. import diffusion_cases
from . import NotApplicable, base_model


def identity() -> dict:
    return {"name": "reference", "version": reference_impl.__version__}


def compute(case) -> dict:
    if case.kind == "diffusion":
        return _diffusion(case)
    model = reference_impl.PeftModel.from_pretrained(base_model(case), case.adapter_dir,
                                                     adapter_name=case.manifest["adapter_name"]).eval()
    inputs = case.inputs()
    with torch.no_grad():
        out = {"unmerged": model(**inputs).logits}
        with model.disable_adapter():
            out["disabled"] = model(**inputs).logits
        model.merge_adapter()
        out["merged"] = model(**inputs).logits
    return out


def _diffusion(case) -> dict:
    if importlib.util.find_spec("diffusers") is None:
        raise NotApplicable("the case's UNet is a diffusers model, and diffusers is not installed (extra: diffusion)")
    bases = diffusion_cases.load_base(case.base_dir)
    state, inputs = load_file(case.adapter_dir), case.inputs()

    def adapted(weight: float) -> dict:
        """The pipeline's components with the file's adapters, every module's scaling times `weight`."""
        models = dict(bases)
        for component, (values, config) in kohya.read(state, bases).items():
            config = {**config, "lora_alpha": config["lora_alpha"] * weight,
                      "alpha_pattern": {k: v * weight for k, v in config.get("alpha_pattern", {}).items()}}
            model = reference_impl.get_peft_model(copy.deepcopy(bases[component]), reference_impl.LoraConfig(**config))
            reference_impl.set_peft_model_state_dict(model, values)
            models[component] = model.eval()
        return models

    unmerged = adapted(1.0)
    out = {"unmerged": diffusion_cases.denoise(unmerged["unet"], unmerged["text_encoder"], inputs),
           "disabled": diffusion_cases.denoise(bases["unet"], bases["text_encoder"], inputs)}
    weighted = adapted(case.manifest["adapter_weight"])
    out["weighted"] = diffusion_cases.denoise(weighted["unet"], weighted["text_encoder"], inputs)
    for component, model in unmerged.items():
        if model is not bases[component]:
            model.merge_adapter()
    out["merged"] = diffusion_cases.denoise(unmerged["unet"], unmerged["text_encoder"], inputs)
    return out
