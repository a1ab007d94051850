"""transformers' own adapter loading, the path most Hugging Face users take: `model.load_adapter(dir)` on a
transformers model (peft does the injection underneath), `disable_adapters()` for the base logits. transformers has
no merge of its own, so "merged" is not applicable."""

import torch
import transformers

from . import base_model, language_models_only


def identity() -> dict:
    import peft

    return {"name": "transformers load_adapter", "version": transformers.__version__, "peft": peft.__version__,
            "not_applicable": {"merged": "transformers' PeftAdapterMixin has no merge (merging goes through peft's "
                                         "PeftModel)"}}


def compute(case) -> dict:
    language_models_only(case, "transformers' load_adapter")
    model = base_model(case)
    model.load_adapter(str(case.adapter_dir), adapter_name=case.manifest["adapter_name"])
    model.eval()
    inputs = case.inputs()
    with torch.no_grad():
        out = {"unmerged": model(**inputs).logits}
        try:
            model.disable_adapters()
            out["disabled"] = model(**inputs).logits
        except ValueError as refusal:  # transformers 5 refuses peft < 0.22 here, after load_adapter accepted it
            out["disabled"] = refusal
    return out
