"""TOK: trainable_token_indices, selected embedding rows trained next to a LoRA adapter (new special tokens), on a
model with an untied and two with a tied output layer."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance.engine import harness, strategies
from conformance.engine.harness import PREFIX
from conformance.zoo import models

# zoo model -> (its input embedding's name, a LoRA target elsewhere)
MODELS = {"llama": ("embed_tokens", "q_proj"), "qwen2-tied": ("embed_tokens", "q_proj"), "gpt2-tiny": ("wte", "c_attn")}


def _draw(run, data) -> strategies.Case:
    """A LoRA adapter plus trainable rows: tokens the inputs use (so that they matter) and one they do not."""
    model = data.draw(st.sampled_from(sorted(MODELS)), label="model")
    embedding, target = MODELS[model]
    seeds = [data.draw(strategies.seeds, label=label) for label in ("init_seed", "values_seed", "inputs_seed")]
    used = sorted(set(models.inputs(model, seeds[2])["input_ids"].flatten().tolist()) - {0})
    rows = data.draw(st.lists(st.sampled_from(used), min_size=1, max_size=3, unique=True), label="used rows")
    rows.append(data.draw(st.sampled_from([i for i in range(1, 64) if i not in used]), label="unused row"))
    indices = rows if data.draw(st.booleans(), label="as a list?") else {embedding: rows}
    config = {"target_modules": [target], "r": data.draw(st.integers(1, 4), label="r"),
              "trainable_token_indices": indices}
    return run.admit(strategies.Case(model, config, 0, *seeds))


def _rows(case) -> list[int]:
    indices = case.config["trainable_token_indices"]
    return indices if isinstance(indices, list) else next(iter(indices.values()))


def _delta_key(mine) -> str:
    base = mine.base()
    embedding = base.get_input_embeddings()
    path = next(name for name, module in base.named_modules() if module is embedding)
    return f"{PREFIX}{path}.token_adapter.trainable_tokens_delta"


def _with_rows_replaced(run, mine) -> torch.nn.Module:
    """The base model whose input embedding (and so a tied output layer) holds the trained rows."""
    expected = mine.base()
    delta = run.tensor(mine.values, _delta_key(mine), "LORA-TOK-002")
    with torch.no_grad():
        expected.get_input_embeddings().weight[_rows(mine.case)] = delta.to(expected.dtype)
    return expected


@pytest.mark.req("LORA-TOK-001")
@given(data=st.data())
def test_selected_rows_replace_the_embedding_s(run, device, data):
    case = _draw(run, data)
    mine = run.wrap(case)
    # The LoRA adapter set to zero (B = 0): the output is then the rows' doing alone.
    values = harness.adapter_values(run.peft_state(mine.model), case.values_seed)
    values = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in values.items()}
    run.load(mine, values)
    run.close(mine.output(), mine.output(_with_rows_replaced(run, mine)),
              f"output vs the base model with rows {_rows(case)} of the input embedding replaced")
    if run.oracle_driver is None:
        return
    mine, theirs = run.pair(case)
    run.close(mine.output(), theirs.output(), "output vs peft's")
    for adapted in (mine, theirs):
        adapted.output().square().sum().backward()
    run.all_close(run.gradients(mine), run.gradients(theirs), "adapter gradients vs peft's")


@pytest.mark.req("LORA-TOK-002")
@given(data=st.data())
def test_only_the_selected_rows_train_and_are_saved(run, device, data):
    case = _draw(run, data)
    mine = run.wrap(case)
    lora_only = run.wrap(case._replace(config={k: v for k, v in case.config.items()
                                               if k != "trainable_token_indices"}))
    dim = mine.base().get_input_embeddings().embedding_dim
    found = run.impl.trainable_parameters(mine.model)[0] - run.impl.trainable_parameters(lora_only.model)[0]
    run.check(found == len(_rows(case)) * dim, f"trainable_token_indices {case.config['trainable_token_indices']} "
                                               f"add {found} trainable parameters, expected {len(_rows(case))} x {dim}")
    state = run.peft_state(mine.model)
    key = _delta_key(mine)
    run.check(key in state, f"no {key} among the adapter keys {sorted(state)[:4]}")
    run.check(tuple(state[key].shape) == (len(_rows(case)), dim),
              f"{key}: shape {tuple(state[key].shape)}, expected {(len(_rows(case)), dim)}")
    full = sorted(k for k in state if k.endswith((".weight", "embed_tokens", "wte")) and ".lora_" not in k)
    run.check(not full, f"full weights saved beside the trainable rows: {full[:3]}")


@pytest.mark.req("LORA-TOK-004")
@given(data=st.data())
def test_saved_indices_keep_their_order_and_reload(run, device, data, tmp_path_factory):
    case = _draw(run, data)
    mine = run.adapted(case)
    directory = tmp_path_factory.mktemp("tokens")
    run.impl.save(mine.model, str(directory))
    saved = json.loads((directory / "adapter_config.json").read_text()).get("trainable_token_indices")
    run.check(saved == case.config["trainable_token_indices"],
              f"adapter_config.json holds trainable_token_indices {saved}, configured "
              f"{case.config['trainable_token_indices']}: row i of the saved delta belongs to the i-th index")
    expected = mine.output()
    run.equal(mine.output(run.impl.load(mine.base(), str(directory))), expected, "output after reloading")
    if run.oracle_driver is not None:
        run.equal(mine.output(run.oracle.load(mine.base(), str(directory))), expected, "output loaded by peft")


@pytest.mark.req("LORA-TOK-003")
@given(data=st.data())
def test_merge_and_unload_writes_the_rows(run, device, data):
    mine = run.adapted(_draw(run, data))
    unmerged = mine.output()
    merged = run.impl.merge_and_unload(mine.model)
    run.close(mine.output(merged), unmerged, "output after merge_and_unload vs unmerged")
    embedding = merged.get_input_embeddings()
    run.check(type(embedding) is torch.nn.Embedding, f"the input embedding after merge_and_unload is a "
                                                     f"{type(embedding).__name__}, expected the plain nn.Embedding")
    if type(embedding) is torch.nn.Embedding:
        run.close(embedding.weight[_rows(mine.case)], mine.values[_delta_key(mine)].to(embedding.weight),
                  "the embedding's rows after merge_and_unload vs the trained rows")
