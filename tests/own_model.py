"""A small model of a user's own (not in the zoo), for the regression-gate tests: `tests.own_model:build`."""

import torch
from torch import nn


class Tagger(nn.Module):
    """An embedding, a hidden projection and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 32)
        self.out = nn.Linear(32, 5)

    def forward(self, input_ids):
        return self.out(torch.relu(self.proj(self.embed(input_ids))))


def build() -> nn.Module:
    torch.manual_seed(0)
    return Tagger().eval()


def write_adapters(folder) -> list:
    """Two adapters trained by nobody: peft's layers with random values, saved by peft."""
    import peft

    configs = {"proj-r4": dict(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False),
               "all-r2-rslora": dict(r=2, target_modules=["proj", "out", "embed"], use_rslora=True,
                                     init_lora_weights=False)}
    paths = []
    for name, config in configs.items():
        torch.manual_seed(1)
        peft.get_peft_model(build(), peft.LoraConfig(**config)).save_pretrained(folder / name)
        paths.append(folder / name)
    return paths


def random_gpt2() -> nn.Module:
    """A tiny GPT-2 from an unseeded RNG, as many users' factories are: check-adapter must seed each build."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)).eval()
