"""Benchmarks: reference_impl against peft and against the bare math, measured side by side in one run.

    python -m bench.run                 # full GPT-2 small on CPU (and CUDA when torch sees one); ~5 min on 2 cores
    python -m bench.run --quick         # fewer repetitions
    python -m bench.run --markdown docs/benchmarks.md

Shared machines are noisy, so nothing here is an absolute target: every variant is timed right after a run of
the base (or of peft), and the ratios of those adjacent pairs are reported (median, and the 25-75 % spread).
"""

import argparse
import contextlib
import copy
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import peft
from transformers import GPT2Config, GPT2LMHeadModel

import reference_impl as ref
from conformance.engine import harness
from conformance.zoo import models
from conformance.drivers.peft import PeftDriver
from conformance.drivers.reference import ReferenceDriver
from conformance.engine.strategies import Case
from reference_impl.peft_format import PREFIX

TARGETS = ["c_attn", "c_proj"]
SUITE_CONFIG = {"target_modules": TARGETS, "r": 4}  # the adapter of every suite-throughput example
ROWS: list[tuple[str, str, str]] = []  # (section, measurement, value) for the Markdown page


def report(section: str, what: str, value: str) -> None:
    ROWS.append((section, what, value))
    print(f"  {what:<58} {value}")


def gpt2(n_layer: int = 12, device: str = "cpu", dtype=torch.float32, smoke: bool = False) -> nn.Module:
    """GPT-2 small (or, for a smoke run that only checks the benchmark works, one narrow block)."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=1000) if smoke else GPT2Config(n_layer=n_layer)
    return GPT2LMHeadModel(config).eval().to(device=device, dtype=dtype)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def adjacent(reference_fn, variant_fn, reps: int) -> tuple[float, float, float, float]:
    """Median ratio variant/reference over adjacent pairs, its 25 % and 75 % quantiles, and the median time."""
    ratios, times = [], []
    for _ in range(reps):
        base_time, variant_time = timed(reference_fn), timed(variant_fn)
        ratios.append(variant_time / base_time)
        times.append(variant_time)
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return statistics.median(ratios), q1, q3, statistics.median(times)


def ratio_text(result) -> str:
    median, q1, q3, seconds = result
    return f"{median:.3f}x  [{q1:.3f}-{q3:.3f}]  ({seconds * 1e3:.1f} ms)"


class BareLoRA(nn.Module):
    """The same arithmetic written by hand on a GPT-2 Conv1D: x W + b + s (x A^T) B^T (or one addmm when fused)."""

    def __init__(self, conv1d: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float, fused: bool):
        super().__init__()
        self.weight, self.bias, self.A, self.B = conv1d.weight, conv1d.bias, A, B
        self.scaling, self.fused = scaling, fused

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        y = torch.addmm(self.bias, flat, self.weight)
        if self.fused:
            y.addmm_(flat @ self.A.T, self.B.T, alpha=self.scaling)
        else:
            y = y + (flat @ self.A.T) @ self.B.T * self.scaling
        return y.view(*x.shape[:-1], -1)


def bare_model(base: nn.Module, values: dict, r: int, fused: bool) -> nn.Module:
    model = copy.deepcopy(base)
    for name, module in list(model.named_modules()):
        key = f"{PREFIX}{name}.lora_A.weight"
        if key in values:
            A, B = values[key], values[key.replace("lora_A", "lora_B")]
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, BareLoRA(module, A.to(module.weight), B.to(module.weight),
                                                                 16 / r, fused))
    return model


def lora_flop_ratio(base: nn.Module, r: int, tokens: int, seq: int) -> float:
    """Forward FLOPs with LoRA over without: 2 r (in + out) per token per adapted layer, against the base's
    matmuls (2 * params * tokens), its attention (4 * seq * d per token per layer) and the LM head."""
    config = base.config
    d, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
    block = 2 * tokens * (d * 3 * d + d * d + 2 * d * 4 * d) + 4 * tokens * seq * d
    head = 2 * tokens * d * vocab
    lora = 2 * tokens * r * ((d + 3 * d) + (d + d) + (4 * d + d))  # c_attn, attn.c_proj, mlp.c_proj
    return 1 + layers * lora / (layers * block + head)


def forward_section(device: str, dtype, reps: int, smoke: bool = False) -> None:
    base = gpt2(device=device, dtype=dtype, smoke=smoke)
    for r in (8, 64):
        config = {"r": r, "lora_alpha": 16, "target_modules": TARGETS}
        wrapped = {}
        for name, lib in (("peft", peft), ("reference", ref)):
            torch.manual_seed(1)
            wrapped[name] = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**config)).eval()
        values = harness.adapter_values(peft.get_peft_model_state_dict(wrapped["peft"]), seed=3)
        for name, lib in (("peft", peft), ("reference", ref)):
            lib.set_peft_model_state_dict(wrapped[name], {k: v.to(device) for k, v in values.items()})
        merged = copy.deepcopy(wrapped["reference"])
        merged.merge_adapter()
        variants = {"peft unmerged": wrapped["peft"], "reference unmerged": wrapped["reference"],
                    "reference merged": merged,
                    "bare math (unfused)": bare_model(base, {k: v.to(device) for k, v in values.items()}, r, False),
                    "bare math (addmm)": bare_model(base, {k: v.to(device) for k, v in values.items()}, r, True)}
        for batch in (1, 4):
            ids = torch.randint(0, base.config.vocab_size, (batch, 128),
                                generator=torch.Generator().manual_seed(0)).to(device)

            def run(model):
                return lambda: model(input_ids=ids)
            section = f"forward {device} {str(dtype).removeprefix('torch.')}, r={r}, batch {batch}x128"
            print(section)
            with torch.inference_mode():
                for _ in range(2):
                    for model in (base, *variants.values()):
                        model(input_ids=ids)  # warm-up
                for name, model in variants.items():
                    report(section, f"{name} / base", ratio_text(adjacent(run(base), run(model), reps)))
                report(section, "reference unmerged / peft unmerged",
                       ratio_text(adjacent(run(wrapped["peft"]), run(wrapped["reference"]), reps)))
            report(section, "FLOP count with LoRA / base (analytic)",
                   f"{lora_flop_ratio(base, r, batch * 128, 128):.3f}x")


def median_time(fn, reps: int, setup=None) -> float:
    times = []
    for _ in range(reps):
        state = setup() if setup else None
        times.append(timed(lambda: fn(state)))
    return statistics.median(times)


def lifecycle_section(reps: int) -> None:
    """Injection, merge_and_unload, unload, save, load: reference vs peft, and the floor where there is one."""
    section = "lifecycle, full GPT-2 small, CPU fp32, r=8 on c_attn+c_proj"
    print(section)
    base = gpt2()
    times = {}
    for name, lib in (("peft", peft), ("reference", ref)):
        config = lib.LoraConfig(r=8, target_modules=TARGETS)
        fresh = lambda: copy.deepcopy(base)  # noqa: E731
        wrapped = lambda: lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=8, target_modules=TARGETS))  # noqa
        directory = tempfile.mkdtemp()
        wrapped().save_pretrained(directory)
        times[name] = {
            "inject (get_peft_model)": median_time(lambda m: lib.get_peft_model(m, config), reps, fresh),
            "merge_and_unload": median_time(lambda m: m.merge_and_unload(), reps, wrapped),
            "unload": median_time(lambda m: m.unload(), reps, wrapped),
            "save_pretrained": median_time(lambda m: m.save_pretrained(tempfile.mkdtemp()), reps, wrapped),
            "from_pretrained": median_time(lambda m: lib.PeftModel.from_pretrained(m, directory), reps, fresh),
        }
        times[name]["adapter_model.safetensors bytes"] = os.path.getsize(Path(directory) /
                                                                         "adapter_model.safetensors")
    for what, mine in times["reference"].items():
        theirs = times["peft"][what]
        if what.endswith("bytes"):
            report(section, what, f"reference {mine:,}  peft {theirs:,}")
        else:
            report(section, what, f"reference {mine * 1e3:.1f} ms  peft {theirs * 1e3:.1f} ms  "
                                  f"ratio {mine / theirs:.2f}")
    wrapped = lambda: ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(r=8, target_modules=TARGETS))  # noqa
    with _without_addmm():
        unfused = median_time(lambda m: m.merge_and_unload(), reps, wrapped)
    report(section, "merge_and_unload, reference without its addmm_ path (merging.add_delta)",
           f"{unfused * 1e3:.1f} ms  {unfused / times['reference']['merge_and_unload']:.1f}x the time with it")
    floors = _floors(base, reps)
    for what, seconds in floors.items():
        report(section, f"floor: {what}", f"{seconds * 1e3:.1f} ms")


@contextlib.contextmanager
def _without_addmm():
    """reference_impl merging as if no layer offered addmm_ operands: delta_weight, then an add."""
    from unittest import mock

    from reference_impl import layers

    with mock.patch.object(layers.Linear, "fold_operands", lambda self, A, B: None), \
            mock.patch.object(layers.Embedding, "fold_operands", lambda self, A, B: None):
        yield


def _floors(base: nn.Module, reps: int) -> dict:
    names = [n for n, _ in base.named_modules() if n.endswith((".c_attn", ".c_proj"))]
    weights = [base.get_submodule(n).weight for n in names]
    low_rank = [(torch.randn(w.shape[0], 8), torch.randn(8, w.shape[1])) for w in weights]
    directory = tempfile.mkdtemp()
    wrapped = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(r=8, target_modules=TARGETS))
    wrapped.save_pretrained(directory)
    from safetensors.torch import load_file

    def swap(model):
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.Sequential(model.get_submodule(name)))

    def fold(_):
        with torch.no_grad():
            for w, (left, right) in zip(weights, low_rank):
                w.addmm_(left, right, alpha=1e-12)

    return {"plain module swap of the same layers": median_time(swap, reps, lambda: copy.deepcopy(base)),
            "W.addmm_ over the same layers": median_time(fold, reps),
            "reading the adapter file": median_time(lambda _: load_file(Path(directory) /
                                                                         "adapter_model.safetensors"), reps)}


def memory_section() -> None:
    """Injection must not copy base weights: the only new parameter bytes are the adapter's."""
    section = "memory of injection, full GPT-2 small, r=8 on c_attn+c_proj"
    print(section)
    for name, lib in (("reference", ref), ("peft", peft)):
        base = gpt2()
        before = {p.data_ptr() for p in base.parameters()}
        model = lib.get_peft_model(base, lib.LoraConfig(r=8, target_modules=TARGETS))
        new_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.data_ptr() not in before)
        adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        report(section, f"{name}: new parameter bytes / adapter bytes", f"{new_bytes:,} / {adapter:,}")


def import_section() -> None:
    section = "import time on top of an imported torch (fresh interpreter, median of 3)"
    print(section)
    for module in ("reference_impl", "peft"):
        seconds = statistics.median(
            float(subprocess.run([sys.executable, "-c", f"import time, torch; t=time.perf_counter(); import {module}; "
                                  "print(time.perf_counter()-t)"], capture_output=True, text=True).stdout.split()[-1])
            for _ in range(3))
        report(section, f"import {module}", f"{seconds * 1e3:.0f} ms")


def suite_section(with_ci_run: bool) -> None:
    section = "suite throughput (equivalence examples: wrap both, load values, forward, compare)"
    print(section)
    mine, theirs = ReferenceDriver(), PeftDriver()
    setups = {"tiny GPT-2 (gpt2-tiny)": "gpt2-tiny", "one-layer full-width GPT-2": "gpt2-one-layer"}
    with _zoo_model("gpt2-one-layer", lambda: GPT2LMHeadModel(GPT2Config(n_layer=1))):
        _time_suite_examples(section, mine, theirs, setups)
    if with_ci_run:
        _time_ci_run(section)


@contextlib.contextmanager
def _zoo_model(name: str, make):
    """A zoo model that exists for the duration of the block (the tiny GPT-2's inputs and targets)."""
    tiny = models.ZOO["gpt2-tiny"]
    models.ZOO[name] = models.ZooModel(name, make, tiny.make_inputs, tiny.targets)
    try:
        yield
    finally:
        del models.ZOO[name]


def _time_suite_examples(section: str, mine, theirs, setups: dict) -> None:
    for label, zoo_name in setups.items():
        models.build(zoo_name)  # built once, copied per example, as the suite does
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 10:
            case = Case(zoo_name, SUITE_CONFIG, values_seed=count)
            a, b = harness.pair(mine, theirs, case, "cpu")
            torch.testing.assert_close(a.output(), b.output())
            count += 1
        report(section, label, f"{count / (time.perf_counter() - start):.1f} examples/s")
        _example_parts(section, label, zoo_name, mine, theirs)


def _time_ci_run(section: str) -> None:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "conformance.suite", "--peft-impl=reference",
                    "--peft-profile=ci", "-q", "-p", "no:cacheprovider"], capture_output=True)
    report(section, "wall time of the suite, profile ci, reference vs peft", f"{time.perf_counter() - start:.0f} s")


def _example_parts(section: str, label: str, zoo_name: str, mine, theirs) -> None:
    """Where one example's time goes: the ceiling that peft's own share puts on examples per second."""
    case = Case(zoo_name, SUITE_CONFIG, values_seed=0)
    base = lambda: models.build(zoo_name)  # noqa: E731
    parts = {"copy of the base": median_time(lambda _: models.build(zoo_name), 20)}
    for name, lib in (("peft", peft), ("reference", ref)):
        parts[f"{name} get_peft_model"] = median_time(
            lambda m: lib.get_peft_model(m, lib.LoraConfig(**SUITE_CONFIG)), 20, base)
    parts["both wrapped and loaded"] = median_time(lambda _: harness.pair(mine, theirs, case, "cpu"), 20)
    report(section, f"{label}: per example", "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in parts.items()))


def markdown(command: str) -> str:
    lines = ["# Benchmarks", "", f"Command: `{command}`  ", f"Date: {datetime.date.today()}  ",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__} ({torch.get_num_threads()} threads), peft {peft.__version__}, "
             f"python {platform.python_version()}", "",
             "Ratios are medians over adjacent pairs (variant right after the base, or after peft), with the 25-75 % "
             "spread in brackets and the variant's median time in parentheses.", ""]
    section = None
    for name, what, value in ROWS:
        if name != section:
            lines += ["", f"## {name}", "", "| measurement | value |", "|---|---|"]
            section = name
        lines.append(f"| {what} | {value} |")
    return "\n".join(lines) + "\n"


def forward_sections(reps: int, smoke: bool = False, cpu: bool = True) -> None:
    """The forward pass on the CPU (float32), then on CUDA (float32 with TF32 off, bfloat16) when there is one."""
    if cpu:
        forward_section("cpu", torch.float32, reps, smoke)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        forward_section("cuda", torch.float32, reps * 2, smoke)
        forward_section("cuda", torch.bfloat16, reps * 2, smoke)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--suite", action="store_true", help="also time a whole ci-profile run of the suite")
    parser.add_argument("--markdown", help="write the results to this Markdown file")
    parser.add_argument("--forward-only", action="store_true",
                        help="only the forward sections: on CUDA (float32, bfloat16) when torch sees a GPU, else CPU")
    parser.add_argument("--smoke", action="store_true",
                        help="forward sections on a one-block, 64-wide GPT-2: "
                             "checks that they run (its figures mean nothing)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the libraries' deprecation chatter would bury the figures
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    reps = 5 if args.quick else 15
    if args.forward_only:
        forward_sections(reps, args.smoke, cpu=not torch.cuda.is_available())
        return
    import_section()
    memory_section()
    lifecycle_section(reps)
    forward_sections(reps, args.smoke)
    suite_section(args.suite)
    if args.markdown:
        Path(args.markdown).write_text(markdown("python -m bench.run " + " ".join(sys.argv[1:])))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
