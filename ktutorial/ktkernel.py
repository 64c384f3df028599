"""kt-kernel's FP8 CPU experts, run for real on a machine without a GPU.

SGLang-KT hands the experts that are not on the GPU to kt-kernel's `KTMoEWrapper`. This
module drives that same wrapper on one layer of an HF checkpoint folder, and computes a
float32 reference from the same FP8 bytes (fp8.reference_moe) so the two can be compared.

Two traps on a CPU-only machine (both silent or confusing, both handled in `import_kt_kernel`):
- the wrapper allocates its buffers with `pin_memory=True`, which needs an NVIDIA driver
  ("Found no NVIDIA driver"): we give kt-kernel a torch whose allocators drop that flag;
- without `KT_FORCE_SYNC_SUBMIT=1` the wrapper hands its work to a CUDA stream callback
  that never runs, and `forward` returns zeros without an error.
Two more from its design: the CPU thread pool is created once per process (the first
wrapper's thread count wins), and `forward` returns a buffer it reuses on the next call.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Optional

from safetensors import safe_open

from ktutorial import fp8
from ktutorial.errors import MissingDependency, UserError
from ktutorial.spec import ModelSpec

KT_KERNEL_INSTALL = (
    "pip install --no-deps kt-kernel==0.7.2 (--no-deps keeps your torch; kt-kernel pins torch==2.9.1), "
    "or run `make setup`"
)
DEFAULT_CHUNK = 512
SLOW_VARIANTS = ("avx2",)

_kt = None  # the imported kt_kernel module, once


def _pinless_torch(torch_mod):
    """A stand-in for the torch module whose tensor factories ignore pin_memory."""
    shim = types.ModuleType("torch")
    shim.__dict__.update(torch_mod.__dict__)

    def _drop_pin(fn):
        def wrapper(*args, **kwargs):
            kwargs.pop("pin_memory", None)
            return fn(*args, **kwargs)

        return wrapper

    for name in ("zeros", "empty", "full", "ones"):
        setattr(shim, name, _drop_pin(getattr(torch_mod, name)))
    return shim


def import_kt_kernel():
    """Import kt_kernel with the CPU-only workarounds applied; MissingDependency if absent."""
    global _kt
    if _kt is not None:
        return _kt
    # Must be set before the first forward: it is read at every submit.
    os.environ["KT_FORCE_SYNC_SUBMIT"] = "1"
    try:
        import kt_kernel  # noqa: F401
        import kt_kernel.experts_base as base
    except ImportError as exc:
        raise MissingDependency("kt-kernel", KT_KERNEL_INSTALL) from exc
    import torch

    if not torch.cuda.is_available():
        # Only kt-kernel's module sees the shim; the rest of the process keeps real torch.
        base.torch = _pinless_torch(torch)
    _kt = kt_kernel
    return kt_kernel


def cpu_variant() -> str:
    """The CPU build kt-kernel loaded here: amx, avx512_*, or avx2."""
    return str(import_kt_kernel().__cpu_variant__)


def variant_warning(variant: Optional[str] = None) -> Optional[str]:
    """A one-line warning when kt-kernel runs its slow build, else None."""
    variant = variant or cpu_variant()
    if variant in SLOW_VARIANTS:
        return (
            f"kt-kernel loaded its '{variant}' build: this CPU has no AVX512, so FP8 experts run "
            "on the slow AVX2 fallback. Fine for the tiny model; for MiniMax-M2.1 use a CPU with "
            "AVX512 (BF16+VBMI) or AMX."
        )
    return None


def thread_pool_threads() -> Optional[int]:
    """Threads of the process-wide kt-kernel pool, or None before the first wrapper."""
    import kt_kernel.experts_base as base

    pool = base._MoEBase._cpu_infer_instance
    return None if pool is None else _POOL_THREADS.get(id(pool))


_POOL_THREADS: dict[int, int] = {}
_EXIT_HOOKED = False


@contextlib.contextmanager
def native_stdout_to_stderr():
    """kt-kernel's C++ and loader print progress on stdout; keep stdout for our JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _hook_exit_banner() -> None:
    """The pool prints 'CPUInfer ...: Goodbye' on stdout while Python shuts down: send it to stderr."""
    global _EXIT_HOOKED
    if _EXIT_HOOKED:
        return
    _EXIT_HOOKED = True

    def _redirect():
        try:
            sys.stdout.flush()
            os.dup2(2, 1)
        except (OSError, ValueError):
            pass

    atexit.register(_redirect)


class CPUExperts:
    """One layer's experts of an FP8 HF folder, loaded into kt-kernel and run on the CPU."""

    def __init__(
        self,
        hf_dir: str | Path,
        layer_idx: int,
        spec: Optional[ModelSpec] = None,
        gpu_mask=None,
        threads: int = 2,
        chunk: int = DEFAULT_CHUNK,
    ):
        kt = import_kt_kernel()
        import kt_kernel.experts_base as base
        import torch

        hf_dir = Path(hf_dir)
        self.spec = spec or ModelSpec.from_dir(hf_dir)
        if not self.spec.is_fp8:
            raise UserError(f"{hf_dir} is not a block-FP8 checkpoint: kt-kernel's FP8 method needs one")
        if not 0 <= layer_idx < self.spec.num_layers:
            raise UserError(f"layer {layer_idx} out of range: the model has {self.spec.num_layers} layers")
        self.layer_idx = layer_idx
        self.chunk = int(chunk)
        e = self.spec.num_experts
        mask = torch.zeros(e, dtype=torch.bool) if gpu_mask is None else torch.as_tensor(gpu_mask, dtype=torch.bool)
        if mask.shape != (e,):
            raise UserError(f"gpu_mask must have one entry per expert ({e}), got shape {tuple(mask.shape)}")
        existing = base._MoEBase._cpu_infer_instance
        if existing is not None and _POOL_THREADS.get(id(existing), threads) != threads:
            warnings.warn(
                f"kt-kernel's thread pool already runs {_POOL_THREADS[id(existing)]} threads in this "
                f"process; threads={threads} is ignored (one pool per process)",
                stacklevel=2,
            )
        _hook_exit_banner()
        with native_stdout_to_stderr():
            self._load(kt, base, hf_dir, layer_idx, e, mask, threads)

    def _load(self, kt, base, hf_dir, layer_idx, e, mask, threads):
        import torch

        self.wrapper = kt.KTMoEWrapper(
            layer_idx=layer_idx,
            num_experts=e,
            num_experts_per_tok=self.spec.experts_per_token,
            hidden_size=self.spec.hidden_size,
            moe_intermediate_size=self.spec.expert_intermediate_size,
            gpu_experts_mask=mask,
            cpuinfer_threads=threads,
            threadpool_count=1,
            weight_path=str(hf_dir),
            chunked_prefill_size=self.chunk,
            method="FP8",
        )
        pool = base._MoEBase._cpu_infer_instance
        _POOL_THREADS.setdefault(id(pool), threads)
        self.wrapper.load_weights(torch.arange(e, dtype=torch.int64))

    @property
    def gpu_mask(self):
        """The live mask kt-kernel reads (True = on the GPU, skipped here); edit in place."""
        return self.wrapper.gpu_experts_mask

    def set_gpu_mask(self, mask) -> None:
        import torch

        self.wrapper.gpu_experts_mask.copy_(torch.as_tensor(mask, dtype=torch.bool))

    def forward(self, x, topk_ids, topk_weights):
        """Sum over each token's chosen CPU experts of weight x expert(x), as float32 [T, H]."""
        import torch

        x = torch.as_tensor(x, dtype=torch.float32)
        ids = torch.as_tensor(topk_ids, dtype=torch.int64)
        w = torch.as_tensor(topk_weights, dtype=torch.float32)
        if x.ndim != 2 or x.shape[1] != self.spec.hidden_size:
            raise UserError(f"x must be [tokens, {self.spec.hidden_size}], got {tuple(x.shape)}")
        if ids.shape != (x.shape[0], self.spec.experts_per_token) or w.shape != ids.shape:
            raise UserError("topk_ids and topk_weights must be [tokens, experts_per_token]")
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], self.chunk):
            end = min(start + self.chunk, x.shape[0])
            # More tokens than chunked_prefill_size would overrun kt-kernel's output buffer.
            y = self.wrapper.forward(
                x[start:end].contiguous(), ids[start:end].contiguous(), w[start:end].contiguous(), 0
            )
            out[start:end] = y.float()  # copy now: the wrapper reuses this buffer next call
        return out


class CheckpointExperts:
    """One layer's experts read from the checkpoint's safetensors as they are asked for."""

    def __init__(self, hf_dir: str | Path, layer_idx: int):
        self.hf_dir = Path(hf_dir)
        self.index = json.loads((self.hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
        self.prefix = f"model.layers.{layer_idx}.block_sparse_moe.experts."
        self._handles: dict[str, object] = {}

    def _get(self, name: str):
        fname = self.index[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.hf_dir / fname), framework="pt")
        return self._handles[fname].get_tensor(name)

    def dequantized(self, e: int, device=None):
        """Expert e as float32 (w1, w3, w2)."""
        names = (f"{self.prefix}{e}.{w}.weight" for w in ("w1", "w3", "w2"))
        return tuple(fp8.dequantize_block(self._get(n), self._get(n + "_scale_inv"), device) for n in names)


def reference_experts(hf_dir: str | Path, layer_idx: int, x, topk_ids, topk_weights, gpu_mask=None):
    """Float32 reference for CPUExperts.forward: fp8.reference_moe on the checkpoint's experts,
    leaving out those `gpu_mask` marks as on the GPU."""
    import torch

    skip = None if gpu_mask is None else torch.as_tensor(gpu_mask, dtype=torch.bool)
    return fp8.reference_moe(CheckpointExperts(hf_dir, layer_idx), x, topk_ids, topk_weights, skip=skip)
