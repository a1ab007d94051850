"""reference_impl as a consumer: PeftModel.from_pretrained on the corpus files, then unmerged, disabled, merged."""

import torch

import reference_impl

from . import base_model


def identity() -> dict:
    return {"name": "reference", "version": reference_impl.__version__}


def compute(case) -> dict:
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
