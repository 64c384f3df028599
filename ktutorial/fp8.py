"""FP8 block dequantization, the MoE expert loop, and the float32 reference the kernel checks use.

One copy of the arithmetic that ktkernel.py (the tiny checkpoint through kt-kernel), kernel_bench.py
(random M2.1-shaped layers) and hybrid.py (transformers' experts on the GPU side) share:

- `dequantize_block`: an FP8 weight times the float32 scale of its block (MiniMax-M2's checkpoints
  store `weight_scale_inv` per 128 x 128 block).
- `moe`: the sparse-MoE sum, out[t] = sum over the experts chosen for token t of
  weight * expert(tokens routed to it), for any expert function and a mask of experts to compute.
- `reference_moe`: that sum in float32 with SiLU-gated MLPs, W2 (silu(W1 x) * (W3 x)).
- `rel_err`: how far an output is from its reference.

torch is imported inside the functions: it is installed by the Makefile, not by pyproject.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol


def dequantize_block(weight, scale_inv, device=None):
    """float32 weight [N, K]: each FP8 value times the scale of its [bn, bk] block.

    The block size comes from the shapes (bn = ceil(N / scale rows), likewise bk), so a partial
    last block is fine. With `device`, both move there first: dequantizing is the slow part, and
    FP8 bytes are a quarter of float32's to move.
    """
    if device is not None:
        weight, scale_inv = weight.to(device), scale_inv.to(device)
    n, k = weight.shape
    sn, sk = scale_inv.shape
    bn, bk = math.ceil(n / sn), math.ceil(k / sk)
    scale = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return weight.float() * scale


def moe(x, ids, weights, expert: Callable[[int, Any], Any], compute=None):
    """The MoE output [T, H]: for each expert e chosen in ids [T, k], expert(e, x[tokens routed to e])
    scaled by those tokens' routing weights [T, k] and added to their rows.

    `compute` (bool [E], on ids' device) restricts the sum to the experts where it is True: the
    GPU side of a GPU/CPU split, or a reference with some experts left out.
    """
    import torch

    out = torch.zeros_like(x)
    chosen = ids if compute is None else ids[compute[ids]]
    for e in torch.unique(chosen).tolist():
        rows, cols = torch.where(ids == e)
        y = expert(e, x[rows])
        out.index_add_(0, rows, y * weights[rows, cols, None].to(y.dtype))
    return out


class DequantizedExperts(Protocol):
    def dequantized(self, e: int, device=None) -> tuple[Any, Any, Any]:
        """Expert e as float32 (w1 [I, H], w3 [I, H], w2 [H, I])."""


def reference_moe(experts: DequantizedExperts, x, ids, weights, skip: Any = None):
    """float32 MoE output [T, H]: sum over chosen experts of w * W2 (silu(W1 x) * (W3 x)).

    Computed on x's device; `skip` leaves experts out (a set of expert ids, or a bool mask [E]
    that is True where the expert is skipped, as kt-kernel's GPU mask is).
    """
    import torch

    x = torch.as_tensor(x, dtype=torch.float32)
    ids = torch.as_tensor(ids, dtype=torch.int64, device=x.device)
    weights = torch.as_tensor(weights, dtype=torch.float32, device=x.device)
    compute = None
    if skip is not None:
        if isinstance(skip, torch.Tensor) and skip.dtype == torch.bool:
            compute = ~skip.to(ids.device)
        else:
            skip = [int(e) for e in skip]
            compute = torch.ones(max([int(ids.max()) + 1, *(e + 1 for e in skip)]), dtype=torch.bool, device=ids.device)
            compute[skip] = False

    def mlp(e: int, xe):
        w1, w3, w2 = experts.dequantized(e, xe.device)
        return (torch.nn.functional.silu(xe @ w1.T) * (xe @ w3.T)) @ w2.T

    return moe(x, ids, weights, mlp, compute)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| (Frobenius, float32, on the CPU).

    Zero handling: a zero reference with a zero output is 0 (they agree exactly); a zero
    reference with any other output is inf, and so is a NaN or inf anywhere, so a check
    `rel_err(...) < limit` fails rather than passing on a division by a tiny number.
    """
    import torch

    out = torch.as_tensor(out).float().cpu()
    ref = torch.as_tensor(ref).float().cpu()
    num, den = (out - ref).norm().item(), ref.norm().item()
    if not (math.isfinite(num) and math.isfinite(den)):
        return float("inf")
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den
