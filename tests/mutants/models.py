"""Broken drivers for the models LoRA is used on: classifier heads, key prefixes of multimodal wrappers, grouped-query
attention shapes, in-memory names, embeddings saved beside the adapter, base tensors in adapter files, tied
embeddings. Each is a bug reported against a real library."""

import copy

import torch

from reference_impl import layers, save_load
from tests.mutants.base import Mutant, adapter_dir, edited_copy, lora_layers


class DropsTaskHeads(Mutant):
    """task_type=SEQ_CLS is kept in the config but does not add the classifier to modules_to_save: the head stays
    frozen and is lost on save."""

    kills, test = ("LORA-TASK-001",), "test_task::test_task_heads_train_and_are_saved"

    def wrap(self, model, config, adapter_name="default"):
        task_type = config.pop("task_type", None)
        wrapped = super().wrap(model, config, adapter_name)
        wrapped.peft_config[adapter_name].task_type = task_type
        return wrapped


class ForwardDropsLabels(Mutant):
    """The wrapper's forward takes input_ids and attention_mask only: labels (and decoder inputs' labels) are
    dropped, so training gets no loss."""

    kills, test = ("LORA-TASK-002",), "test_task::test_task_forward_takes_labels_and_returns_peft_s_loss"
    DROPPED = ("labels", "start_positions", "end_positions")

    def after_wrap(self, model, config):
        forward = model.forward
        model.forward = lambda *args, **kwargs: forward(*args, **{k: v for k, v in kwargs.items()
                                                                  if k not in self.DROPPED})


class ReloadForgetsTaskType(Mutant):
    """Loading reads adapter_config.json without task_type: the head's tensors load into the base classifier, and the
    reloaded adapter no longer lists or trains it."""

    kills, test = ("LORA-TASK-003",), "test_task::test_task_adapter_reloads_with_its_head"

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        stripped = edited_copy(adapter_dir(directory, adapter_name),
                               config=lambda c: {**c, "task_type": None, "modules_to_save": None})
        return super().load(base_model, stripped, adapter_name, is_trainable)


class DropsLanguageModelPrefix(Mutant):
    """Keys are exchanged as if the language model sat at the top (a LLaVA adapter keyed like a Llama one): with the
    'language_model.' part dropped, peft's keys match nothing and the adapter silently computes the base output."""

    kills, test = ("LORA-KEYS-001",), "test_keys::test_keys_and_shapes_match_peft_on_every_zoo_model"

    def adapter_state_dict(self, model, adapter_name="default"):
        state = super().adapter_state_dict(model, adapter_name)
        return {key.replace(".language_model.", "."): value for key, value in state.items()}


class KeyValueAdaptersOfQueryWidth(Mutant):
    """k_proj and v_proj adapters are built as wide as the hidden size, as if every attention had as many key/value
    heads as query heads (grouped-query attention ignored): lora_B has the wrong shape."""

    kills, test = ("LORA-KEYS-003",), "test_keys::test_keys_and_shapes_match_peft_on_every_zoo_model"

    def adapter_state_dict(self, model, adapter_name="default"):
        state = super().adapter_state_dict(model, adapter_name)
        for key, tensor in state.items():
            if key.endswith(("k_proj.lora_B.weight", "v_proj.lora_B.weight")):
                width = model.get_submodule(key.removesuffix(".lora_B.weight")).in_features
                state[key] = torch.zeros(width, tensor.shape[1], requires_grad=tensor.requires_grad)
        return state


class MagnitudeRegisteredFirst(Mutant):
    """DoRA's magnitude is registered before lora_A and lora_B, so named_parameters() lists it first: an optimizer
    checkpoint written with peft puts its state on the wrong tensors."""

    kills, test = ("LORA-KEYS-009",), "test_keys::test_in_memory_names_match_peft"

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            modules = layer._modules
            first = {name: modules[name] for name in ("base_layer", "lora_dropout", "lora_magnitude_vector")}
            layer._modules = {**first, **{k: v for k, v in modules.items() if k not in first}}


class OmitsEmbeddingBaseWeights(Mutant):
    """An adapter that targets embed_tokens or lm_head is saved without the embeddings' base weights, so a resized
    vocabulary does not travel with it."""

    kills, test = ("LORA-KEYS-010",), "test_keys::test_targeted_embeddings_save_their_base_weights"

    def adapter_state_dict(self, model, adapter_name="default"):
        return {k: v for k, v in super().adapter_state_dict(model, adapter_name).items()
                if not k.endswith(".base_layer.weight")}


class IgnoresBaseTensorsOnLoad(Mutant):
    """Loading keeps only the adapter's own tensors: a layer norm (or embedding) weight in the file, as extraction
    tools write them, is dropped and the base model keeps its old values."""

    kills, test = ("LORA-LOAD-007",), "test_load::test_base_tensors_in_the_file_load_into_the_base"

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        folder = adapter_dir(directory, adapter_name)
        config = save_load.read_config(folder)
        own = set(save_load.adapter_state_dict(self.lib.get_peft_model(copy.deepcopy(base_model), config)))
        kept = edited_copy(folder, tensors=lambda t: {k: v for k, v in t.items() if k in own})
        return super().load(base_model, kept, adapter_name, is_trainable)


class TiedConfigAfterUntying(Mutant):
    """merge_and_unload leaves config.tie_word_embeddings=True although the merged input and output embeddings no
    longer share storage: a re-saved model ties them again on load and loses one of the merged deltas."""

    kills, test = ("LORA-MERGE-010",), "test_merge::test_tied_embeddings_config_tells_the_truth_after_merge"

    def merge_and_unload(self, model):
        config = getattr(model, "config", None)
        tied = getattr(config, "tie_word_embeddings", None)
        merged = super().merge_and_unload(model)
        if tied is not None:
            merged.config.tie_word_embeddings = tied
        return merged


class CountsIgnoreGroupedQueryAttention(Mutant):
    """Parameter counts are computed as if k_proj and v_proj were as wide as the hidden size (multi-head attention
    assumed), so a grouped-query model's trainable count is overstated."""

    kills, test = ("LORA-PARAM-005",), "test_param::test_full_size_llama_family_counts"

    def trainable_parameters(self, model):
        trainable, total = super().trainable_parameters(model)
        extra = sum(layer.r[name] * (layer.in_features - layer.out_features)
                    for path, layer in model.named_modules() if path.endswith(("k_proj", "v_proj"))
                    and isinstance(layer, layers.LoraLayer) for name in layer.r)
        return trainable + extra, total + extra
