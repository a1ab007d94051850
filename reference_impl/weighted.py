"""add_weighted_adapter: a new adapter made from existing ones, with a weight each.

With delta_i = s_i B_i A_i (each adapter's scaling s_i in this layer) and weights w_i, per adapted layer:
    linear  A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i,   B = sum_i sqrt|w_i s_i| B_i   (ranks must be equal;
            B A is not sum_i w_i delta_i: the cross terms stay, a rough approximation)
    cat     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],        B = [B_1, B_2, ...]           (rank sum_i r_i; exact)
    svd     U S Vh = svd(sum_i w_i delta_i),  B = U_k S_k,  A = Vh_k                   (rank k = svd_rank or max r_i;
            the best rank-k approximation)
The new adapter has r = lora_alpha = its rank (scaling 1), targets the union of the adapters' targets, and is
added inactive and frozen. Spec: LORA-WADD-001..004.
"""

import copy
import math

import torch
from torch import nn

COMBINATIONS = ("linear", "cat", "svd")
PEFT_ONLY_COMBINATIONS = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                          "magnitude_prune", "magnitude_prune_svd")


def add_weighted_adapter(lora_model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank=None, svd_clamp=None, svd_full_matrices=True,
                         svd_driver=None) -> None:
    """Add `adapter_name` combining `adapters` (see the module docstring). As in peft, a name already in use
    returns silently, and with one adapter the combination is always linear. Spec: LORA-WADD-001..004."""
    if adapter_name in lora_model.peft_config:
        return  # peft 0.21.2 tuners/lora/model.py:854: an existing name is kept as it is, without a word
    combination_type, rank, targets = _check(lora_model, adapters, combination_type, svd_rank)
    config = copy.deepcopy(lora_model.peft_config[adapters[0]])
    config.r, config.lora_alpha, config.target_modules = rank, rank, targets
    config.rank_pattern, config.alpha_pattern = {}, {}
    lora_model.inject(config, adapter_name)  # draws initial values like any new adapter, then overwritten
    for _, layer in lora_model.adapter_layers():
        if adapter_name not in layer.r:
            continue
        present = [(name, w) for name, w in zip(adapters, weights) if name in layer.r]
        if not present:
            raise ValueError("No matching LoRAs found. Please raise an issue on GitHub.")
        A, B = layer.factors(adapter_name)
        with torch.no_grad():
            if combination_type == "cat":
                _cat(layer, present, A, B)
            elif combination_type == "linear":
                _linear(layer, present, A, B)
            else:
                _svd(layer, present, A, B, rank, svd_clamp, svd_full_matrices, svd_driver)
        for tensor in layer.adapter_tensors(adapter_name).values():
            tensor.requires_grad_(False)


def _check(lora_model, adapters: list[str], combination_type: str, svd_rank):
    """(combination type, new rank, new target_modules), or the error peft raises. Spec: LORA-WADD-004."""
    configs = lora_model.peft_config
    for name in adapters:
        if name not in configs:
            raise ValueError(f"Adapter {name} does not exist")
    for name in adapters:
        if configs[name].target_parameters:
            raise ValueError(f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter "
                             f"'{name}')")
    shared = [w for w in lora_model.wrappers() if sum(name in w.modules_to_save for name in adapters) > 1]
    if shared:
        raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, but "
                         f"found {len(shared)} such instance(s).")
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = [max(configs[n].r, *configs[n].rank_pattern.values()) if configs[n].rank_pattern else configs[n].r
             for n in adapters]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError("All adapters must have the same r value when using combination_type linear, ties, "
                             "dare_ties or dare_linear.")
        rank = ranks[0]
    elif combination_type == "cat":
        rank = sum(ranks)
    elif combination_type == "svd":
        rank = svd_rank or max(ranks)
    elif combination_type in PEFT_ONLY_COMBINATIONS:
        raise ValueError(f"combination_type {combination_type!r} is one of peft's; reference_impl implements "
                         f"{', '.join(COMBINATIONS)}")
    else:
        raise ValueError(f"Invalid combination_type: {combination_type}")
    targets = [configs[n].target_modules for n in adapters]
    if len({type(t) for t in targets}) > 1:
        raise ValueError("all adapter configs should follow the same target modules type. Combining adapters with "
                         "`target_modules` type being a mix of list/set and string is not supported.")
    if isinstance(targets[0], str):
        return combination_type, rank, "|".join(f"({t})" for t in targets)
    return combination_type, rank, set().union(*targets)


def _cat(layer, present, A, B) -> None:
    """Stack the factors; the weights and scalings go into A. Rows of adapters absent here stay zero."""
    As = torch.cat([layer.factors(n)[0] * w * layer.scaling[n] for n, w in present], dim=0)
    Bs = torch.cat([layer.factors(n)[1] for n, _ in present], dim=1)
    A.zero_()
    B.zero_()
    A[:As.shape[0]] = As
    B[:, :Bs.shape[1]] = Bs


def _linear(layer, present, A, B) -> None:
    """Weighted sums of the factors; each weight is split as a square root over A and B, its sign on A."""
    roots = [math.sqrt(abs(w * layer.scaling[n])) for n, w in present]
    signs = [1 if w * layer.scaling[n] >= 0 else -1 for n, w in present]
    A.copy_(_weighted_sum([layer.factors(n)[0] for n, _ in present], [r * s for r, s in zip(roots, signs)]))
    B.copy_(_weighted_sum([layer.factors(n)[1] for n, _ in present], roots))


def _weighted_sum(tensors: list, weights: list[float]) -> torch.Tensor:
    """sum_i weights[i] * tensors[i], as peft's task_arithmetic computes it (a float32 weight vector)."""
    stacked = torch.stack(tensors)
    factors = torch.tensor(weights).to(stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    return (stacked * factors).sum(dim=0)


def _svd(layer, present, A, B, rank: int, clamp, full_matrices: bool, driver) -> None:
    """Truncated SVD of the weighted sum of deltas, taken in the factors' layout (out, in)."""
    deltas = [layer.out_first(layer.delta_weight(n)) for n, _ in present]  # (out, in, ...) for every layer type
    delta = _weighted_sum(deltas, [w for _, w in present])
    if isinstance(layer.base_layer, nn.Conv2d):  # (out, in * kh * kw); peft flattens Conv2d only
        delta = delta.flatten(start_dim=1)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    U, Vh = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    B.data, A.data = U.reshape(B.shape), Vh.reshape(A.shape)
