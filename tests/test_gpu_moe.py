"""gpu_moe: the GPU half's id remap, weight packing, grouped GEMM, rooflines and ceilings, checked
for real on the CPU. SGLang's fused kernel needs a CUDA GPU: nothing here stands in for it; the
records of a run say which kernel ran (tests/test_kernel_bench.py checks that they say so)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ktutorial import gpu_moe as gm
from ktutorial import kernel_bench as kb
from ktutorial.errors import UserError
from ktutorial.fp8 import reference_moe, rel_err

SH = kb.layer_shape("tiny")  # 16 experts, 256 x 128, top 2


@pytest.fixture(scope="module")
def src():
    return kb.Fp8Experts.random(SH, seed=3)


def _mask(experts: int, on_gpu) -> torch.Tensor:
    m = torch.zeros(experts, dtype=torch.bool)
    m[list(on_gpu)] = True
    return m


# ---------------------------------------------------------------------------------------------
# ids: CPU experts -1 on the GPU side, GPU experts -1 on the CPU side


@pytest.mark.parametrize("seed", range(6))
def test_remap_sends_cpu_experts_to_minus_one_and_gpu_experts_to_their_slot(seed):
    g = torch.Generator().manual_seed(seed)
    e = 64
    n = [0, 1, 7, 32, 63, 64][seed]
    mask = _mask(e, torch.randperm(e, generator=g)[:n].tolist())
    ids, _ = kb.random_routing(50, e, 8, g)
    l2s, s2l = gm.gpu_slots(mask)
    assert s2l.tolist() == sorted(torch.nonzero(mask).flatten().tolist())  # slots in expert order
    assert l2s.dtype == torch.int32 and (l2s[~mask] == -1).all()
    slots = gm.remap_expert_ids(ids, mask, l2s)
    assert slots.dtype == torch.int32 and slots.shape == ids.shape
    on_gpu = mask[ids]
    assert ((slots == -1) == ~on_gpu).all()
    assert (s2l[slots[on_gpu].long()] == ids[on_gpu]).all()  # each slot names its expert
    assert slots.max().item() < max(n, 1)
    cpu_ids = gm.split_for_cpu(ids, mask)
    assert ((cpu_ids == -1) == on_gpu).all() and (cpu_ids[~on_gpu] == ids[~on_gpu]).all()
    out = torch.empty_like(ids)  # the pinned-buffer form the layer step uses
    gm.split_for_cpu(ids, mask, out=out)
    assert torch.equal(out, cpu_ids)


# ---------------------------------------------------------------------------------------------
# weights as SGLang holds them


def test_packed_layer_is_the_checkpoint_experts_in_sglang_layout(src):
    full = gm.Fp8Layer.from_experts(src)
    i, h = SH.intermediate, SH.hidden
    assert full.w13.dtype == torch.float8_e4m3fn and tuple(full.w13.shape) == (SH.experts, 2 * i, h)
    assert tuple(full.w13_scale.shape) == (SH.experts, 2 * i // 128, h // 128) and full.w13_scale.dtype == torch.float32
    assert tuple(full.w2.shape) == (SH.experts, h, i) and tuple(full.w2_scale.shape) == (SH.experts, h // 128, i // 128)
    mask = _mask(SH.experts, [2, 5, 11])
    _, s2l = gm.gpu_slots(mask)
    packed = full.select(s2l)
    assert packed.experts == 3
    for slot, logical in enumerate(s2l.tolist()):
        got, want = packed.dequantized(slot), src.dequantized(logical)
        for a, b, name in zip(got, want, ("w1 (gate rows first)", "w3 (up rows second)", "w2")):
            assert torch.equal(a, b), (slot, name)
    # select copies: changing the full layer does not reach the packed one
    full.w13_scale.mul_(2)
    assert torch.equal(packed.dequantized(0)[0], src.dequantized(2)[0])
    w13, w2 = packed.bf16()
    assert w13.dtype == torch.bfloat16 and torch.allclose(w13[1].float(), torch.cat(src.dequantized(5)[:2]), rtol=1e-2, atol=1e-3)
    assert torch.allclose(w2[2].float(), src.dequantized(11)[2], rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# torch's grouped GEMM half, on the CPU here


@pytest.mark.parametrize("on_gpu,tokens", [([4], 1), ([0, 3, 9, 15], 7), (list(range(16)), 40), ([1, 2, 3, 5, 8, 13], 33)])
def test_grouped_half_computes_the_gpu_experts_share(src, on_gpu, tokens):
    kernel = gm.choose_kernel("cpu", "grouped")
    assert kernel.name == gm.KERNEL_GROUPED
    mask = _mask(SH.experts, on_gpu)
    _, s2l = gm.gpu_slots(mask)
    half = gm.GpuHalf(kernel, gm.Fp8Layer.from_experts(src).select(s2l), mask, "cpu")
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, SH.hidden, generator=g).to(torch.bfloat16)
    ids, w = kb._gpu_route(tokens, SH, mask, g)
    out = half(x, ids, w)
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, SH.hidden)
    ref = reference_moe(src, x, ids, w, skip=~mask)
    assert ref.norm() > 0
    assert rel_err(out, ref) < gm.REL_ERR_LIMIT[gm.KERNEL_GROUPED]
    none_on_gpu = ~mask[ids].any(dim=1)
    assert (out[none_on_gpu] == 0).all()  # the CPU side owns those rows whole
    # GPU share + CPU share = the layer
    assert rel_err(out.float() + reference_moe(src, x, ids, w, skip=mask), reference_moe(src, x, ids, w)) < gm.REL_ERR_LIMIT[gm.KERNEL_GROUPED]


def test_grouped_half_fails_the_check_when_the_remap_is_wrong(src):
    """The check above can fail: slots pointing at the wrong experts are far off."""
    mask = _mask(SH.experts, [0, 3, 9, 15])
    _, s2l = gm.gpu_slots(mask)
    wrong = gm.Fp8Layer.from_experts(src).select(s2l.flip(0))  # slots hold the experts in reverse
    half = gm.GpuHalf(gm.choose_kernel("cpu", "grouped"), wrong, mask, "cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, SH.hidden, generator=g).to(torch.bfloat16)
    ids, w = kb._gpu_route(24, SH, mask, g)
    assert rel_err(half(x, ids, w), reference_moe(src, x, ids, w, skip=~mask)) > 0.3


def test_gpu_half_refuses_a_layer_that_does_not_match_its_mask(src):
    full = gm.Fp8Layer.from_experts(src)
    with pytest.raises(ValueError, match="mask holds 2"):
        gm.GpuHalf(gm.choose_kernel("cpu", "grouped"), full.select(torch.tensor([1, 2, 3])), _mask(SH.experts, [1, 2]), "cpu")


# ---------------------------------------------------------------------------------------------
# which kernel, and why


def test_kernel_choice_without_a_gpu_names_the_stand_in_and_refuses_fused():
    k = gm.choose_kernel("cpu")
    assert k.name == gm.KERNEL_GROUPED and "no CUDA device" in k.reason and k.fused_fn is None
    with pytest.raises(UserError, match="env.sh"):
        gm.choose_kernel("cpu", "fused")
    with pytest.raises(UserError, match="auto, fused, grouped"):
        gm.choose_kernel("cpu", "triton")


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")
def test_fused_kernel_unavailable_names_the_import_failure():
    with pytest.raises(gm.GpuKernelUnavailable, match="does not import"):
        gm.load_fused_moe()


def test_bytes_per_expert_in_each_format():
    fused = gm.GpuKernel(gm.KERNEL_FUSED, "test")
    grouped = gm.GpuKernel(gm.KERNEL_GROUPED, "test")
    # M2.1: 3 x 3072 x 1536 FP8 bytes plus 3 x 24 x 12 float32 block scales (FACTS: 14.16 MB)
    assert fused.bytes_per_expert(3072, 1536) == 3 * 3072 * 1536 + 3 * 24 * 12 * 4 == kb.layer_shape("m2.1").expert_weight_bytes
    assert grouped.bytes_per_expert(3072, 1536) == 2 * 3 * 3072 * 1536


# ---------------------------------------------------------------------------------------------
# rooflines and ceilings


def test_roofline_is_the_larger_of_bytes_and_flops_time():
    # one M2.1 expert at 4.3 TB/s: 14.16 MB / 4300 GB/s = 3.293 us
    assert gm.roofline_ms(14_159_232, 0, 4300, 800) == pytest.approx(14_159_232 / 4.3e12 * 1e3)
    assert gm.roofline_ms(1e6, 2e12, 1000, 1000) == pytest.approx(2.0)  # 2 TFLOP at 1000 TFLOP/s: compute-bound
    assert gm.roofline_ms(4e9, 2e9, 1000, 1000) == pytest.approx(4.0)  # 4 GB at 1000 GB/s: memory-bound
    assert gm.roofline_ms(0, 0, 1, 1) == 0.0
    with pytest.raises(ValueError):
        gm.roofline_ms(1, 1, 0, 1)


def test_gpu_work_counts_distinct_experts_rows_and_flops():
    ids = torch.tensor([[0, 1], [1, 2], [3, 1]])
    mask = _mask(4, [1, 2])
    wk = gm.gpu_work(ids, mask, hidden=256, intermediate=128, bytes_per_expert=1000)
    assert wk["unique_experts"] == 2 and wk["routed_rows"] == 4
    assert wk["weight_bytes"] == 2000
    assert wk["activation_bytes"] == 2 * 3 * 256 * 2  # x read, output written, bf16
    assert wk["flops"] == 2.0 * 3 * 256 * 128 * 4
    none = gm.gpu_work(ids, _mask(4, []), 256, 128, 1000)
    assert none == {"unique_experts": 0, "routed_rows": 0, "weight_bytes": 0, "activation_bytes": 0, "flops": 0.0}


def test_ceilings_measure_here_with_the_host_clock():
    c = gm.measure_ceilings("cpu", copy_bytes=8 * 1024**2, matmul_n=64, fp8=False, repeats=3)
    assert c.timer == "host clock" and c.device == "cpu" and c.fp8_tflop_s is None
    assert c.copy_bytes == 8 * 1024**2 and c.copy_gb_s > 0 and c.bf16_tflop_s > 0
    assert len(c.samples["copy_s"]) == 3 and len(c.samples["bf16_matmul_s"]) == 3
    assert c.rate_for(gm.GpuKernel(gm.KERNEL_FUSED, "t")) == (c.bf16_tflop_s, "bf16")  # no FP8 rate measured
    c.fp8_tflop_s = 2 * c.bf16_tflop_s
    assert c.rate_for(gm.GpuKernel(gm.KERNEL_FUSED, "t")) == (c.fp8_tflop_s, "fp8")
    assert c.rate_for(gm.GpuKernel(gm.KERNEL_GROUPED, "t")) == (c.bf16_tflop_s, "bf16")


# ---------------------------------------------------------------------------------------------
# against sglang-kt 0.7.2's own source (the parser venv holds the package; nothing is imported
# from it: its GPU modules need CUDA)


def _sglang_source(rel: str) -> str:
    import glob
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    found = glob.glob(str(root / ".venv-sglang" / "lib" / "python*" / "site-packages" / "sglang" / rel))
    if not found:
        pytest.skip("sglang-kt's parser venv (.venv-sglang) is missing: run `make sglang-parser-env`")
    return Path(found[0]).read_text()


def _function(source: str, name: str):
    import ast

    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []  # its torch.compile: the arithmetic is what is compared
    return node


def test_remap_equals_sglang_kts_mask_and_remap_expert_ids():
    import ast

    node = _function(_sglang_source("srt/layers/moe/kt_ep_wrapper.py"), "mask_and_remap_expert_ids")
    scope: dict = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "kt_ep_wrapper.py", "exec"), scope)  # noqa: S102
    theirs = scope["mask_and_remap_expert_ids"]
    for seed, n in enumerate((0, 3, 40, 128, 256)):
        g = torch.Generator().manual_seed(seed)
        mask = _mask(256, torch.randperm(256, generator=g)[:n].tolist())
        ids, _ = kb.random_routing(33, 256, 8, g)
        l2s, _ = gm.gpu_slots(mask)
        assert torch.equal(gm.remap_expert_ids(ids, mask, l2s), theirs(ids, mask, l2s)), n


def test_gpu_half_calls_fused_experts_impl_as_its_signature_and_sglang_kt_expect(src):
    """The call contract only (no numbers: the kernel runs on a GPU): GpuHalf's call binds to the
    real parameter list of sglang-kt 0.7.2's fused_experts_impl, with SGLang's weight layout and ids."""
    import inspect

    node = _function(_sglang_source("srt/layers/moe/fused_moe_triton/fused_moe.py"), "fused_experts_impl")
    P = inspect.Parameter
    pos, n_defaults = node.args.args, len(node.args.defaults)
    params = [P(a.arg, P.POSITIONAL_OR_KEYWORD, default=None if i >= len(pos) - n_defaults else P.empty) for i, a in enumerate(pos)]
    params += [P(a.arg, P.KEYWORD_ONLY, default=None) for a in node.args.kwonlyargs]
    sig = inspect.Signature(params)
    calls = []

    def fused_experts_impl(*args, **kwargs):
        calls.append(sig.bind(*args, **kwargs).arguments)  # TypeError on a name it does not take
        return torch.zeros_like(args[0])

    mask = _mask(SH.experts, [2, 7, 11])
    _, s2l = gm.gpu_slots(mask)
    half = gm.GpuHalf(gm.GpuKernel(gm.KERNEL_FUSED, "call contract", fused_experts_impl), gm.Fp8Layer.from_experts(src).select(s2l), mask, "cpu")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, SH.hidden, generator=g).to(torch.bfloat16)
    ids, w = kb.random_routing(5, SH.experts, SH.top_k, g)
    half(x, ids, w)
    (a,) = calls
    assert a["hidden_states"] is x and a["topk_weights"] is w
    assert a["w1"].dtype == torch.float8_e4m3fn and tuple(a["w1"].shape) == (3, 2 * SH.intermediate, SH.hidden)
    assert tuple(a["w2"].shape) == (3, SH.hidden, SH.intermediate)
    assert tuple(a["w1_scale"].shape) == (3, 2 * SH.intermediate // 128, SH.hidden // 128)
    assert tuple(a["w2_scale"].shape) == (3, SH.hidden // 128, SH.intermediate // 128)
    assert a["use_fp8_w8a8"] is True and a["block_shape"] == [128, 128] and a["filter_expert"] is True
    assert a["topk_ids"].dtype == torch.int32 and ((a["topk_ids"] == -1) == ~mask[ids]).all()
    full = gm.GpuHalf(gm.GpuKernel(gm.KERNEL_FUSED, "call contract", fused_experts_impl), gm.Fp8Layer.from_experts(src),
                      _mask(SH.experts, range(SH.experts)), "cpu")
    full(x, ids, w)
    assert calls[-1]["filter_expert"] is False  # every expert local: as SGLang's fused_experts sets it
