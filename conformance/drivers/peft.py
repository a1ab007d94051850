"""The driver for Hugging Face peft: the oracle, and an implementation like any other."""

import peft

from .peft_shaped import PeftShapedDriver


def _live_state_dict(model, adapter_name: str):
    # Given the parameters and buffers themselves (not state_dict() copies), peft's own key mapping returns live
    # tensors. Buffers matter for modules_to_save (a BatchNorm's running statistics are saved too).
    live = model.state_dict(keep_vars=True)
    return peft.get_peft_model_state_dict(model, state_dict=live, adapter_name=adapter_name)


def PeftDriver() -> PeftShapedDriver:
    return PeftShapedDriver("peft", peft, peft.__version__, _live_state_dict)
