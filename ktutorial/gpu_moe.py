"""The GPU half of a hybrid MoE layer, run the way SGLang-KT runs it, and the GPU's measured ceilings.

SGLang-KT keeps N experts of a layer on the GPU. For each batch it remaps the router's expert ids
(`mask_and_remap_expert_ids` in sglang's kt_ep_wrapper.py): ids of CPU experts become -1, ids of
GPU experts become the expert's slot among the N it holds, in increasing expert order. Its fused
MoE kernel (`fused_experts_impl(..., filter_expert=True)`) then skips the -1 ids and computes the
rest from FP8 weights with 128 x 128 block scales. kt-kernel gets the complementary ids: GPU
experts as -1 (`split_for_cpu`).

Two kernels for that half, and the record says which ran (`KERNEL_FUSED`, `KERNEL_GROUPED`):

- SGLang's fused FP8 MoE (Triton), where sglang imports on a CUDA machine: the kernel the engine
  itself runs. Weights as SGLang holds them: w13 [N, 2I, H] FP8 (gate rows, then up rows), w2
  [N, H, I], scales [N, rows/128, cols/128] float32.
- torch's grouped GEMM (`torch._grouped_mm`, bf16), elsewhere: the same remap, the weights
  dequantized to bf16, two grouped GEMMs over the tokens sorted by slot. On a machine without a
  GPU it runs on the CPU (a stand-in the record names as such).

`measure_ceilings` measures what a roofline needs on the device itself: device-to-device copy
bandwidth (bytes read plus written) and large matrix products' rates (bf16, and FP8 for the fused
kernel). `roofline_ms` turns bytes and FLOPs into the floor a kernel cannot beat.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ktutorial.errors import UserError
from ktutorial.fp8 import dequantize_block

KERNEL_FUSED = "sglang_fused_moe_fp8"
KERNEL_GROUPED = "torch_grouped_mm_bf16"
KERNEL_CHOICES = ("auto", "fused", "grouped")
FP8_BLOCK = 128
# ||out - ref|| / ||ref|| against the float32 reference that a correct GPU half stays under. bf16
# operands land near 5e-3. The fused kernel is w8a8: it also rounds the activations (x, then the
# SiLU product) to FP8 per 128-wide group, and an emulation of that in float32 gave 4.3e-2 at
# M2.1's shape; one skipped expert of 8 shows as ~0.35, a missing scale or swapped w1/w3 near 1.
REL_ERR_LIMIT = {"sglang_fused_moe_fp8": 8e-2, "torch_grouped_mm_bf16": 2e-2}


class GpuKernelUnavailable(RuntimeError):
    """The requested GPU kernel cannot run here; the message names what failed."""


# ---------------------------------------------------------------------------------------------
# expert ids: which side computes what


def gpu_slots(gpu_mask):
    """(logical_to_slot int32 [E], slot_to_logical int64 [N]) for a bool mask [E] of GPU experts.

    Slots follow increasing expert id, as SGLang-KT's `logical_to_gpu_index` does; CPU experts map to -1.
    """
    import torch

    mask = torch.as_tensor(gpu_mask, dtype=torch.bool).cpu()
    experts = torch.nonzero(mask).flatten()
    logical_to_slot = torch.full((mask.numel(),), -1, dtype=torch.int32)
    logical_to_slot[experts] = torch.arange(experts.numel(), dtype=torch.int32)
    return logical_to_slot, experts


def remap_expert_ids(ids, gpu_mask, logical_to_slot):
    """The GPU side's ids [T, k] (int32): CPU experts -1, GPU experts their slot (sglang's
    mask_and_remap_expert_ids, without its torch.compile). All three on one device."""
    import torch

    return torch.where(gpu_mask[ids], logical_to_slot[ids], -1).to(torch.int32)


def split_for_cpu(ids, gpu_mask, out=None):
    """kt-kernel's ids [T, k] (int64): GPU experts -1 (kt skips them), the rest unchanged."""
    import torch

    if out is None:
        return torch.where(gpu_mask[ids], torch.full_like(ids, -1), ids)
    return torch.where(gpu_mask[ids], torch.full_like(ids, -1), ids, out=out)


# ---------------------------------------------------------------------------------------------
# weights in SGLang's layout


def _u8(t):
    import torch

    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _f8(t):
    import torch

    return t.view(torch.float8_e4m3fn)


@dataclass
class Fp8Layer:
    """One layer's experts as SGLang holds block-FP8 MoE weights.

    w13 [E, 2I, H] float8_e4m3fn (gate rows, then up rows), w13_scale [E, 2I/128, H/128] float32,
    w2 [E, H, I], w2_scale [E, H/128, I/128]. Dequantized weight = FP8 value x its block's scale.
    """

    w13: Any
    w13_scale: Any
    w2: Any
    w2_scale: Any

    @classmethod
    def from_experts(cls, experts, device=None) -> "Fp8Layer":
        """From checkpoint-layout experts (gate/up [E, I, H], down [E, H, I], FP8, with scales)."""
        import torch

        # cat and index_select go through uint8 views: FP8 support of those ops varies by build
        w13 = torch.cat([_u8(experts.gate), _u8(experts.up)], dim=1)
        s13 = torch.cat([experts.gate_scale, experts.up_scale], dim=1)
        return cls(
            w13=_f8(w13.to(device)).contiguous(),
            w13_scale=s13.float().to(device).contiguous(),
            w2=_f8(_u8(experts.down).to(device)).contiguous(),
            w2_scale=experts.down_scale.float().to(device).contiguous(),
        )

    @property
    def experts(self) -> int:
        return int(self.w13.shape[0])

    def select(self, experts) -> "Fp8Layer":
        """The experts listed (logical ids, in slot order), each in its own new memory."""
        idx = experts.to(self.w13.device)
        return Fp8Layer(
            w13=_f8(_u8(self.w13).index_select(0, idx)).contiguous(),
            w13_scale=self.w13_scale.index_select(0, idx).contiguous(),
            w2=_f8(_u8(self.w2).index_select(0, idx)).contiguous(),
            w2_scale=self.w2_scale.index_select(0, idx).contiguous(),
        )

    def dequantized(self, slot: int, device=None):
        """Slot `slot` as float32 (w1 [I, H], w3 [I, H], w2 [H, I]): fp8.reference_moe accepts this layer."""
        w13 = dequantize_block(self.w13[slot], self.w13_scale[slot], device)
        inter = w13.shape[0] // 2
        return w13[:inter], w13[inter:], dequantize_block(self.w2[slot], self.w2_scale[slot], device)

    def bf16(self):
        """(w13, w2) dequantized to bf16, [N, 2I, H] and [N, H, I], one expert at a time (float32
        temporaries of one expert only)."""
        import torch

        n, rows, cols = self.w13.shape
        w13 = torch.empty((n, rows, cols), dtype=torch.bfloat16, device=self.w13.device)
        w2 = torch.empty(tuple(self.w2.shape), dtype=torch.bfloat16, device=self.w2.device)
        for e in range(n):
            w13[e] = dequantize_block(self.w13[e], self.w13_scale[e]).to(torch.bfloat16)
            w2[e] = dequantize_block(self.w2[e], self.w2_scale[e]).to(torch.bfloat16)
        return w13, w2


# ---------------------------------------------------------------------------------------------
# the two kernels


@dataclass(frozen=True)
class GpuKernel:
    """Which kernel computes the GPU half here, and why that one."""

    name: str
    reason: str
    fused_fn: Optional[Callable] = None

    @property
    def weight_format(self) -> str:
        if self.name == KERNEL_FUSED:
            return "FP8 e4m3 with 128x128 float32 block scales (SGLang's w13/w2 layout)"
        return "bf16, dequantized from the FP8 experts"

    def bytes_per_expert(self, hidden: int, intermediate: int) -> int:
        """Weight bytes one expert's GEMMs read in this kernel's format."""
        if self.name == KERNEL_FUSED:
            scales = 3 * math.ceil(hidden / FP8_BLOCK) * math.ceil(intermediate / FP8_BLOCK) * 4
            return 3 * hidden * intermediate + scales
        return 2 * 3 * hidden * intermediate


def load_fused_moe() -> Callable:
    """sglang's `fused_experts_impl`, ready to call outside a server.

    Its config lookup reads the global server args (`enable_deterministic_inference`): a dummy
    ServerArgs is installed when none is, as sglang's own kernel tests do.
    """
    try:
        from sglang.srt.layers.moe.fused_moe_triton.fused_moe import fused_experts_impl
        from sglang.srt.server_args import ServerArgs, get_global_server_args, set_global_server_args_for_scheduler
    # sglang's import chain fails in more ways than ImportError (sgl_kernel's loader raises
    # OSError or RuntimeError on a mismatched build): every one means "not usable here".
    except Exception as exc:  # noqa: BLE001
        raise GpuKernelUnavailable(f"sglang's fused MoE does not import: {type(exc).__name__}: {exc}") from exc
    try:
        get_global_server_args()
    except ValueError:
        set_global_server_args_for_scheduler(ServerArgs(model_path="dummy"))
    return fused_experts_impl


def choose_kernel(device: str, want: str = "auto") -> GpuKernel:
    """The GPU half's kernel: SGLang's fused FP8 MoE on CUDA when sglang imports, else torch's
    grouped GEMM. `want` = fused or grouped insists (a clear error when it cannot run)."""
    import torch

    if want not in KERNEL_CHOICES:
        raise UserError(f"--gpu-kernel {want!r}: use one of {', '.join(KERNEL_CHOICES)}")
    fused_why = None
    if want in ("auto", "fused"):
        if not str(device).startswith("cuda"):
            fused_why = "no CUDA device (SGLang's fused MoE is a Triton kernel for the GPU)"
        else:
            try:
                return GpuKernel(KERNEL_FUSED, "sglang imports: the kernel SGLang-KT runs", load_fused_moe())
            except GpuKernelUnavailable as exc:
                fused_why = str(exc)
        if want == "fused":
            raise UserError(
                f"--gpu-kernel fused cannot run: {fused_why}. On the GPU host, `source SITE/env.sh` of the "
                "sglang-kt bundle first (results/README.md), or pass --gpu-kernel grouped"
            )
    if not hasattr(torch, "_grouped_mm"):
        raise UserError(f"torch {torch.__version__} has no torch._grouped_mm: use torch 2.8 or newer for the grouped GPU half")
    reason = "asked for" if want == "grouped" else f"fused kernel unavailable: {fused_why}"
    return GpuKernel(KERNEL_GROUPED, reason)


class GpuHalf:
    """The GPU side of one layer: N experts resident, called with the router's logical ids.

    `half(x [T, H] bf16, ids [T, k] int64 logical, weights [T, k] float32) -> [T, H] bf16`, the
    sum over the GPU experts only; rows with no GPU expert are zero.
    """

    def __init__(self, kernel: GpuKernel, layer: Fp8Layer, gpu_mask, device):
        import torch

        self.kernel = kernel
        logical_to_slot, experts = gpu_slots(gpu_mask)
        if experts.numel() != layer.experts:
            raise ValueError(f"mask holds {experts.numel()} GPU experts, the packed layer {layer.experts}")
        self.mask = torch.as_tensor(gpu_mask, dtype=torch.bool).to(device)
        self.logical_to_slot = logical_to_slot.to(device)
        self.n = layer.experts
        self.layer: Optional[Fp8Layer] = layer
        if kernel.name == KERNEL_GROUPED:
            w13, w2 = layer.bf16()
            # grouped GEMM's second operand: [N, K, out] with K contiguous (a transposed view)
            self.w13_t, self.w2_t = w13.transpose(1, 2), w2.transpose(1, 2)
            self.inter = w2.shape[2]
            self.layer = None  # the bf16 copies are what runs: the FP8 one would only take memory

    def __call__(self, x, ids, weights):
        slot_ids = remap_expert_ids(ids, self.mask, self.logical_to_slot)
        if self.kernel.name == KERNEL_FUSED:
            return self.kernel.fused_fn(
                x,
                self.layer.w13,
                self.layer.w2,
                weights,
                slot_ids,
                use_fp8_w8a8=True,
                w1_scale=self.layer.w13_scale,
                w2_scale=self.layer.w2_scale,
                block_shape=[FP8_BLOCK, FP8_BLOCK],
                # as SGLang sets it (fused_experts): skip -1 ids unless every expert is local
                filter_expert=self.n != self.mask.numel(),
            )
        return grouped_moe(x, slot_ids, weights, self.w13_t, self.w2_t, self.inter)


def grouped_moe(x, slot_ids, weights, w13_t, w2_t, inter: int):
    """Sum over the GPU experts with two grouped GEMMs; slot -1 contributes nothing.

    Shapes stay fixed for a given token count (no host sync), so a CUDA graph can hold it: every
    (token, choice) row is sorted by slot with the -1 rows last, past the last group's end, and
    masked out after the GEMMs (their values are never read).
    """
    import torch

    tokens, top_k = slot_ids.shape
    n = w13_t.shape[0]
    flat = slot_ids.reshape(-1).long()
    key = torch.where(flat < 0, torch.full_like(flat, n), flat)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(n + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    offs = torch.cumsum(counts[:n], 0, dtype=torch.int32)
    rows = order // top_k
    gate_up = torch._grouped_mm(x[rows], w13_t, offs=offs)
    h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch._grouped_mm(h, w2_t, offs=offs)
    valid = (key[order] < n).unsqueeze(1)
    contrib = torch.where(valid, y.float() * weights.reshape(-1)[order].unsqueeze(1), 0.0)
    out = torch.zeros(tokens, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, rows, contrib)
    return out.to(torch.bfloat16)


class GraphedHalf:
    """A GpuHalf captured in a CUDA graph on fixed input buffers: a replay skips the Python and the
    launch gaps of its kernels (SGLang runs decode in CUDA graphs unless --disable-cuda-graph)."""

    def __init__(self, half: GpuHalf, x, ids, weights, warmups: int = 3):
        import torch

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmups):  # Triton compiles and allocations happen outside the capture
                half(x, ids, weights)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = half(x, ids, weights)
        torch.cuda.synchronize()

    def __call__(self, x=None, ids=None, weights=None):
        """Replay on the buffers captured (the arguments are ignored: fill those buffers first)."""
        self.graph.replay()
        return self.out


# ---------------------------------------------------------------------------------------------
# work, ceilings, rooflines


def gpu_work(ids_cpu, gpu_mask_cpu, hidden: int, intermediate: int, bytes_per_expert: int) -> dict[str, float]:
    """What the GPU half must do for one call: distinct GPU experts read, their weight bytes,
    activation bytes (x read, output written, bf16), FLOPs (three GEMMs per routed row)."""
    import torch

    on_gpu = gpu_mask_cpu[ids_cpu]
    routed = int(on_gpu.sum())
    unique = int(torch.unique(ids_cpu[on_gpu]).numel()) if routed else 0
    tokens = ids_cpu.shape[0]
    return {
        "unique_experts": unique,
        "routed_rows": routed,
        "weight_bytes": unique * bytes_per_expert,
        "activation_bytes": 2 * tokens * hidden * 2 if routed else 0,
        "flops": 2.0 * 3 * hidden * intermediate * routed,
    }


def roofline_ms(bytes_moved: float, flops: float, copy_gb_s: float, tflop_s: float) -> float:
    """The floor: the larger of bytes over the copy bandwidth and FLOPs over the matrix rate, in ms."""
    if copy_gb_s <= 0 or tflop_s <= 0:
        raise ValueError(f"ceilings must be positive, got {copy_gb_s} GB/s and {tflop_s} TFLOP/s")
    return max(bytes_moved / (copy_gb_s * 1e9), flops / (tflop_s * 1e12)) * 1e3


def timer(device: str):
    """time(fn, repeats) -> seconds per call: CUDA events on a GPU, the host clock elsewhere."""
    import torch

    cuda = str(device).startswith("cuda")

    def run(fn: Callable[[], Any], repeats: int, warmups: int = 2) -> list[float]:
        for _ in range(warmups):
            fn()
        if cuda:
            torch.cuda.synchronize()
        out = []
        for _ in range(repeats):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return out

    return run


@dataclass
class Ceilings:
    """Measured on the device in the same run: the yardsticks for a roofline."""

    device: str
    timer: str
    copy_bytes: int
    copy_gb_s: float
    matmul_n: int
    bf16_tflop_s: float
    fp8_tflop_s: Optional[float] = None
    fp8_error: Optional[str] = None
    samples: dict[str, list[float]] = field(default_factory=dict)

    def rate_for(self, kernel: GpuKernel) -> tuple[float, str]:
        """(TFLOP/s, which) the kernel's GEMMs are held to: FP8 for the fused kernel when measured."""
        if kernel.name == KERNEL_FUSED and self.fp8_tflop_s:
            return self.fp8_tflop_s, "fp8"
        return self.bf16_tflop_s, "bf16"


def measure_ceilings(device: str, copy_bytes: int, matmul_n: int, fp8: bool, repeats: int = 10) -> Ceilings:
    """Copy bandwidth (a device-to-device copy of random float32, read + write counted) and the
    rate of an n x n x n matrix product on random data, bf16 and optionally FP8 (torch._scaled_mm)."""
    import torch

    timed = timer(device)
    cuda = str(device).startswith("cuda")
    g = torch.Generator(device=device).manual_seed(3)
    n = max(1, copy_bytes // 8)  # source and destination together hold copy_bytes
    src = torch.rand(n, generator=g, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), repeats)
    src = dst = None  # the copy's buffers go before the matrices come
    a = torch.randn(matmul_n, matmul_n, generator=g, device=device).to(torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, generator=g, device=device).to(torch.bfloat16)
    mm_s = timed(lambda: a @ b, repeats)
    flops = 2.0 * matmul_n**3
    c = Ceilings(
        device=torch.cuda.get_device_name(0) if cuda else "cpu",
        timer="cuda events" if cuda else "host clock",
        copy_bytes=2 * n * 4,
        copy_gb_s=2 * n * 4 / statistics.median(copy_s) / 1e9,
        matmul_n=matmul_n,
        bf16_tflop_s=flops / statistics.median(mm_s) / 1e12,
        samples={"copy_s": copy_s, "bf16_matmul_s": mm_s},
    )
    if fp8:
        try:
            a8 = a.to(torch.float8_e4m3fn)
            b8 = b.to(torch.float8_e4m3fn).t()  # _scaled_mm wants its second operand column-major
            one = torch.ones((), device=device)
            fp8_s = timed(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), repeats)
            c.fp8_tflop_s = flops / statistics.median(fp8_s) / 1e12
            c.samples["fp8_matmul_s"] = fp8_s
        except Exception as exc:  # noqa: BLE001  (an unsupported build: the bf16 rate stands in, and says so)
            c.fp8_error = f"{type(exc).__name__}: {exc}"[:500]
    return c
