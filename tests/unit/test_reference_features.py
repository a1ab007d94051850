"""reference_impl's complete feature set against peft on the same draw: conv layers, DoRA on every layer type,
several adapters, chosen merges, long target lists, and the peft quirks we reproduce."""

import copy
import warnings

import pytest
import torch
from torch import nn

import reference_impl as ref
from reference_impl import save_load

peft = pytest.importorskip("peft")


class ConvModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c2_1x1 = nn.Conv2d(6, 4, 1)
        self.c3 = nn.Conv3d(3, 4, (1, 2, 2))
        self.emb = nn.Embedding(20, 6)

    def forward(self, seq, image, volume, tokens):
        out = [self.c1(seq).sum(), self.c2_1x1(self.c2(image)).sum(dim=1), self.c3(volume).mean(), self.emb(tokens)]
        return torch.cat([t.flatten() for t in out])


INPUTS = dict(seq=torch.randn(2, 3, 7), image=torch.randn(2, 3, 6, 6), volume=torch.randn(2, 3, 3, 4, 4),
              tokens=torch.randint(0, 20, (2, 5)))


def _build():
    torch.manual_seed(0)
    return ConvModel().eval()


def _pair(config: dict, build=_build, seed: int = 7):
    models = []
    for lib in (ref, peft):
        torch.manual_seed(seed)
        models.append(lib.get_peft_model(build(), lib.LoraConfig(**copy.deepcopy(config))).eval())
    values = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
              for k, v in peft.get_peft_model_state_dict(models[1]).items()}
    ref.set_peft_model_state_dict(models[0], values)
    peft.set_peft_model_state_dict(models[1], values)
    return models


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv_and_embedding_layers_match_peft_unmerged_and_merged(use_dora):
    config = dict(r=2, lora_alpha=4, target_modules=["c1", "c2", "c2_1x1", "c3", "emb"], use_dora=use_dora)
    mine, theirs = _pair(config)
    assert sorted(ref.get_peft_model_state_dict(mine)) == sorted(peft.get_peft_model_state_dict(theirs))
    expected = theirs(**INPUTS)
    _close(mine(**INPUTS), expected)
    mine.merge_adapter()
    theirs.merge_adapter()
    _close(mine(**INPUTS), expected, 1e-4)
    for (name, mine_p), (_, their_p) in zip(mine.named_parameters(), theirs.named_parameters()):
        if "base_layer" in name:
            _close(mine_p, their_p, 1e-5)
    mine.unmerge_adapter()
    _close(mine(**INPUTS), expected)


def test_dora_gradients_on_every_layer_type_match_peft():
    mine, theirs = _pair(dict(r=2, target_modules=["c1", "c2", "emb"], use_dora=True, lora_dropout=0.3))
    for model in (mine, theirs):
        model.train()
        torch.manual_seed(3)  # dropout draws: DoRA recomputes W x on the dropped input
        model(**INPUTS).square().sum().backward()
    theirs_live = peft.get_peft_model_state_dict(theirs, state_dict=dict(theirs.named_parameters()))
    for key, param in save_load.adapter_state_dict(mine).items():
        torch.testing.assert_close(param.grad, theirs_live[key].grad, rtol=1e-4, atol=1e-5, msg=key)


def test_conv_limits_are_peft_s():
    # groups > 1: a warning at creation and an error on merge; rank must divide by groups
    def grouped():
        return nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))

    for lib in (ref, peft):
        with pytest.warns(UserWarning, match="groups > 1"):
            model = lib.get_peft_model(grouped(), lib.LoraConfig(r=2, target_modules=["0"]))
        with pytest.raises(NotImplementedError, match="groups > 1"):
            model.merge_adapter()
        with pytest.raises(ValueError, match="divisible by groups"):
            lib.get_peft_model(grouped(), lib.LoraConfig(r=3, target_modules=["0"]))
    # dilation: lora_A ignores it, so a dilated conv that changes the output size fails in both
    for lib in (ref, peft):
        model = lib.get_peft_model(nn.Sequential(nn.Conv2d(3, 5, 3, padding=2, dilation=2)),
                                   lib.LoraConfig(r=2, target_modules=["0"]))
        with pytest.raises(RuntimeError):
            model(torch.randn(1, 3, 8, 8))


def test_conv3d_with_a_1x1xk_kernel_merges_here_though_peft_cannot():
    # peft's delta takes its 1x1 branch for kernel (1, 1, k) and fails (research R5.1); we merge it correctly.
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv3d(3, 5, (1, 1, 3)))

    mine, theirs = _pair(dict(r=4, target_modules=["0"]), build=build)
    x = torch.randn(1, 3, 2, 2, 5)
    expected = theirs(x)
    with pytest.raises(RuntimeError):
        theirs.merge_adapter()
    mine.merge_adapter()
    _close(mine(x), expected)


def test_several_adapters_merge_chosen_ones_and_delete(tiny_gpt2, token_ids):
    def build():
        return tiny_gpt2()

    models = []
    for lib in (ref, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(build(), lib.LoraConfig(r=4, target_modules=["c_attn"],
                                                           init_lora_weights=False))
        model.add_adapter("other", lib.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
        models.append(model.eval())
    mine, theirs = models
    for name in ("default", "other"):
        peft.set_peft_model_state_dict(theirs, ref.get_peft_model_state_dict(mine, adapter_name=name), name)
    for model in models:
        model.set_adapter("other")
    expected = theirs(input_ids=token_ids).logits
    _close(mine(input_ids=token_ids).logits, expected)
    mine.merge_adapter(adapter_names=["other"], safe_merge=True)
    theirs.merge_adapter(adapter_names=["other"], safe_merge=True)
    _close(mine(input_ids=token_ids).logits, theirs(input_ids=token_ids).logits)
    for model in models:
        model.unmerge_adapter()
        with warnings.catch_warnings(record=True):
            model.delete_adapter("other")  # the active one: peft activates the first remaining adapter
    assert mine.base_model.active_adapters == theirs.base_model.active_adapters == ["default"]
    _close(mine(input_ids=token_ids).logits, theirs(input_ids=token_ids).logits)


def test_disable_adapter_quirk_makes_a_frozen_adapter_trainable(tiny_gpt2, tmp_path):
    counts = []
    ref.get_peft_model(tiny_gpt2(), ref.LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(tmp_path)
    for lib in (ref, peft):
        model = lib.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
        before = model.get_nb_trainable_parameters()[0]
        with model.disable_adapter():
            pass
        counts.append((before, model.get_nb_trainable_parameters()[0]))
    assert counts[0] == counts[1] == (0, 1024)


def test_long_target_lists_shrink_as_peft_s(tiny_gpt2):
    from transformers import GPT2Config, GPT2LMHeadModel

    names = [f"transformer.h.{i}.attn.c_attn" for i in range(12)] + [f"transformer.h.{i}.mlp.c_proj" for i in range(12)]
    saved = []
    for lib in (ref, peft):
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config())
        saved.append(lib.get_peft_model(model, lib.LoraConfig(target_modules=list(names))).peft_config["default"]
                     .target_modules)
    assert saved[0] == saved[1] == {"c_attn", "mlp.c_proj"}


def test_non_default_adapters_save_to_subfolders(tiny_gpt2, tmp_path):
    written = []
    for lib in (ref, peft):
        model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(r=2, target_modules=["c_attn"]))
        model.add_adapter("alpha", lib.LoraConfig(r=2, target_modules=["c_proj"]))
        model.save_pretrained(tmp_path / lib.__name__, selected_adapters=["alpha"])
        written.append(sorted(str(p.relative_to(tmp_path / lib.__name__))
                              for p in (tmp_path / lib.__name__).rglob("adapter_*")))
    assert written[0] == written[1] == ["alpha/adapter_config.json", "alpha/adapter_model.safetensors"]
