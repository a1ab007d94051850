"""diffusers as a consumer: a StableDiffusionPipeline around the case's UNet and text encoder, the kohya file loaded
with load_lora_weights (diffusers converts it and applies it through peft), then set_adapters with the case's
weight, disable_lora / enable_lora and fuse_lora, the denoiser's output read after each."""

from ...zoo import diffusion
from .. import diffusion_cases
from . import NotApplicable

ADAPTER = "case"


def identity() -> dict:
    import diffusers
    import peft
    import transformers

    return {"name": "diffusers",
            "version": f"{diffusers.__version__} (peft {peft.__version__}, transformers {transformers.__version__})"}


def compute(case) -> dict:
    if case.kind != "diffusion":
        raise NotApplicable("diffusers' load_lora_weights loads adapters into diffusion pipelines; this case is a "
                            "language model")
    bases = diffusion_cases.load_base(case.base_dir)
    pipe = diffusion.pipeline(bases["unet"], bases["text_encoder"])
    pipe.load_lora_weights(str(case.adapter_dir.parent), weight_name=case.adapter_dir.name, adapter_name=ADAPTER)
    inputs = case.inputs()
    denoise = lambda: diffusion_cases.denoise(pipe.unet, pipe.text_encoder, inputs)  # noqa: E731
    out = {"unmerged": denoise()}
    out["weighted"] = _attempt(lambda: (pipe.set_adapters([ADAPTER], adapter_weights=[case.manifest["adapter_weight"]]),
                                        denoise())[1])
    pipe.set_adapters([ADAPTER], adapter_weights=[1.0])
    out["disabled"] = _attempt(lambda: (pipe.disable_lora(), denoise())[1])
    pipe.enable_lora()
    out["merged"] = _attempt(lambda: (pipe.fuse_lora(adapter_names=[ADAPTER]), denoise())[1])
    return out


def _attempt(compute_output):
    """An output diffusers fails to compute is that output's result (the runner reports it), not the case's end."""
    try:
        return compute_output()
    except Exception as error:  # noqa: BLE001
        return error
