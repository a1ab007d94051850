"""reference_impl.quantized.prepare_for_kbit_training against peft's prepare_model_for_kbit_training: the same
quantized bases prepared both ways hold the same parameters (class, dtype, values, frozen), checkpoint the same way
and pass gradients into the checkpointed blocks the same way."""

import warnings

import pytest
import torch

from conformance.zoo import models, quantized
from reference_impl.quantized import prepare_for_kbit_training

peft = pytest.importorskip("peft")
if not quantized.available():
    pytest.skip(quantized.missing_reason(), allow_module_level=True)


def _both(name: str, dtype: torch.dtype):
    theirs, mine = (models.build(name, 0, "cpu", dtype) for _ in range(2))
    for model in (theirs, mine):  # as a user's model comes: float weights trainable
        for param in model.parameters():
            param.requires_grad_(param.is_floating_point())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed gradient_checkpointing_enable
        peft.prepare_model_for_kbit_training(theirs)
    prepare_for_kbit_training(mine)
    return mine, theirs


@pytest.mark.parametrize("name, dtype", [("llama-nf4-bf16", torch.bfloat16), ("llama-fp4-dq", torch.float16),
                                         ("llama-int8", torch.float16), ("llama-nf4", torch.float32)])
def test_prepared_as_peft_prepares(name, dtype):
    mine, theirs = _both(name, dtype)
    ours, peft_s = dict(mine.named_parameters()), dict(theirs.named_parameters())
    assert list(ours) == list(peft_s)
    for key, param in ours.items():
        other = peft_s[key]
        assert (type(param), param.dtype, param.requires_grad) == (type(other), other.dtype, other.requires_grad), key
        assert torch.equal(param, other), key
    upcast = {key for key, param in ours.items() if param.dtype == torch.float32}
    if dtype != torch.float32:  # the norms, embeddings and lm_head were in `dtype` before
        assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= upcast
    assert mine.is_activation_checkpointing and theirs.is_activation_checkpointing


def _first_block_norm_gradient(model: torch.nn.Module) -> torch.Tensor:
    """Train mode, one parameter inside the first checkpointed block made trainable: its gradient after backward
    (None when the output does not depend on it through autograd)."""
    model.train()
    norm = model.model.layers[0].input_layernorm.weight
    norm.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch asks peft's call to say use_reentrant
        output = models.run("llama-nf4-bf16", model, models.inputs("llama-nf4-bf16", 0))
    if not output.requires_grad:  # reentrant checkpointing with no input needing grad: nothing to differentiate
        return None
    output.float().square().sum().backward()
    return norm.grad


def test_gradients_reach_the_checkpointed_blocks_as_with_peft():
    mine, theirs = _both("llama-nf4-bf16", torch.bfloat16)
    grads = [_first_block_norm_gradient(model) for model in (mine, theirs)]
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])


def test_checkpointing_is_the_reentrant_kind_as_with_peft():
    """Without the embeddings' hook, reentrant checkpointing gives a block's parameters no gradient (the
    non-reentrant kind would): both preparations must pick the same kind."""
    mine, theirs = _both("llama-nf4-bf16", torch.bfloat16)
    for model in (mine, theirs):
        model.get_input_embeddings()._forward_hooks.clear()
    assert [_first_block_norm_gradient(model) for model in (mine, theirs)] == [None, None]
