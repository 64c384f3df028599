"""kt-kernel's FP8 experts on the CPU against a float32 reference from the same checkpoint."""

from __future__ import annotations

import builtins

import pytest

torch = pytest.importorskip("torch")

from ktutorial import ktkernel  # noqa: E402
from ktutorial.errors import MissingDependency, UserError  # noqa: E402
from ktutorial.fp8 import rel_err  # noqa: E402

LAYER = 1
TOKENS = 40  # more than CHUNK: the forward must slice into chunks
CHUNK = 16


@pytest.fixture(scope="module")
def experts(tiny_model):
    return ktkernel.CPUExperts(tiny_model.hf_dir, LAYER, tiny_model.spec, threads=2, chunk=CHUNK)


@pytest.fixture(scope="module")
def routed(tiny_model):
    spec = tiny_model.spec
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, spec.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[: spec.experts_per_token] for _ in range(TOKENS)])
    w = torch.rand(TOKENS, spec.experts_per_token, generator=g)
    return x, ids, w / w.sum(1, keepdim=True)


def test_fp8_experts_match_float32_reference(tiny_model, experts, routed):
    x, ids, w = routed
    experts.set_gpu_mask(torch.zeros(tiny_model.spec.num_experts, dtype=torch.bool))
    out = experts.forward(x, ids, w)
    ref = ktkernel.reference_experts(tiny_model.hf_dir, LAYER, x, ids, w)
    assert out.shape == ref.shape == x.shape
    assert float(ref.norm()) > 1.0  # the reference itself is not trivially small
    assert float(out.norm()) > 0.5 * float(ref.norm()), "kt-kernel returned (near) zeros"
    # kt-kernel casts activations to bf16: ~5e-3 is that rounding, not a kernel error.
    assert rel_err(out, ref) < 1e-2


def test_output_is_not_a_reused_buffer(experts, routed):
    x, ids, w = routed
    first = experts.forward(x[:4], ids[:4], w[:4])
    kept = first.clone()
    experts.forward(x[4:8], ids[4:8], w[4:8])
    assert torch.equal(first, kept)


def test_gpu_masked_experts_are_skipped(tiny_model, experts, routed):
    x, ids, w = routed
    e = tiny_model.spec.num_experts
    mask = torch.zeros(e, dtype=torch.bool)
    mask[: e // 2] = True
    experts.set_gpu_mask(mask)
    try:
        out = experts.forward(x, ids, w)
        masked_ref = ktkernel.reference_experts(tiny_model.hf_dir, LAYER, x, ids, w, gpu_mask=mask)
        full_ref = ktkernel.reference_experts(tiny_model.hf_dir, LAYER, x, ids, w)
        assert rel_err(out, masked_ref) < 1e-2
        # The GPU experts' share is really absent, not just slightly off.
        assert rel_err(out, full_ref) > 0.1
        # A token routed only to GPU experts gets exactly nothing from the CPU.
        only_gpu = mask[ids].all(dim=1)
        if only_gpu.any():
            assert float(out[only_gpu].abs().max()) == 0.0
        experts.set_gpu_mask(torch.ones(e, dtype=torch.bool))
        assert float(experts.forward(x, ids, w).abs().max()) == 0.0
    finally:
        experts.set_gpu_mask(torch.zeros(e, dtype=torch.bool))


def test_bad_shapes_are_refused(experts, routed):
    x, ids, w = routed
    with pytest.raises(UserError):
        experts.forward(x[:, :10], ids, w)
    with pytest.raises(UserError):
        experts.forward(x, ids[:, :1], w[:, :1])


def test_cpu_variant_and_warning():
    variant = ktkernel.cpu_variant()
    assert variant in {"amx", "avx512_bf16", "avx512_vbmi", "avx512_vnni", "avx512_base", "avx512", "avx2"}
    assert ktkernel.variant_warning("avx2") and "AVX512" in ktkernel.variant_warning("avx2")
    assert ktkernel.variant_warning("amx") is None


def test_missing_kt_kernel_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_kt(name, *args, **kwargs):
        if name == "kt_kernel" or name.startswith("kt_kernel."):
            raise ImportError("No module named 'kt_kernel'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(ktkernel, "_kt", None)
    monkeypatch.setattr(builtins, "__import__", no_kt)
    with pytest.raises(MissingDependency) as info:
        ktkernel.import_kt_kernel()
    assert "pip install" in str(info.value) and "kt-kernel" in str(info.value)
