"""The training step as the trainer runs it: the precision `auto` chooses, and the compiled step.

On CUDA `agecl-train` compiles the model and the loss (`agecl.train.compile_step`) by default, yet
no CPU test ran that path before. Here the very same function compiles on the CPU with the cheap
`aot_eager` backend (dynamo's graph capture and AOTAutograd's joint forward/backward graph, the
part that breaks when a model or loss has a graph break or a data-dependent branch; only the
kernel generation of inductor is left out), `fullgraph=True` as in the trainer: its loss and
gradients must equal the eager step's, and a second step must not recompile.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from agecl.config import LossConfig
from agecl.losses import PRESETS, age_loss
from agecl.model import AgeModel
from agecl.train import (
    TrainError, choose_precision, compile_step, cpu_name, machine_facts, make_optimizer, native_bf16_feature, train_step,
)

INTEL_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
INTEL_AVX512_BF16 = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"
AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert native_bf16_feature(INTEL_AMX) == "amx_bf16"
    assert native_bf16_feature(INTEL_AVX512_BF16) == "avx512_bf16"
    assert native_bf16_feature(AVX2_ONLY) is None
    assert native_bf16_feature("") is None


ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\n"
ZEN5 = ZEN4.replace("25", "26").replace("17", "2") + "processor\t: 1\nmodel name\t: another\n"


def test_the_machine_is_named_by_its_kind():
    # Both kinds call themselves "AMD EPYC"; their family and model numbers tell them apart. The
    # first processor's block is read, not a later one's.
    assert cpu_name(ZEN4) == "AMD EPYC (family 25, model 17)"
    assert cpu_name(ZEN5) == "AMD EPYC (family 26, model 2)"
    assert cpu_name(INTEL_AVX512_BF16)  # no name in /proc/cpuinfo: the platform's word, never empty
    facts = machine_facts(torch.device("cpu"), "bf16", ZEN5)
    assert facts == {"device": "cpu", "processor": "AMD EPYC (family 26, model 2)", "threads": torch.get_num_threads(),
                     "precision": "bf16", "torch": str(torch.__version__)}


@pytest.mark.parametrize(
    "requested, device, cpuinfo, expected",
    [
        ("auto", "cpu", INTEL_AMX, "bf16"),
        ("auto", "cpu", INTEL_AVX512_BF16, "bf16"),
        ("auto", "cpu", AVX2_ONLY, "fp32"),
        ("auto", "cuda", AVX2_ONLY, "bf16"),
        ("fp32", "cpu", INTEL_AMX, "fp32"),
        ("bf16", "cpu", AVX2_ONLY, "bf16"),
    ],
)
def test_precision_auto_follows_the_hardware(requested, device, cpuinfo, expected):
    precision, why = choose_precision(requested, torch.device(device), cpuinfo)
    assert precision == expected
    assert why  # the run prints why: the feature found, or its absence
    if requested == "auto" and device == "cpu":
        assert ("natively" in why) == (expected == "bf16")


def test_precision_unknown_is_an_error():
    with pytest.raises(TrainError, match="precision 'fp16'"):
        choose_precision("fp16", torch.device("cpu"))


def _step_inputs(batch=2, side=32, min_age=10, max_age=30):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3 * batch, 3, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, max_age - min_age + 1, (3 * batch,), generator=g)
    return images, targets


@pytest.mark.parametrize("supervise,balanced", [("anchor", False), ("triplet", False), ("triplet", True)])
def test_compiled_step_equals_eager_and_does_not_recompile(supervise, balanced):
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = AgeModel(10, 30, input_size=24).to(memory_format=torch.channels_last)  # resizes 32 -> 24 inside
    compiled_raw = copy.deepcopy(eager_model)
    model, loss_fn = compile_step(compiled_raw, backend="aot_eager")
    eager_loss = age_loss
    if balanced:  # as agecl.train passes loss.balance's class weights
        cw = torch.linspace(0.5, 2.0, 21)  # (A,) for ages 10..30
        loss_fn, eager_loss = functools.partial(loss_fn, class_weights=cw), functools.partial(age_loss, class_weights=cw)
    weights = LossConfig(**{**PRESETS["paper-fgnet-ternary"], "supervise": supervise})
    opt_e = torch.optim.Adam(eager_model.parameters(), lr=1e-3)
    opt_c = torch.optim.Adam(compiled_raw.parameters(), lr=1e-3)
    ctx = torch.autocast("cpu", enabled=False)
    b = 2
    for step in range(2):
        images, targets = _step_inputs(b)
        images = images + step  # another batch, the same shapes
        with torch._dynamo.config.patch(error_on_recompile=step > 0):  # a second step reuses the graphs
            terms_c = train_step(model, loss_fn, opt_c, ctx, images, targets, weights, b)
        terms_e = train_step(eager_model, eager_loss, opt_e, ctx, images, targets, weights, b)
        for name in terms_e:
            torch.testing.assert_close(terms_c[name], terms_e[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        for (name, p_e), p_c in zip(eager_model.named_parameters(), compiled_raw.parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
            torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_the_cpu_optimizer_is_fused_and_steps_like_the_foreach_adam():
    """make_optimizer fuses Adam on the CPU too (a third of the for-each update's time on 2 cores):
    the same update as torch's for-each Adam, to float rounding."""
    torch.manual_seed(0)
    a = torch.nn.Linear(16, 8)
    b = copy.deepcopy(a)
    fused = make_optimizer(a.parameters(), 1e-2, 1e-4, torch.device("cpu"))
    assert fused.defaults["fused"] is True
    plain = torch.optim.Adam(b.parameters(), lr=1e-2, weight_decay=1e-4, foreach=True)
    for _ in range(3):
        x = torch.randn(4, 16)
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
