"""The driver for reference_impl."""

import reference_impl
from reference_impl import save_load

from .peft_shaped import PeftShapedDriver


def ReferenceDriver() -> PeftShapedDriver:
    return PeftShapedDriver("reference", reference_impl, reference_impl.__version__, save_load.adapter_state_dict)
