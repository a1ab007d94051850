"""peft-conformance: checks that a LoRA implementation computes, saves and loads what Hugging Face peft does.

Run it with `pytest --pyargs conformance.suite --peft-impl=NAME` or `peft-conformance run --impl NAME`.
A driver (conformance/api.py) connects an implementation to the suite; the spec lives in conformance/spec/.
"""

__version__ = "0.2.0"
SPEC_VERSION = 1
