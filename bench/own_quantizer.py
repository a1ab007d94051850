"""The calibration of the `requantized` tolerance class (conformance/spec/tolerances.toml): torchtune's QLoRA over
its own torchao NF4 base against peft over bitsandbytes', on 24 fixed cases of the zoo's 4-bit llamas (float32).
For each case, what the adapter adds (the output minus each side's own base output) and the adapter gradients,
their largest difference relative to their largest value, and how far the two bases themselves are apart.

    python -m bench.own_quantizer        # needs the torchtune and qlora extras; about 1 min on 2 cores
"""

import itertools

import torch

from conformance.drivers.peft import PeftDriver
from conformance.drivers.torchtune import TorchtuneQLoRADriver
from conformance.engine import harness
from conformance.engine.strategies import Case
from conformance.zoo import quantized

MODELS = ("llama-nf4", "llama-qlora", "llama-nf4-bf16")
TARGETS = (["q_proj"], ["v_proj", "down_proj"], ["k_proj", "o_proj", "up_proj"], ["gate_proj"])
RANKS = ((1, 16), (4, 8))  # (r, lora_alpha)


def contribution(adapted: harness.Adapted) -> tuple[torch.Tensor, torch.Tensor]:
    """(output minus the output with every lora_B zero, the output)."""
    output, values = adapted.output(), adapted.values
    harness.load(adapted, {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in values.items()})
    base = adapted.output()
    harness.load(adapted, values)
    return output - base, output


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    quantized.quiet()
    tune, peft = TorchtuneQLoRADriver(), PeftDriver()
    worst = {"contribution": 0.0, "gradient": 0.0}
    cases = itertools.product(MODELS, TARGETS, RANKS)
    for i, (model, targets, (r, alpha)) in enumerate(cases):
        case = Case(model, {"target_modules": targets, "r": r, "lora_alpha": alpha}, 0, i, i + 1, i + 2)
        mine, theirs = harness.pair(tune, peft, case, "cpu", torch.float32)
        (c_mine, out_mine), (c_theirs, out_theirs) = contribution(mine), contribution(theirs)
        for adapted in (mine, theirs):
            adapted.output().float().square().sum().backward()
        grads = [{k: v.grad for k, v in driver.adapter_state_dict(adapted.model).items()}
                 for driver, adapted in ((tune, mine), (peft, theirs))]
        c_rel = relative(c_mine, c_theirs)
        g_rel = max(relative(grads[0][k], grads[1][k]) for k in grads[1])
        bases = ((out_mine - c_mine) - (out_theirs - c_theirs)).abs().max().item()
        worst = {"contribution": max(worst["contribution"], c_rel), "gradient": max(worst["gradient"], g_rel)}
        print(f"{model:15} {'+'.join(targets):24} r={r} alpha={alpha:2}: contribution {c_rel:.2g} of its largest "
              f"({(c_mine - c_theirs).abs().max():.2g} absolute), gradients {g_rel:.2g}; bases apart {bases:.2g}")
    print(f"worst, relative to the largest value: {worst}")


if __name__ == "__main__":
    main()
