"""Broken drivers for IA3, LoHa and LoKr: each breaks one step of a method the way a port of it goes wrong."""

import contextlib
import types

import torch

from reference_impl import delta_layer, ia3, loha, lokr
from reference_impl.adapter_layer import AdapterLayer
from tests.mutants.base import Mutant


class _LayerMutant(Mutant):
    """Breaks every layer of one class, in wrapped and in loaded models alike."""

    layer_class: type = AdapterLayer

    def patch(self, layer) -> None:
        raise NotImplementedError

    def _patch_all(self, model):
        for layer in model.modules():
            if isinstance(layer, self.layer_class):
                self.patch(layer)
        return model

    def after_wrap(self, model, config):
        self._patch_all(model)

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        return self._patch_all(super().load(base_model, directory, adapter_name, is_trainable))


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


class IA3ScalesOutputAlways(Mutant):
    """feedforward_modules is ignored: every IA3 layer rescales its output, with an (out, 1) vector."""

    kills, test = ("IA3-FWD-001", "IA3-GRAD-001", "IA3-MATCH-001", "IA3-GOLD-001"), \
        "test_methods::test_output_is_the_formula"

    def wrap(self, model, config, adapter_name="default"):
        with _replaced(ia3, "is_feedforward", lambda path, config: False):
            return super().wrap(model, config, adapter_name)

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        with _replaced(ia3, "is_feedforward", lambda path, config: False):
            return super().load(base_model, directory, adapter_name, is_trainable)


class IA3MergeSkipsBias(_LayerMutant):
    """Merging rescales the weight but not the bias of an output-side IA3 layer, so y = (W x) * l + b."""

    kills, test, layer_class = ("IA3-MERGE-001",), "test_methods::test_merge_unmerge_and_unload", ia3.IA3Layer

    def patch(self, layer):
        def merge(self, adapter_names=None, safe_merge=False):
            bias = self.base_layer.bias
            self.base_layer.bias = None  # hide it from the merge
            try:
                ia3.IA3Layer.merge(self, adapter_names, safe_merge)
            finally:
                self.base_layer.bias = bias
        layer.merge = types.MethodType(merge, layer)


class LoHaIgnoresScaling(_LayerMutant):
    """LoHa's delta is used without alpha / r (as if alpha == r)."""

    kills = ("LOHA-FWD-001", "LOHA-FWD-002", "LOHA-GRAD-001", "LOHA-GOLD-001")
    test, layer_class = "test_methods::test_output_is_the_formula", loha.LoHaLayer

    def patch(self, layer):
        for name in layer.scaling:
            layer.scaling[name] = 1.0


class LoHaCpKernelTransposed(_LayerMutant):
    """The CP rebuild of a LoHa conv reads the core's kernel dimensions swapped (k, l) -> (l, k)."""

    kills, test, layer_class = ("LOHA-FWD-002",), "test_methods::test_loha_cp_output_is_the_formula", loha.LoHaLayer

    def patch(self, layer):
        def method_delta(self, name):
            if name not in self.hada_t1:
                return loha.LoHaLayer.method_delta(self, name)
            first = torch.einsum("ijlk,jr,ip->prkl", self.hada_t1[name], self.hada_w1_b[name], self.hada_w1_a[name])
            second = torch.einsum("ijlk,jr,ip->prkl", self.hada_t2[name], self.hada_w2_b[name], self.hada_w2_a[name])
            return first * second * self.scaling[name]
        layer.method_delta = types.MethodType(method_delta, layer)


class LoKrKronReversed(_LayerMutant):
    """LoKr's Kronecker product is taken in the other order, kron(w2, w1): same shape, other values."""

    kills = ("LOKR-FWD-001", "LOKR-GRAD-001", "LOKR-GOLD-001")
    test, layer_class = "test_methods::test_output_is_the_formula", lokr.LoKrLayer

    def patch(self, layer):
        def method_delta(self, name):
            w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
            w2 = self.lokr_w2[name] if name in self.lokr_w2 else self.lokr_w2_a[name] @ self.lokr_w2_b[name]
            if w2.dim() == 4 or name in self.lokr_t2:
                return lokr.LoKrLayer.method_delta(self, name)
            return torch.kron(w2, w1) * self.scaling[name]
        layer.method_delta = types.MethodType(method_delta, layer)


class LoKrAlwaysWholeW2(Mutant):
    """LoKr never decomposes w2: it stores the whole (b, d) factor whatever the rank, so the keys differ from
    peft's for small ranks."""

    kills, test = ("LOKR-KEYS-001",), "test_methods::test_lokr_factor_shapes_match_peft"

    def wrap(self, model, config, adapter_name="default"):
        def factor_shapes(layer, r, config):
            shapes = lokr.LoKrLayer.factor_shapes(layer, r, config)
            if "lokr_w2_a" in shapes and "lokr_t2" not in shapes:
                b, d = shapes.pop("lokr_w2_a")[0], shapes.pop("lokr_w2_b")[1]
                shapes["lokr_w2"] = (b, d)
            return shapes
        with _replaced(lokr.LoKrLayer, "factor_shapes", factor_shapes):
            return super().wrap(model, config, adapter_name)


class DeltaMergeSubtracts(_LayerMutant):
    """LoHa and LoKr merge by subtracting the delta (a sign slip shared by merge and unmerge)."""

    kills = ("LOHA-MERGE-001", "LOKR-MERGE-001")
    test, layer_class = "test_methods::test_merge_unmerge_and_unload", delta_layer.DeltaLayer

    def patch(self, layer):
        def merge(self, adapter_names=None, safe_merge=False):
            for name in adapter_names if adapter_names is not None else self.active_adapters:
                if self.has_adapter(name) and name not in self.merged_adapters:
                    self.base_layer.weight.data -= self.delta_weight(name)
                    self.merged_adapters.append(name)
        layer.merge = types.MethodType(merge, layer)


class MethodInitIgnored(Mutant):
    """The methods' init switches are dropped: every factor (every IA3 vector) starts random, so a freshly
    wrapped model no longer computes as its base."""

    kills = ("IA3-INIT-001", "LOHA-INIT-001", "LOKR-INIT-001")
    test = "test_methods::test_initial_adapter_computes_as_the_base"

    def edit_config(self, config):
        field = "init_ia3_weights" if config.get("peft_type") == "IA3" else "init_weights"
        return {**config, field: False} if config.get("peft_type", "LORA") != "LORA" else config


class AdaptersCountedTwice(Mutant):
    """get_nb_trainable_parameters adds the adapter's tensors to the total once more."""

    kills = ("IA3-PARAM-001", "LOHA-PARAM-001", "LOKR-PARAM-001")
    test = "test_methods::test_trainable_parameter_counts"

    def trainable_parameters(self, model):
        trainable, total = super().trainable_parameters(model)
        return trainable, total + trainable


class SavesPeftTypeLora(Mutant):
    """adapter_config.json always says peft_type 'LORA', whatever the method (a writer built for LoRA only)."""

    kills = ("IA3-SER-001", "LOHA-SER-001", "LOKR-SER-001")
    test = "test_methods::test_save_and_load"

    def save(self, model, directory, adapter_name="default"):
        from tests.mutants.base import edit_files

        super().save(model, directory, adapter_name)
        edit_files(directory, config=lambda config: {**config, "peft_type": "LORA"}, adapter_name=adapter_name)


class SwallowsUnsupportedTargets(Mutant):
    """A config the method cannot run (an unsupported layer, an invalid value) leaves the model unadapted instead
    of raising: the user trains nothing and is not told."""

    kills = ("IA3-CFG-001", "LOHA-CFG-001", "LOKR-CFG-001", "IA3-MATCH-002", "LOHA-MATCH-001", "LOKR-MATCH-001")
    test = "test_method_rules::test_refuses_conv1d_and_embeddings"

    def wrap(self, model, config, adapter_name="default"):
        try:
            return super().wrap(model, config, adapter_name)
        except (TypeError, ValueError):
            if config.get("peft_type", "LORA") == "LORA":
                raise
            return model
