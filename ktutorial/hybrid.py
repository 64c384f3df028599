"""The GPU/CPU expert split that SGLang-KT makes, run for real on a MiniMax-M2 checkpoint.

transformers' own `MiniMaxM2ForCausalLM` runs the model (attention, router, norms) in float32.
Its experts module is pluggable: we register an implementation that splits every MoE layer's
experts by a boolean mask, as `--kt-num-gpu-experts` / `--kt-expert-placement-strategy` do:

- experts marked GPU-resident are computed by torch on the model's device (a CUDA GPU when
  there is one; on a CPU-only machine the CPU stands in for it);
- all other experts are computed by kt-kernel's FP8 CPU kernel, loaded from the same
  safetensors folder, submitted *before* the torch experts run and collected after, so both
  sides work at the same time (KT's `submit_forward` / `sync_forward`).

The same loaded model also runs plain (transformers' eager experts on the dequantized
weights), so the two can be compared token by token; `agreement()` adds llama.cpp on the GGUF
of the same weights as a third, independent implementation. `routing_counts()` and
`coverage_table()` measure how much of the expert traffic a placement keeps on the GPU.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import httpx

from ktutorial import fp8, ktkernel
from ktutorial.engines.llamacpp import LlamaCppAPI
from ktutorial.errors import UserError

# Decode on a small machine slows ~10x when torch's OpenMP threads spin while kt-kernel's pool
# works (FACTS). PASSIVE must be in the environment before torch starts its first parallel region.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting above)

from ktutorial import results, tiny
from ktutorial import server as srv
from ktutorial.ktkernel import CPUExperts
from ktutorial.plots import save_figure
from ktutorial.spec import ModelSpec

IMPLEMENTATION = "ktutorial_hybrid"
PLACEMENT_STRATEGIES = ("uniform", "front-loading", "frequency", "random")
# kt-kernel refuses more tokens per call than chunked_prefill_size; we slice prefill into chunks.
DEFAULT_CHUNK_TOKENS = 256
FAULTS = ("swap_w1_w3", "skip_scale")


# ---------------------------------------------------------------------------------------------
# Placement: which experts of each layer live on the GPU (mirrors sglang-kt's kt_utils)
# ---------------------------------------------------------------------------------------------


def placement_masks(
    strategy: str,
    num_gpu_experts: int,
    num_layers: int,
    num_experts: int,
    activation_counts: torch.Tensor | None = None,
    seed: int = 42,
) -> torch.Tensor:
    """Bool [num_layers, num_experts], True = GPU-resident.

    `num_gpu_experts` is per layer, as `--kt-num-gpu-experts` is: the budget is that times the
    number of layers, and the strategy decides where it goes (sglang-kt's semantics):
    uniform = experts 0..N-1 of every layer; front-loading = whole layers from layer 0 until the
    budget is spent; frequency = the most-activated (layer, expert) pairs over all layers from
    `activation_counts` [L, E] (a calibration run); random = a seeded random choice of pairs.
    """
    if strategy not in PLACEMENT_STRATEGIES:
        raise UserError(
            f"unknown placement strategy {strategy!r}: choose one of {', '.join(PLACEMENT_STRATEGIES)}"
        )
    if not 0 <= num_gpu_experts <= num_experts:
        raise UserError(
            f"GPU experts per layer must be between 0 and {num_experts} (the layer's expert count), "
            f"got {num_gpu_experts}"
        )
    budget = num_gpu_experts * num_layers
    masks = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    if budget == 0:
        return masks
    if strategy == "uniform":
        masks[:, :num_gpu_experts] = True
    elif strategy == "front-loading":
        flat = masks.view(-1)
        flat[:budget] = True  # row-major: layer 0 fills first
    elif strategy == "random":
        g = torch.Generator().manual_seed(seed)
        masks.view(-1)[torch.randperm(num_layers * num_experts, generator=g)[:budget]] = True
    else:  # frequency
        if activation_counts is None:
            raise UserError(
                "the frequency strategy needs routing counts from a calibration run: pass "
                "activation_counts (routing_counts() over a prompt set)"
            )
        counts = torch.as_tensor(activation_counts, dtype=torch.float64)
        if tuple(counts.shape) != (num_layers, num_experts):
            raise UserError(
                f"activation_counts has shape {tuple(counts.shape)}, expected "
                f"({num_layers}, {num_experts}) = (layers, experts)"
            )
        # Stable order: ties (unseen experts) go to the lower (layer, expert) index, so the
        # placement is the same on every run.
        order = sorted(range(counts.numel()), key=lambda i: (-float(counts.view(-1)[i]), i))
        masks.view(-1)[torch.tensor(order[:budget])] = True
    return masks


def coverage(masks: torch.Tensor, counts: torch.Tensor) -> dict[str, Any]:
    """Share of expert activations (token x top-k choices) that land on GPU-resident experts."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    on_gpu = (counts * masks.to(torch.float64)).sum(dim=1)
    per_layer_total = counts.sum(dim=1)
    total = float(per_layer_total.sum())
    if total <= 0:
        raise UserError("no expert activations counted: run routing_counts() on at least one prompt")
    return {
        "share": float(on_gpu.sum()) / total,
        "per_layer": [float(g / t) if t > 0 else 0.0 for g, t in zip(on_gpu, per_layer_total)],
        "gpu_experts": int(masks.sum()),
    }


# ---------------------------------------------------------------------------------------------
# Loading the checkpoint into transformers' MiniMaxM2ForCausalLM (float32, dequantized)
# ---------------------------------------------------------------------------------------------


def _read_checkpoint(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"no safetensors files in {hf_dir}: is it a Hugging Face model folder?")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(hf_dir / name)))
    return tensors


def dequantized_state_dict(hf_dir: str | Path, fault: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint as float32 tensors under transformers' MiniMax-M2 parameter names.

    `fault` injects a known loader bug for negative controls: "swap_w1_w3" (gate and up
    exchanged) or "skip_scale" (FP8 values used without their block scales).
    """
    if fault is not None and fault not in FAULTS:
        raise UserError(f"unknown fault {fault!r}: choose one of {', '.join(FAULTS)}")
    raw = _read_checkpoint(Path(hf_dir))
    dense: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        if key.endswith(".weight_scale_inv"):
            continue
        scale = raw.get(key[: -len("weight")] + "weight_scale_inv") if key.endswith(".weight") else None
        if scale is not None and fault != "skip_scale":
            dense[key] = fp8.dequantize_block(t, scale)
        else:
            dense[key] = t.float()

    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for key, t in dense.items():
        if ".block_sparse_moe.experts." in key:
            prefix, rest = key.split(".block_sparse_moe.experts.")
            idx, proj, _ = rest.split(".", 2)
            experts.setdefault((prefix, int(idx)), {})[proj] = t
        else:
            out[key.replace(".block_sparse_moe.", ".mlp.")] = t
    by_layer: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for (prefix, idx), projs in experts.items():
        by_layer.setdefault(prefix, {})[idx] = projs
    for prefix, layer in by_layer.items():
        ids = sorted(layer)
        if ids != list(range(len(ids))):
            raise UserError(f"{prefix}: expert ids are not 0..{len(ids) - 1}; the checkpoint is incomplete")
        gate, up = ("w3", "w1") if fault == "swap_w1_w3" else ("w1", "w3")
        # transformers fuses gate and up: gate rows first (FACTS).
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([layer[i][gate], layer[i][up]], dim=0) for i in ids]
        )
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([layer[i]["w2"] for i in ids])
    return out


def load_model(hf_dir: str | Path, device: str | None = None, fault: str | None = None):
    """transformers' MiniMaxM2ForCausalLM in float32 on `device`, weights dequantized by us and
    loaded with strict=True (every parameter accounted for). Runs its eager experts."""
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} has no config.json: pass the model's Hugging Face folder")
    cfg = json.loads((hf_dir / "config.json").read_text())
    # The FP8 quantization_config describes the files, not the model we build: we dequantize.
    cfg.pop("quantization_config", None)
    config = MiniMaxM2Config(**cfg)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = MiniMaxM2ForCausalLM(config)
    state = dequantized_state_dict(hf_dir, fault=fault)
    model.load_state_dict(state, strict=True, assign=True)
    # Buffers that are not in the checkpoint (rotary inverse frequencies) were built on meta.
    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            inv_freq, _ = module.compute_default_rope_parameters(config)
            module.inv_freq = inv_freq
            module.original_inv_freq = inv_freq.clone()
    model = model.to(device or default_device()).eval()
    model.set_experts_implementation("eager")
    return model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(hf_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


def chat_prompt_ids(tokenizer, text: str, system: str | None = None) -> list[int]:
    """Token ids of one user turn through the model's own chat template, generation prompt on."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


# ---------------------------------------------------------------------------------------------
# kt-kernel side: one FP8 MoE per layer, loaded from the same folder
# ---------------------------------------------------------------------------------------------


class KTLayer:
    """kt-kernel's FP8 MoE for one layer, through ktutorial.ktkernel.CPUExperts (which handles
    the CPU-only traps), driven with submit/sync so the torch experts run in between.
    `skip_mask` (bool [E], True = skipped by the CPU) is the buffer kt-kernel reads at every
    call: changing it in place moves experts."""

    def __init__(self, hf_dir: Path, layer_idx: int, spec, threads: int, chunk_tokens: int):
        # kt-kernel's loader is a process-wide singleton that each load releases: CPUExperts
        # builds and loads one layer at a time, never all wrappers first.
        self.experts = CPUExperts(hf_dir, layer_idx, spec, threads=threads, chunk=chunk_tokens)
        self.wrapper = self.experts.wrapper
        self.layer_idx = layer_idx
        self.chunk_tokens = chunk_tokens

    @property
    def skip_mask(self) -> torch.Tensor:
        return self.wrapper.gpu_experts_mask

    def _stream(self, x: torch.Tensor):
        return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        _drop_foreign_buffers(x)
        self.wrapper.submit_forward(x, ids.to(torch.long), weights.to(torch.float32), self._stream(x))

    def sync(self, x: torch.Tensor) -> torch.Tensor:
        # The result is kt's reused output buffer: the caller consumes it at once (adds it).
        return self.wrapper.sync_forward(x, self._stream(x))


def _drop_foreign_buffers(x: torch.Tensor) -> None:
    """kt-kernel caches its staging buffers process-wide by token count alone: a buffer made for
    another model (hidden size), dtype or device with the same token count would be reused (a
    shape error, or the output silently returned in the other dtype/device). Drop it first."""
    from kt_kernel.experts_base import KExpertsCPUBuffer

    buf = KExpertsCPUBuffer.temp_buffer
    if buf and KExpertsCPUBuffer.temp_bs == x.shape[0]:
        staged_in, out_dev = buf[0][0], buf[6][0]
        if staged_in.shape[-1] != x.shape[-1] or out_dev.dtype != x.dtype or out_dev.device != x.device:
            KExpertsCPUBuffer.temp_bs = 0
            KExpertsCPUBuffer.temp_buffer = tuple()


_KT_CACHE: dict[tuple[str, int], KTLayer] = {}


def kt_layers(hf_dir: str | Path, threads: int = 1, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[KTLayer]:
    """One KTLayer per MoE layer, cached per process: kt-kernel keeps one CPU thread pool per
    process (the first thread count wins) and loading is the slow part."""
    hf_dir = Path(hf_dir).resolve()
    spec = ModelSpec.from_dir(hf_dir)
    layers = []
    for idx in range(spec.num_layers):
        key = (str(hf_dir), idx)
        if key not in _KT_CACHE:
            with ktkernel.native_stdout_to_stderr():
                _KT_CACHE[key] = KTLayer(hf_dir, idx, spec, threads, chunk_tokens)
        layers.append(_KT_CACHE[key])
    return layers


# ---------------------------------------------------------------------------------------------
# The split experts implementation
# ---------------------------------------------------------------------------------------------


@dataclass
class SplitStats:
    """What the split did since the last reset: activations per side, calls, seconds."""

    gpu_activations: int = 0
    cpu_activations: int = 0
    calls: int = 0
    cpu_calls_skipped: int = 0  # calls whose chosen experts were all on the GPU
    tokens: int = 0
    torch_s: float = 0.0
    kt_wait_s: float = 0.0

    @property
    def gpu_share(self) -> float:
        total = self.gpu_activations + self.cpu_activations
        return self.gpu_activations / total if total else 0.0


class _LayerSplit:
    def __init__(self, kt: KTLayer, torch_mask: torch.Tensor, stats: SplitStats):
        self.kt = kt
        self.torch_mask = torch_mask  # bool [E] on the model's device: experts torch computes
        self.stats = stats


def _torch_experts(module, x, ids, weights, compute: torch.Tensor) -> torch.Tensor:
    """transformers' eager expert loop (fused gate_up_proj), restricted to experts where `compute` is True."""

    def mlp(e: int, h: torch.Tensor) -> torch.Tensor:
        gate, up = torch.nn.functional.linear(h, module.gate_up_proj[e]).chunk(2, dim=-1)
        return torch.nn.functional.linear(module.act_fn(gate) * up, module.down_proj[e])

    return fp8.moe(x, ids, weights, mlp, compute)


def hybrid_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Experts implementation registered with transformers: kt-kernel (CPU) and torch (GPU) in
    parallel, each on its own experts, summed."""
    split: _LayerSplit = self._ktutorial_split
    out = torch.empty_like(hidden_states)
    n = hidden_states.shape[0]
    for start in range(0, n, split.kt.chunk_tokens):
        stop = min(n, start + split.kt.chunk_tokens)
        x = hidden_states[start:stop].contiguous()
        ids = top_k_index[start:stop].contiguous()
        w = top_k_weights[start:stop].contiguous()
        # Nothing for the CPU when every chosen expert is GPU-resident: no trip to host RAM.
        cpu_work = not bool(split.kt.skip_mask[ids.cpu()].all())
        if cpu_work:
            split.kt.submit(x, ids, w)  # CPU experts start now ...
        t0 = time.perf_counter()
        gpu = _torch_experts(self, x, ids, w, split.torch_mask)  # ... while torch does its share
        t1 = time.perf_counter()
        if cpu_work:
            out[start:stop] = gpu + split.kt.sync(x).to(gpu.dtype)  # consumes kt's reused buffer at once
        else:
            out[start:stop] = gpu
            split.stats.cpu_calls_skipped += 1
        t2 = time.perf_counter()
        on_gpu = int(split.torch_mask[ids].sum())
        split.stats.gpu_activations += on_gpu
        split.stats.cpu_activations += ids.numel() - on_gpu
        split.stats.calls += 1
        split.stats.tokens += stop - start
        split.stats.torch_s += t1 - t0
        split.stats.kt_wait_s += t2 - t1
    return out


def _register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, hybrid_experts_forward)


class Hybrid:
    """A loaded model that runs either plain (transformers' eager experts) or split.

    `set_masks(masks)` places experts (bool [L, E], True = GPU); `use("hybrid")` / `use("plain")`
    switches the experts implementation of the same model, so comparisons share every other weight.
    """

    def __init__(
        self,
        hf_dir: str | Path,
        device: str | None = None,
        kt_threads: int | None = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        fault: str | None = None,
        model=None,
    ):
        self.hf_dir = Path(hf_dir)
        self.device = device or default_device()
        self.model = model if model is not None else load_model(self.hf_dir, self.device, fault=fault)
        self.config = self.model.config
        self.kt_threads = kt_threads or default_kt_threads()
        _limit_torch_threads(self.kt_threads)
        self.kt = kt_layers(self.hf_dir, threads=self.kt_threads, chunk_tokens=chunk_tokens)
        self.stats = SplitStats()
        _register()
        self.experts_modules = [layer.mlp.experts for layer in self.model.model.layers]
        for module, kt in zip(self.experts_modules, self.kt):
            mask = torch.zeros(self.config.num_local_experts, dtype=torch.bool, device=self.device)
            module._ktutorial_split = _LayerSplit(kt, mask, self.stats)
        self.masks = torch.zeros(self.num_layers, self.num_experts, dtype=torch.bool)
        self.set_masks(self.masks)
        self.mode = "plain"

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_experts(self) -> int:
        return self.config.num_local_experts

    def set_masks(self, masks: torch.Tensor, kt_skip: torch.Tensor | None = None) -> None:
        """GPU-resident experts per layer. `kt_skip` (negative controls only) lets the CPU side
        skip a different set than torch computes, leaving an expert to neither side or both."""
        masks = torch.as_tensor(masks, dtype=torch.bool).cpu()
        if tuple(masks.shape) != (self.num_layers, self.num_experts):
            raise UserError(f"masks must have shape ({self.num_layers}, {self.num_experts}), got {tuple(masks.shape)}")
        skip = masks if kt_skip is None else torch.as_tensor(kt_skip, dtype=torch.bool).cpu()
        for layer, module in enumerate(self.experts_modules):
            split: _LayerSplit = module._ktutorial_split
            split.torch_mask.copy_(masks[layer])
            split.kt.skip_mask.copy_(skip[layer])  # read by kt-kernel at every call
        self.masks = masks.clone()

    def place(self, num_gpu_experts: int, strategy: str = "uniform", activation_counts=None) -> torch.Tensor:
        masks = placement_masks(strategy, num_gpu_experts, self.num_layers, self.num_experts, activation_counts)
        self.set_masks(masks)
        return masks

    def use(self, mode: str) -> "Hybrid":
        if mode not in ("plain", "hybrid"):
            raise UserError(f"mode must be 'plain' or 'hybrid', got {mode!r}")
        self.model.set_experts_implementation(IMPLEMENTATION if mode == "hybrid" else "eager")
        self.mode = mode
        return self

    # --- running -------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Float32 logits [len(ids), vocab] of one forward pass (teacher forcing)."""
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        return self.model(input_ids=x, use_cache=False).logits[0].float().cpu()

    @torch.no_grad()
    def trace(self, ids: Sequence[int]) -> "Trace":
        """One forward pass that also records, per layer, the experts chosen, the router's margin
        and the MoE block's output (see Trace)."""
        k = self.config.num_experts_per_tok
        chosen: list = [None] * self.num_layers
        margin: list = [None] * self.num_layers
        moe_out: list = [None] * self.num_layers
        handles = []
        for layer, decoder in enumerate(self.model.model.layers):

            def on_gate(_module, _inp, output, layer=layer, mlp=decoder.mlp):
                scores = torch.sigmoid(output[0].float()) + mlp.e_score_correction_bias.float()
                if scores.shape[-1] > k:
                    top = scores.topk(k + 1, dim=-1).values
                    margin[layer] = (top[:, k - 1] - top[:, k]).cpu()
                else:
                    margin[layer] = torch.full((scores.shape[0],), float("inf"))
                chosen[layer] = output[2].sort(dim=-1).values.cpu()

            def on_experts(_module, _inp, output, layer=layer):
                moe_out[layer] = output.detach().float().cpu().clone()

            handles.append(decoder.mlp.gate.register_forward_hook(on_gate))
            handles.append(decoder.mlp.experts.register_forward_hook(on_experts))
        try:
            logits = self.logits(ids)
        finally:
            for handle in handles:
                handle.remove()
        return Trace(logits, torch.stack(chosen), torch.stack(margin), torch.stack(moe_out))

    @torch.no_grad()
    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int, ignore_eos: bool = True):
        """Greedy decoding with a KV cache: (tokens, logits [n, vocab] of each step).

        With ignore_eos the end-of-turn tokens are never picked (llama.cpp's ignore_eos), so a
        model that ends its replies early still gives `max_new_tokens` positions to compare."""
        from transformers import DynamicCache

        eos = _eos_ids(self.config) if ignore_eos else []
        cache = DynamicCache(config=self.config)
        x = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        tokens: list[int] = []
        steps: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            out = self.model(input_ids=x, cache=cache, use_cache=True)
            logits = out.logits[0, -1].float().cpu()
            steps.append(logits)
            pick = logits.clone()
            if eos:
                pick[eos] = -float("inf")
            tok = int(pick.argmax())
            tokens.append(tok)
            x = torch.tensor([[tok]], dtype=torch.long, device=self.device)
        return tokens, torch.stack(steps)

    @torch.no_grad()
    def routing_counts(self, sequences: Iterable[Sequence[int]]) -> torch.Tensor:
        """How often each expert is chosen, int64 [layers, experts], over all tokens given."""
        counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64)
        handles = []
        for layer, decoder in enumerate(self.model.model.layers):

            def hook(_module, _inp, output, layer=layer):
                top_k_index = output[2]
                counts[layer] += torch.bincount(top_k_index.reshape(-1).cpu(), minlength=self.num_experts)

            handles.append(decoder.mlp.gate.register_forward_hook(hook))
        try:
            for ids in sequences:
                self.logits(ids)
        finally:
            for h in handles:
                h.remove()
        return counts

    @contextmanager
    def fault(self, fault: str):
        """Negative controls: the torch side's experts loaded with a known bug ("swap_w1_w3",
        "skip_scale") inside the block; kt-kernel still reads the correct folder."""
        state = dequantized_state_dict(self.hf_dir, fault=fault)
        saved = []
        for layer, module in enumerate(self.experts_modules):
            saved.append((module.gate_up_proj.data, module.down_proj.data))
            prefix = f"model.layers.{layer}.mlp.experts."
            module.gate_up_proj.data = state[prefix + "gate_up_proj"].to(self.device)
            module.down_proj.data = state[prefix + "down_proj"].to(self.device)
        try:
            yield self
        finally:
            for module, (gate_up, down) in zip(self.experts_modules, saved):
                module.gate_up_proj.data = gate_up
                module.down_proj.data = down

    def reset_stats(self) -> SplitStats:
        old = SplitStats(**asdict(self.stats))
        for field_name in asdict(self.stats):
            setattr(self.stats, field_name, type(getattr(self.stats, field_name))())
        return old


def _eos_ids(config) -> list[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def default_kt_threads() -> int:
    """Leave one core to torch and the submitting thread: all cores to kt is the decode trap."""
    cores = os.cpu_count() or 2
    return max(1, min(8, cores - 1))


def _limit_torch_threads(kt_threads: int) -> None:
    cores = os.cpu_count() or 2
    want = max(1, cores - kt_threads)
    if torch.get_num_threads() > want:
        torch.set_num_threads(want)


# ---------------------------------------------------------------------------------------------
# Agreement: plain transformers, the hybrid split, llama.cpp on the GGUF of the same weights
# ---------------------------------------------------------------------------------------------

DEFAULT_AGREEMENT_PROMPT = "Explain in two sentences why the sky is blue."

# Tolerances the agreement tests hold (the measured values are in each report; these leave
# about 10x headroom above them and sit far below what the negative controls produce):
# - torch vs torch (all experts on the "GPU"): the same float32 arithmetic, summed in another
#   order;
# - through kt-kernel: it rounds activations to bf16 (about 4e-3 relative per MoE block);
# - llama.cpp: its own kernels and a F16 KV cache on the same weights (the tiny GGUF holds the
#   dequantized FP8 values exactly), compared as log-probabilities of its top candidates.
# The MoE check is the sharp one: it compares each layer's expert output directly, so it does
# not depend on how much the experts move this particular model's logits.
TOL_TORCH = {"max_abs_dlogit": 1e-3, "moe_rel_err": 1e-5}
TOL_KT = {"max_abs_dlogit": 0.05, "moe_rel_err": 2e-2}
TOL_LLAMACPP = {"max_abs_dlogprob": 0.05}


@dataclass
class Trace:
    """A teacher-forced forward pass, per layer: experts chosen [L, T, k] (sorted), router margin
    [L, T] (k-th best minus (k+1)-th best score: a near-tie that rounding elsewhere can flip)
    and MoE output [L, T, H]; `logits` [T, vocab] (sliced to the generated positions by
    _teacher_forced)."""

    logits: torch.Tensor
    chosen: torch.Tensor
    margin: torch.Tensor
    moe_out: torch.Tensor


def _teacher_forced(h: Hybrid, prompt_ids: Sequence[int], tokens: Sequence[int]) -> Trace:
    """The trace of prompt + tokens, logits kept for the positions predicting each of tokens."""
    t = h.trace(list(prompt_ids) + list(tokens))
    n = len(prompt_ids)
    t.logits = t.logits[n - 1 : n - 1 + len(tokens)]
    return t


@dataclass
class Comparison:
    """One pair compared over the same positions: free-running greedy tokens, teacher-forced
    greedy picks, and the metrics named in `tolerance` (metric -> limit)."""

    a: str
    b: str
    positions: int
    token_matches: int  # free-running greedy tokens equal to a's, position by position
    argmax_matches: int  # teacher-forced: the same greedy pick at each position
    tolerance: dict[str, float]
    max_abs_dlogit: float | None = None
    rel_dlogit: float | None = None  # max |Δlogit| / max |logit of a|
    moe_rel_err: float | None = None  # worst layer's ||Δ MoE output|| / ||MoE output of a||
    max_abs_dlogprob: float | None = None  # over the top candidates llama.cpp reports
    router_flips: int | None = None  # (layer, position) pairs whose chosen experts differ
    min_router_margin: float | None = None  # of a's run
    gpu_experts_per_layer: int | None = None

    @property
    def failed_on(self) -> list[str]:
        out = [] if self.token_matches == self.positions else ["tokens"]
        out += [] if self.argmax_matches == self.positions else ["argmax"]
        for metric, limit in self.tolerance.items():
            value = getattr(self, metric)
            if value is None or not value <= limit:
                out.append(metric)
        return out

    @property
    def ok(self) -> bool:
        return not self.failed_on

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "failed_on": self.failed_on}


def _greedy_pick(logits: torch.Tensor, eos: list[int]) -> torch.Tensor:
    masked = logits.clone()
    if eos:
        masked[..., eos] = -float("inf")
    return masked.argmax(-1)


def compare_traces(
    a: str,
    b: str,
    ref: Trace,
    other: Trace,
    ref_tokens: Sequence[int],
    other_tokens: Sequence[int],
    eos: Sequence[int] = (),
    tolerance: dict[str, float] | None = None,
    gpu_experts_per_layer: int | None = None,
) -> Comparison:
    """Two teacher-forced runs on the same token path, plus each one's free-running tokens."""
    max_abs = float((ref.logits - other.logits).abs().max())
    scale = float(ref.logits.abs().max())
    eos = list(eos)
    return Comparison(
        a=a,
        b=b,
        positions=len(ref_tokens),
        token_matches=sum(int(x == y) for x, y in zip(ref_tokens, other_tokens)),
        argmax_matches=int((_greedy_pick(ref.logits, eos) == _greedy_pick(other.logits, eos)).sum()),
        tolerance=dict(tolerance if tolerance is not None else TOL_KT),
        max_abs_dlogit=max_abs,
        rel_dlogit=max_abs / scale if scale > 0 else float("inf"),
        moe_rel_err=max(fp8.rel_err(o, r) for o, r in zip(other.moe_out, ref.moe_out)),
        router_flips=int((ref.chosen != other.chosen).any(dim=-1).sum()),
        min_router_margin=float(ref.margin.min()),
        gpu_experts_per_layer=gpu_experts_per_layer,
    )


@dataclass
class LlamaCppRun:
    tokens: list[int]
    top_logprobs: list[dict[int, float]]  # teacher-forced, one per reference position


def _completion(api: LlamaCppAPI, prompt_ids: Sequence[int], n_predict: int, n_probs: int, ignore_eos: bool,
                timeout_s: float) -> dict:
    return api.complete({
        "prompt": [int(i) for i in prompt_ids],
        "n_predict": n_predict,
        "temperature": 0.0,
        "top_k": 1,
        "n_probs": n_probs,
        "ignore_eos": ignore_eos,
        "cache_prompt": True,
        "return_tokens": True,
        "seed": 0,
    }, timeout_s=timeout_s)


def _step_logprobs(step: dict) -> dict[int, float]:
    """{token id: logprob} of one step of llama.cpp's completion_probabilities."""
    tops = step.get("top_logprobs") or step.get("probs") or []
    out: dict[int, float] = {}
    for cand in tops:
        if "logprob" in cand:
            out[int(cand["id"])] = float(cand["logprob"])
        elif "prob" in cand:  # older servers report probabilities
            out[int(cand["id"])] = math.log(max(float(cand["prob"]), 1e-45))
    return out


def llamacpp_run(
    base_url: str,
    prompt_ids: Sequence[int],
    reference_tokens: Sequence[int],
    n_probs: int = 10,
    timeout_s: float = 60.0,
) -> LlamaCppRun:
    """llama.cpp's own greedy run (ignore_eos), and its top log-probabilities at each position
    of the reference path (teacher forcing: one single-token request per position, the prompt
    cache makes each one cheap)."""
    with httpx.Client(timeout=timeout_s) as http:
        api = LlamaCppAPI(base_url, http)
        free = _completion(api, prompt_ids, len(reference_tokens), n_probs, True, timeout_s)
        tokens = [int(t) for t in free.get("tokens") or []]
        if not tokens:
            tokens = [int(step["id"]) for step in free.get("completion_probabilities", [])]
        tops = []
        for i in range(len(reference_tokens)):
            step = _completion(api, list(prompt_ids) + list(reference_tokens[:i]), 1, n_probs, False, timeout_s)
            probs = step.get("completion_probabilities") or []
            if not probs:
                raise UserError("llama.cpp returned no completion_probabilities: does it support n_probs?")
            tops.append(_step_logprobs(probs[0]))
    return LlamaCppRun(tokens=tokens, top_logprobs=tops)


def compare_llamacpp(
    a: str,
    ref_logits: torch.Tensor,
    ref_tokens: Sequence[int],
    run: LlamaCppRun,
    eos: Sequence[int] = (),
    tolerance: dict[str, float] | None = None,
    gpu_experts_per_layer: int | None = None,
) -> Comparison:
    """Reference logits against llama.cpp's log-probabilities of its top candidates."""
    logprobs = torch.log_softmax(ref_logits.double(), dim=-1)
    eos_set = set(int(e) for e in eos)
    max_d = 0.0
    argmax_matches = 0
    for pos, tops in enumerate(run.top_logprobs):
        for tok, lp in tops.items():
            max_d = max(max_d, abs(float(logprobs[pos, tok]) - lp))
        best = [t for t, _ in sorted(tops.items(), key=lambda kv: -kv[1]) if t not in eos_set]
        ref_pick = int(_greedy_pick(ref_logits[pos], list(eos_set)))
        argmax_matches += int(bool(best) and best[0] == ref_pick)
    return Comparison(
        a=a,
        b="llama.cpp",
        positions=len(ref_tokens),
        token_matches=sum(int(x == y) for x, y in zip(ref_tokens, run.tokens)),
        argmax_matches=argmax_matches,
        tolerance=dict(tolerance if tolerance is not None else TOL_LLAMACPP),
        max_abs_dlogprob=max_d,
        gpu_experts_per_layer=gpu_experts_per_layer,
    )


@dataclass
class AgreementReport:
    prompt: str
    prompt_tokens: int
    reference_tokens: list[int]
    reference_text: str
    comparisons: list[Comparison] = field(default_factory=list)
    split_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    tolerances: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.comparisons) and all(c.ok for c in self.comparisons)

    def rows(self) -> list[dict[str, Any]]:
        return [c.row() for c in self.comparisons]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "prompt": self.prompt,
            "prompt_tokens": self.prompt_tokens,
            "reference_tokens": self.reference_tokens,
            "reference_text": self.reference_text,
            "tolerances": self.tolerances,
            "split_stats": self.split_stats,
            "comparisons": self.rows(),
        }


def agreement_splits(num_experts: int) -> tuple[int, ...]:
    """0, some (half) and all experts of each layer on the GPU."""
    return tuple(sorted({0, num_experts // 2, num_experts}))


def agreement(
    h: Hybrid,
    prompt_ids: Sequence[int],
    n_tokens: int = 32,
    gpu_experts: Sequence[int] | None = None,
    strategy: str = "uniform",
    llamacpp_base_url: str | None = None,
    prompt_text: str = "",
    tokenizer=None,
) -> AgreementReport:
    """Three-way agreement on one prompt: plain transformers is the reference; each hybrid split
    (`gpu_experts` per layer, placed by `strategy`) and llama.cpp (when a base URL is given) are
    compared with it over `n_tokens` greedy positions (end-of-turn ignored, so short replies
    still give n positions)."""
    eos = _eos_ids(h.config)
    gpu_experts = tuple(gpu_experts) if gpu_experts is not None else agreement_splits(h.num_experts)
    saved_masks = h.masks.clone()
    saved_mode = h.mode
    try:
        h.use("plain")
        ref_tokens, _ = h.greedy(prompt_ids, n_tokens)
        ref = _teacher_forced(h, prompt_ids, ref_tokens)
        report = AgreementReport(
            prompt=prompt_text,
            prompt_tokens=len(prompt_ids),
            reference_tokens=ref_tokens,
            reference_text=tokenizer.decode(ref_tokens) if tokenizer is not None else "",
            tolerances={"torch": TOL_TORCH, "kt": TOL_KT, "llamacpp": TOL_LLAMACPP},
        )
        # frequency placement calibrated on this very prompt and reply (the split's correctness,
        # not its coverage, is what is checked here)
        counts = h.routing_counts([list(prompt_ids) + ref_tokens]) if strategy == "frequency" else None
        hybrid_runs: dict[int, tuple[Trace, list[int]]] = {}
        h.use("hybrid")
        for n in gpu_experts:
            h.place(n, strategy, counts)
            h.reset_stats()
            tokens, _ = h.greedy(prompt_ids, n_tokens)
            run = _teacher_forced(h, prompt_ids, ref_tokens)
            stats = h.reset_stats()
            hybrid_runs[n] = (run, tokens)
            tol = TOL_TORCH if n == h.num_experts else TOL_KT
            name = f"hybrid {n}/{h.num_experts} GPU"
            report.comparisons.append(
                compare_traces("transformers", name, ref, run, ref_tokens, tokens, eos, tol, n)
            )
            report.split_stats[name] = {**asdict(stats), "gpu_share": stats.gpu_share}
        h.use("plain")
        if llamacpp_base_url:
            llama = llamacpp_run(llamacpp_base_url, prompt_ids, ref_tokens)
            report.comparisons.append(compare_llamacpp("transformers", ref.logits, ref_tokens, llama, eos))
            for n, (run, tokens) in hybrid_runs.items():
                c = compare_llamacpp(f"hybrid {n}/{h.num_experts} GPU", run.logits, tokens, llama, eos, gpu_experts_per_layer=n)
                report.comparisons.append(c)
        return report
    finally:
        h.set_masks(saved_masks)
        h.use(saved_mode)


def negative_controls(h: Hybrid, prompt_ids: Sequence[int], n_tokens: int = 32) -> list[Comparison]:
    """Deliberately wrong splits and weights, each compared as agreement() would: every one of
    these must come out not ok, or the agreement test could not catch that bug.

    - an expert computed by neither side (the CPU skips one more expert than torch computes:
      the expert this prompt routes to most, in every layer);
    - experts computed by both sides (the CPU skips none while torch computes half);
    - the transformers side loaded with gate/up (w1/w3) swapped, or without the FP8 block scales,
      checked against kt-kernel reading the same folder correctly.
    """
    eos = _eos_ids(h.config)
    half = h.num_experts // 2
    saved_masks, saved_mode = h.masks.clone(), h.mode
    out: list[Comparison] = []
    try:
        h.use("plain")
        ref_tokens, _ = h.greedy(prompt_ids, n_tokens)
        ref = _teacher_forced(h, prompt_ids, ref_tokens)
        counts = h.routing_counts([list(prompt_ids) + ref_tokens])
        masks = placement_masks("uniform", half, h.num_layers, h.num_experts)
        busiest_cpu = (counts * (~masks)).argmax(dim=1)  # per layer, an expert the CPU owns
        dropped = masks.clone()
        dropped[torch.arange(h.num_layers), busiest_cpu] = True
        h.use("hybrid")
        for label, kt_skip in (
            ("wrong mask: an expert computed by neither side", dropped),
            ("wrong mask: experts computed by both sides", torch.zeros_like(masks)),
        ):
            h.set_masks(masks, kt_skip=kt_skip)
            tokens, _ = h.greedy(prompt_ids, n_tokens)
            run = _teacher_forced(h, prompt_ids, ref_tokens)
            out.append(compare_traces("transformers", label, ref, run, ref_tokens, tokens, eos, TOL_KT, half))
        for fault, label in (("swap_w1_w3", "w1/w3 (gate/up) swapped"), ("skip_scale", "FP8 block scales skipped")):
            with h.fault(fault):
                h.use("plain")
                bad_tokens, _ = h.greedy(prompt_ids, n_tokens)
                bad = _teacher_forced(h, prompt_ids, bad_tokens)
                h.use("hybrid")
                h.set_masks(placement_masks("uniform", 0, h.num_layers, h.num_experts))
                tokens, _ = h.greedy(prompt_ids, n_tokens)
                run = _teacher_forced(h, prompt_ids, bad_tokens)
            out.append(
                compare_traces(f"transformers, {label}", "hybrid 0 GPU (kt-kernel)", bad, run, bad_tokens, tokens, eos, TOL_KT, 0)
            )
        return out
    finally:
        h.set_masks(saved_masks)
        h.use(saved_mode)


# ---------------------------------------------------------------------------------------------
# Routing statistics and placement coverage
# ---------------------------------------------------------------------------------------------

# A handful of varied requests. The first half calibrates the frequency placement, the second
# half is where coverage is measured, so "frequency" is scored on traffic it has not seen.
DEFAULT_PROMPTS = (
    "Write a Python function that reverses a linked list.",
    "What is 17 times 23? Show the steps.",
    "Tell me a short story about a lighthouse keeper.",
    "List three facts about the planet Mars.",
    "Translate 'good morning, how are you?' into French and German.",
    "Summarize the causes of the French Revolution in one paragraph.",
    "Write a haiku about autumn rain.",
    "Explain what a hash table is to a ten-year-old.",
)


@dataclass
class RoutingStudy:
    """Routing counts [layers, experts] over calibration and evaluation prompts, and the GPU
    share of expert activations for each placement strategy and GPU experts per layer."""

    num_layers: int
    num_experts: int
    experts_per_token: int
    calibration_counts: list[list[int]]
    evaluation_counts: list[list[int]]
    gpu_experts: list[int]
    coverage: dict[str, list[float]]  # strategy -> share at each gpu_experts value
    per_layer: dict[str, list[list[float]]]  # strategy -> [per gpu_experts][per layer]
    tokens_calibration: int
    tokens_evaluation: int
    prompts: list[str]

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"strategy": s, "gpu_experts_per_layer": n, "coverage": cov}
            for s, values in self.coverage.items()
            for n, cov in zip(self.gpu_experts, values)
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def coverage_table(
    calibration_counts: torch.Tensor,
    evaluation_counts: torch.Tensor,
    gpu_experts: Sequence[int] | None = None,
    strategies: Sequence[str] = ("uniform", "front-loading", "frequency", "random"),
) -> tuple[list[int], dict[str, list[float]], dict[str, list[list[float]]]]:
    """GPU share of the evaluation traffic for each strategy and GPU experts per layer. Adds
    "oracle": frequency placement fitted on the evaluation traffic itself (the upper bound)."""
    num_layers, num_experts = evaluation_counts.shape
    ns = list(gpu_experts) if gpu_experts is not None else list(range(num_experts + 1))
    cov: dict[str, list[float]] = {}
    per_layer: dict[str, list[list[float]]] = {}
    for strategy in list(strategies) + ["oracle"]:
        cov[strategy], per_layer[strategy] = [], []
        for n in ns:
            if strategy == "oracle":
                masks = placement_masks("frequency", n, num_layers, num_experts, evaluation_counts)
            else:
                masks = placement_masks(strategy, n, num_layers, num_experts, calibration_counts)
            c = coverage(masks, evaluation_counts)
            cov[strategy].append(c["share"])
            per_layer[strategy].append(c["per_layer"])
    return ns, cov, per_layer


def routing_study(
    h: Hybrid,
    tokenizer,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    reply_tokens: int = 16,
    gpu_experts: Sequence[int] | None = None,
) -> RoutingStudy:
    """Route every prompt (chat-templated) and the model's own greedy reply through the plain
    model, count expert choices per layer, and score the placements."""
    if len(prompts) < 2:
        raise UserError("routing_study needs at least two prompts: one to calibrate, one to measure")
    saved_mode = h.mode
    h.use("plain")
    try:
        seqs = []
        for text in prompts:
            ids = chat_prompt_ids(tokenizer, text)
            reply, _ = h.greedy(ids, reply_tokens, ignore_eos=False)
            eos = _eos_ids(h.config)
            cut = next((i + 1 for i, t in enumerate(reply) if t in eos), len(reply))
            seqs.append(ids + reply[:cut])
        split = len(seqs) // 2
        cal = h.routing_counts(seqs[:split])
        ev = h.routing_counts(seqs[split:])
    finally:
        h.use(saved_mode)
    ns, cov, per_layer = coverage_table(cal, ev, gpu_experts)
    return RoutingStudy(
        num_layers=h.num_layers,
        num_experts=h.num_experts,
        experts_per_token=h.config.num_experts_per_tok,
        calibration_counts=cal.tolist(),
        evaluation_counts=ev.tolist(),
        gpu_experts=ns,
        coverage=cov,
        per_layer=per_layer,
        tokens_calibration=sum(len(s) for s in seqs[:split]),
        tokens_evaluation=sum(len(s) for s in seqs[split:]),
        prompts=list(prompts),
    )


def plot_routing(study: RoutingStudy, path: str | Path) -> Path:
    """Two panels: expert choices per layer (heat map, evaluation prompts) and GPU share of
    expert activations against GPU experts per layer, one line per placement strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_heat, ax_cov) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    counts = torch.tensor(study.evaluation_counts, dtype=torch.float64)
    share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    im = ax_heat.imshow(share.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax_heat.set_xlabel("expert")
    ax_heat.set_ylabel("layer")
    ax_heat.set_yticks(range(study.num_layers))
    ax_heat.set_title("Share of each layer's expert choices")
    fig.colorbar(im, ax=ax_heat, fraction=0.046)
    styles = {"oracle": dict(linestyle="--", color="grey")}
    for strategy, values in study.coverage.items():
        label = "oracle (fitted on the measured prompts)" if strategy == "oracle" else strategy
        ax_cov.plot(study.gpu_experts, [100 * v for v in values], marker="o", markersize=3, label=label, **styles.get(strategy, {}))
    ax_cov.set_xlabel("GPU experts per layer (--kt-num-gpu-experts)")
    ax_cov.set_ylabel("expert activations on the GPU (%)")
    ax_cov.set_title(f"Coverage, {study.num_experts} experts/layer, top-{study.experts_per_token}")
    ax_cov.set_xlim(0, study.num_experts)
    ax_cov.set_ylim(0, 100)
    ax_cov.grid(alpha=0.3)
    ax_cov.legend(fontsize=8, loc="lower right")

    return save_figure(fig, Path(path))


def routing_records(study: RoutingStudy, model: str, env: dict | None = None) -> list[dict[str, Any]]:
    """One "routing" record per (strategy, GPU experts per layer), raw counts in the samples."""
    env = env if env is not None else results.environment_stamp(model=model)
    records = []
    for s, values in study.coverage.items():
        for i, (n, cov) in enumerate(zip(study.gpu_experts, values)):
            records.append(
                results.make_record(
                    "routing",
                    params={
                        "model": model,
                        "strategy": s,
                        "gpu_experts_per_layer": n,
                        "num_layers": study.num_layers,
                        "num_experts": study.num_experts,
                        "experts_per_token": study.experts_per_token,
                        "prompts": study.prompts,
                        "calibration_prompts": len(study.prompts) // 2,
                    },
                    metrics={
                        "gpu_activation_share": cov,
                        "min_layer_share": min(study.per_layer[s][i]),
                        "max_layer_share": max(study.per_layer[s][i]),
                        "tokens_calibration": study.tokens_calibration,
                        "tokens_evaluation": study.tokens_evaluation,
                    },
                    samples={
                        "per_layer_share": study.per_layer[s][i],
                        "evaluation_counts": study.evaluation_counts,
                        "calibration_counts": study.calibration_counts,
                    },
                    env=env,
                )
            )
    return records


# ---------------------------------------------------------------------------------------------
# One call each for the CLI and the notebook (the tiny model by default)
# ---------------------------------------------------------------------------------------------

_OPEN: dict[tuple[str, str], Hybrid] = {}


def open_hybrid(hf_dir: str | Path | None = None, seed: int = 0, device: str | None = None) -> tuple[Hybrid, Any]:
    """(Hybrid, tokenizer) for a model folder, the tiny model by default; one per process."""
    if hf_dir is None:
        hf_dir = tiny.ensure(seed).hf_dir
    key = (str(Path(hf_dir).resolve()), device or default_device())
    if key not in _OPEN:
        _OPEN[key] = Hybrid(hf_dir, device=device)
    return _OPEN[key], load_tokenizer(hf_dir)


def agreement_records(out: dict[str, Any], model: str, env: dict | None = None) -> list[dict[str, Any]]:
    """One "agreement" record per compared pair of run_agreement()'s result (negative controls
    included, marked as such)."""
    env = env if env is not None else results.environment_stamp(model=model)
    rows = [(r, False) for r in out["comparisons"]] + [(r, True) for r in out.get("negative_controls", [])]
    records = []
    for r, control in rows:
        metrics = {k: r[k] for k in ("token_matches", "argmax_matches", "max_abs_dlogit", "rel_dlogit",
                                     "moe_rel_err", "max_abs_dlogprob", "router_flips", "min_router_margin")}
        metrics["ok"] = r["ok"]
        records.append(
            results.make_record(
                "agreement",
                params={
                    "model": model,
                    "a": r["a"],
                    "b": r["b"],
                    "negative_control": control,
                    "positions": r["positions"],
                    "gpu_experts_per_layer": r["gpu_experts_per_layer"],
                    "tolerance": r["tolerance"],
                    "prompt": out["prompt"],
                    "prompt_tokens": out["prompt_tokens"],
                },
                metrics=metrics,
                samples={"reference_tokens": out["reference_tokens"], "failed_on": r["failed_on"]},
                env=env,
            )
        )
    return records


def run_agreement(
    seed: int = 0,
    n_tokens: int = 32,
    prompt: str = DEFAULT_AGREEMENT_PROMPT,
    llamacpp: bool = True,
    controls: bool = False,
    strategy: str = "uniform",
    records: str | Path | None = None,
) -> dict[str, Any]:
    """The three-way agreement on the tiny model (llama.cpp started on its GGUF and stopped
    again), optionally with the negative controls; a JSON-ready dict. `records`: a JSONL file
    to append one "agreement" record per pair to."""
    if n_tokens < 1:
        raise UserError(f"--tokens must be at least 1, got {n_tokens}")
    if strategy not in PLACEMENT_STRATEGIES:
        raise UserError(f"unknown placement strategy {strategy!r}: choose one of {', '.join(PLACEMENT_STRATEGIES)}")
    model = tiny.ensure(seed)
    h, tok = open_hybrid(model.hf_dir)
    ids = chat_prompt_ids(tok, prompt)
    if llamacpp:
        # One llama.cpp thread: kt-kernel's pool and torch share the rest of a small machine.
        with srv.Server(srv.llamacpp_launch(model.gguf_path, model.served_model_name, threads=1)) as running:
            report = agreement(h, ids, n_tokens, strategy=strategy, llamacpp_base_url=running.base_url,
                               prompt_text=prompt, tokenizer=tok)
    else:
        report = agreement(h, ids, n_tokens, strategy=strategy, prompt_text=prompt, tokenizer=tok)
    out = report.to_dict()
    if controls:
        out["negative_controls"] = [c.row() for c in negative_controls(h, ids, n_tokens)]
        out["ok"] = out["ok"] and not any(c["ok"] for c in out["negative_controls"])
    if records is not None:
        for rec in agreement_records(out, model=model.served_model_name):
            results.append_record(records, rec)
        out["records"] = str(records)
    return out


def run_routing(out_dir: str | Path, seed: int = 0, reply_tokens: int = 16) -> dict[str, Any]:
    """Routing statistics of the tiny model: writes routing.png, routing.jsonl (records of kind
    "routing") and routing.json (the study) under out_dir; returns the study plus their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = tiny.ensure(seed)
    h, tok = open_hybrid(model.hf_dir)
    study = routing_study(h, tok, reply_tokens=reply_tokens)
    png = plot_routing(study, out_dir / "routing.png")
    jsonl = out_dir / "routing.jsonl"
    for rec in routing_records(study, model=model.served_model_name):
        results.append_record(jsonl, rec)
    (out_dir / "routing.json").write_text(json.dumps(study.to_dict(), indent=1))
    return {**study.to_dict(), "chart": str(png), "records": str(jsonl)}
