"""Generate a synthetic MiniMax-M2.1 checkpoint: the real layer shape at full width, fewer layers, random FP8 weights.

Why: the real checkpoint is 230 GB and takes hours to fetch; a benchmark of the KT split (GPU
attention, CPU experts) only needs the real *shape*. `generate(out, layers=N)` writes, on the
machine that serves it, a folder that SGLang-KT, kt-kernel and transformers read exactly like
MiniMax-M2.1, but with `num_hidden_layers` = N:

- config.json: the shipped minimax-m2.1 config (hidden 3072, 256 experts of 1536, top 8,
  48 query / 8 KV heads of 128, rotary 64, per-layer QK norm, vocab 200064, sigmoid router with
  `e_score_correction_bias`, the real fp8 `quantization_config` with its `modules_to_not_convert`)
  with N layers, plus a `ktutorial_synth` key (seed, routing, format) that records can name.
- Tensors under the real names and dtypes: FP8 e4m3 with 128x128-block float32
  `weight_scale_inv` for the experts' w1/w3/w2 and attention q/k/v/o projections; the router
  gate and `e_score_correction_bias` float32; embeddings, lm_head and norms bf16.
- Shards of about 2 GB plus `model.safetensors.index.json`; the tiny model's byte-level BPE
  tokenizer and chat template (4298 tokens: the embedding's 200064 rows are more than it uses).

FP8 bytes are made directly, not by quantizing floats: a random byte b becomes the e4m3 code
`(b & 0x9F) + 0x38`, i.e. sign, mantissa and one of four exponents: values +-[1, 15], never NaN
(0x7F/0xFF), log-uniform in magnitude (kurtosis 2.8, lighter-tailed than a Gaussian). Each
128x128 block's scale is `base * exp(U(-0.35, 0.35))`, with base chosen so the dequantized
weights have std 0.02: varied scales make a scale-layout bug visible in kt-kernel's output.

Routing (`routing=`): "random" draws the gate N(0, 0.02) and a near-zero bias, so every expert
gets about 1/256 of the activations; "skewed" adds a Zipf bias 2/(rank+1) over a random expert
order per layer, so the 8 hottest experts of a layer take about 55% of the activations and the
32 hottest about 75% (for unit-RMS router inputs). The bias steers the choice only, as in the
real model: the routing weights stay the normalized sigmoid scores.

Deterministic: every tensor (every row chunk of a large one) has its own random stream keyed
on (seed, tensor name), so the same seed gives the same bytes whatever the thread count, and
layer L of a 2-layer and an 8-layer checkpoint are identical. Threads generate one shard while
another thread writes the previous one: peak memory is about two shards.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ktutorial import tiny
from ktutorial.errors import UserError
from ktutorial.spec import GB, ModelSpec, known_model

BASE_MODEL = "minimax-m2.1"
# Bump when the bytes generate() writes for a seed change; recorded in config.json.
FORMAT_VERSION = 1
ROUTINGS = ("random", "skewed")

FP8_BLOCK = 128  # the real checkpoint's weight_block_size
WEIGHT_STD = 0.02  # every random weight matrix, dequantized
ROUTER_STD = 0.02  # router logits ~ N(0, 1.1) for unit-RMS inputs
RANDOM_BIAS_STD = 1e-3  # "random": a bias too small to steer the choice
SKEW_BIAS = 2.0  # "skewed": bias = SKEW_BIAS / (rank + 1) ** SKEW_EXPONENT
SKEW_EXPONENT = 1.0
SCALE_SPREAD = 0.35  # block scales vary by exp(U(-s, s)) around their base
SHARD_BYTES = 2 * GB  # shards are filled up to this, a tensor never split
CHUNK_BYTES = 1 << 25  # large tensors are drawn in row chunks of about 32 MB (one stream each)
MARGIN_BYTES = 64 * 10**6  # tokenizer, json and headers, with room to spare

# The e4m3 code of random byte b: keep sign (0x80), two exponent bits (0x18) and the mantissa
# (0x07), then add exponent 7 (0x38): exponents 7..10, values +-2**0 .. +-2**3 * 1.875.
FP8_KEEP_MASK = 0x9F
FP8_EXPONENT_OFFSET = 0x38

# Files generate() writes; --force deletes these (and only these) before writing again.
_OWN_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
# Config fields the tests may shrink (never a width: blocks and kt-kernel shapes stay real).
_SHRINKABLE = ("num_local_experts", "vocab_size")


@dataclass(frozen=True)
class SynthModel:
    """A generated checkpoint folder and what it is."""

    path: Path
    spec: ModelSpec
    layers: int
    seed: int
    routing: str
    total_bytes: int  # tensor bytes, as model.safetensors.index.json counts them
    seconds: float  # wall time of generate()
    shards: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.total_bytes / GB / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "name": self.spec.name,
            "layers": self.layers,
            "seed": self.seed,
            "routing": self.routing,
            "shards": self.shards,
            "total_gb": round(self.total_bytes / GB, 2),
            "seconds": round(self.seconds, 1),
            "gb_per_s": round(self.gb_per_s, 2),
        }


@dataclass(frozen=True)
class _Entry:
    """One tensor to write. kind: fp8 (weight + its weight_scale_inv), bf16 (random), ones
    (bf16 norm), router (float32 gate), bias (float32 e_score_correction_bias)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    layer: Optional[int] = None

    @property
    def scale_shape(self) -> tuple[int, int]:
        n, k = self.shape
        return (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape)
        if self.kind == "fp8":
            return n + 4 * math.prod(self.scale_shape)
        return n * (4 if self.kind in ("router", "bias") else 2)


# --- the config -------------------------------------------------------------------------------


def config_dict(layers: int, seed: int = 0, routing: str = "random", shrink: Optional[dict] = None) -> dict:
    """The shipped MiniMax-M2.1 config.json with `layers` layers and the ktutorial_synth record."""
    cfg = dict(known_model(BASE_MODEL)["config"])
    cfg["num_hidden_layers"] = layers
    cfg["attn_type_list"] = [1] * layers
    vocab = tiny.build_vocab()
    cfg["bos_token_id"] = vocab.control[tiny.BOS]
    cfg["eos_token_id"] = vocab.control[tiny.EOS]
    for key, value in (shrink or {}).items():
        if key not in _SHRINKABLE:
            raise ValueError(f"only {_SHRINKABLE} may be shrunk, not {key!r}")
        cfg[key] = int(value)
    cfg["ktutorial_synth"] = {
        "generator": "ktutorial.synth",
        "format_version": FORMAT_VERSION,
        "base_model": BASE_MODEL,
        "seed": seed,
        "routing": routing,
        "layers": layers,
        "weight_std": WEIGHT_STD,
        "router_std": ROUTER_STD,
        "skew_bias": [SKEW_BIAS, SKEW_EXPONENT] if routing == "skewed" else None,
        "tokenizer_vocab": vocab.size,  # real tokens; the rest of vocab_size are placeholders
        "note": "random weights at MiniMax-M2.1's shape: for speed and memory measurements, not for text",
        **({"shrunk": dict(shrink)} if shrink else {}),
    }
    return cfg


def _plan(cfg: dict) -> list[_Entry]:
    """Every tensor, in the order written: embeddings, layer by layer, final norm, lm_head."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    e, v = cfg["num_local_experts"], cfg["vocab_size"]
    qd = cfg["num_attention_heads"] * cfg["head_dim"]
    kd = cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [_Entry("model.embed_tokens.weight", "bf16", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            _Entry(p + "input_layernorm.weight", "ones", (h,), layer),
            _Entry(p + "self_attn.q_proj.weight", "fp8", (qd, h), layer),
            _Entry(p + "self_attn.k_proj.weight", "fp8", (kd, h), layer),
            _Entry(p + "self_attn.v_proj.weight", "fp8", (kd, h), layer),
            _Entry(p + "self_attn.o_proj.weight", "fp8", (h, qd), layer),
            _Entry(p + "self_attn.q_norm.weight", "ones", (qd,), layer),  # per-layer QK norm: full width
            _Entry(p + "self_attn.k_norm.weight", "ones", (kd,), layer),
            _Entry(p + "post_attention_layernorm.weight", "ones", (h,), layer),
            _Entry(p + "block_sparse_moe.gate.weight", "router", (e, h), layer),
            _Entry(p + "block_sparse_moe.e_score_correction_bias", "bias", (e,), layer),
        ]
        for x in range(e):
            q = p + f"block_sparse_moe.experts.{x}."
            out += [
                _Entry(q + "w1.weight", "fp8", (i, h), layer),  # gate
                _Entry(q + "w2.weight", "fp8", (h, i), layer),  # down
                _Entry(q + "w3.weight", "fp8", (i, h), layer),  # up
            ]
    out += [_Entry("model.norm.weight", "ones", (h,)), _Entry("lm_head.weight", "bf16", (v, h))]
    return out


def _shards(entries: list[_Entry]) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for en in entries:
        if shards[-1] and size + en.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(en)
        size += en.nbytes
    return shards


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


# --- random bytes ---------------------------------------------------------------------------


def _name_key(name: str) -> list[int]:
    return list(np.frombuffer(hashlib.sha256(name.encode()).digest()[:16], dtype="<u4").tolist())


def _stream(seed: int, name: str, purpose: int, chunk: int = 0) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, purpose, chunk, *_name_key(name)])


def fp8_codes_from_bytes(b: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Random bytes -> finite e4m3 codes (see the module docstring); in place when out is b."""
    out = np.bitwise_and(b, FP8_KEEP_MASK, out=out)
    return np.add(out, FP8_EXPONENT_OFFSET, out=out)


def _code_values() -> np.ndarray:
    """The float value of the code each of the 256 bytes becomes (equally likely)."""
    import torch

    codes = fp8_codes_from_bytes(np.arange(256, dtype=np.uint8))
    return torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()


@functools.cache
def code_std() -> float:
    """RMS of the code values (computed once, when a checkpoint is first written: it needs torch)."""
    return float(np.sqrt(np.mean(_code_values().astype(np.float64) ** 2)))


# E[exp(2u)] for u ~ U(-s, s): the block scales' spread adds this to the variance.
_SPREAD_GAIN = math.sqrt(math.sinh(2 * SCALE_SPREAD) / (2 * SCALE_SPREAD))


def scale_base() -> float:
    return WEIGHT_STD / (code_std() * _SPREAD_GAIN)


def _fill_codes(dst: np.ndarray, seed: int, name: str) -> list:
    """Tasks that fill dst ([rows, cols] uint8) with codes, one random stream per row chunk."""
    rows, cols = dst.shape
    chunk_rows = max(1, CHUNK_BYTES // cols)

    def task(c: int) -> None:
        r0, r1 = c * chunk_rows, min(rows, (c + 1) * chunk_rows)
        n = (r1 - r0) * cols
        raw = np.random.PCG64(_stream(seed, name, 0, c)).random_raw(-(-n // 8)).view(np.uint8)[:n]
        fp8_codes_from_bytes(raw.reshape(r1 - r0, cols), out=dst[r0:r1])

    return [lambda c=c: task(c) for c in range(-(-rows // chunk_rows))]


def _block_scales(seed: int, name: str, shape: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(_stream(seed, name, 1))
    u = rng.uniform(-SCALE_SPREAD, SCALE_SPREAD, shape)
    return (scale_base() * np.exp(u)).astype(np.float32)


def _router_bias(seed: int, name: str, experts: int, routing: str) -> np.ndarray:
    rng = np.random.default_rng(_stream(seed, name, 3))
    if routing == "skewed":
        bias = np.empty(experts, np.float64)
        bias[rng.permutation(experts)] = SKEW_BIAS / (np.arange(experts) + 1.0) ** SKEW_EXPONENT
        return bias.astype(np.float32)
    return (rng.standard_normal(experts) * RANDOM_BIAS_STD).astype(np.float32)


def _materialize(shard: list[_Entry], seed: int, routing: str, pool: ThreadPoolExecutor) -> dict:
    """The shard's tensors (torch, as written), generated by the pool's threads."""
    import torch

    out: dict[str, torch.Tensor] = {}
    tasks: list = []
    post: list = []  # bf16 conversions, after the codes are drawn
    for en in shard:
        if en.kind == "fp8":
            codes = np.empty(en.shape, np.uint8)
            tasks += _fill_codes(codes, seed, en.name)
            out[en.name] = torch.from_numpy(codes).view(torch.float8_e4m3fn)
            out[en.name + "_scale_inv"] = torch.from_numpy(_block_scales(seed, en.name, en.scale_shape))
        elif en.kind == "bf16":
            codes = np.empty(en.shape, np.uint8)
            tasks += _fill_codes(codes, seed, en.name)
            post.append((en.name, codes))
        elif en.kind == "ones":
            out[en.name] = torch.ones(en.shape, dtype=torch.bfloat16)
        elif en.kind == "router":
            rng = np.random.default_rng(_stream(seed, en.name, 2))
            out[en.name] = torch.from_numpy(rng.standard_normal(en.shape, dtype=np.float32) * np.float32(ROUTER_STD))
        elif en.kind == "bias":
            out[en.name] = torch.from_numpy(_router_bias(seed, en.name, en.shape[0], routing))
        else:  # pragma: no cover - _plan makes only the kinds above
            raise AssertionError(en.kind)
    list(pool.map(lambda t: t(), tasks))
    for name, codes in post:
        # bf16 = code value x one scale: std WEIGHT_STD without per-block spread.
        scale = WEIGHT_STD / code_std()
        t = torch.empty(codes.shape, dtype=torch.bfloat16)
        rows = max(1, CHUNK_BYTES // codes.shape[1])

        def convert(r0: int, codes=codes, t=t, rows=rows, scale=scale) -> None:
            src = torch.from_numpy(codes[r0:r0 + rows]).view(torch.float8_e4m3fn)
            t[r0:r0 + rows] = src.to(torch.bfloat16).mul_(scale)

        list(pool.map(convert, range(0, codes.shape[0], rows)))
        out[name] = t
    return {en_name: out[en_name] for en_name in _ordered_names(shard)}


def _ordered_names(shard: list[_Entry]) -> list[str]:
    names = []
    for en in shard:
        names.append(en.name)
        if en.kind == "fp8":
            names.append(en.name + "_scale_inv")
    return names


# --- the folder -----------------------------------------------------------------------------


def _existing_parent(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def _own_files(out: Path) -> list[Path]:
    found = [out / f for f in _OWN_FILES if (out / f).is_file()]
    return found + sorted(out.glob("*.safetensors")) + sorted(out.glob(".*.safetensors.partial"))


def _write_json(path: Path, obj) -> None:
    tiny._write_json(path, obj)


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    """The tiny model's tokenizer: byte-level BPE, MiniMax's markers, its chat template; padded
    with placeholder tokens up to the embedding's rows, so every id a random model samples
    decodes (an id the tokenizer lacks would decode to nothing, or fail in a detokenizer)."""
    vocab = tiny.build_vocab()
    tok = tiny._tokenizer_json(vocab)
    # The added tokens (markers) go into the model's vocabulary at their own ids too: the
    # tokenizers library otherwise renumbers them past the largest id the vocabulary holds.
    tok["model"]["vocab"].update({t["content"]: t["id"] for t in tok["added_tokens"]})
    for i in range(vocab.size, vocab_size):
        tok["model"]["vocab"][f"<|synth_{i}|>"] = i
    _write_json(out / "tokenizer.json", tok)
    _write_json(out / "tokenizer_config.json", tiny._tokenizer_config(vocab))
    _write_json(out / "special_tokens_map.json", {"bos_token": tiny.BOS, "eos_token": tiny.EOS})
    (out / "chat_template.jinja").write_text(tiny.CHAT_TEMPLATE, encoding="utf-8")
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": vocab.control[tiny.BOS], "eos_token_id": vocab.control[tiny.EOS], "do_sample": True,
         "temperature": 1.0, "top_p": 0.95, "top_k": 40},
    )


def needed_bytes(layers: int, shrink: Optional[dict] = None) -> int:
    """Disk the checkpoint takes: its tensors plus a margin for headers, tokenizer and json."""
    return sum(en.nbytes for en in _plan(config_dict(layers, shrink=shrink))) + MARGIN_BYTES


def generate(
    out_dir: str | Path,
    layers: int,
    seed: int = 0,
    routing: str = "random",
    force: bool = False,
    *,
    threads: Optional[int] = None,
    _shrink: Optional[dict] = None,
) -> SynthModel:
    """Write a MiniMax-M2.1-shaped checkpoint with `layers` layers of random FP8 weights.

    Refuses a non-empty out_dir unless force (then deletes only the files it writes), and a
    disk without room. `threads` defaults to every CPU this process may use. `_shrink` (tests
    only) lowers num_local_experts and/or vocab_size; widths always stay MiniMax-M2.1's."""
    t0 = time.perf_counter()
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise UserError(f"layers must be a whole number >= 1 (MiniMax-M2.1 has 62), got {layers!r}")
    if routing not in ROUTINGS:
        raise UserError(f"unknown routing {routing!r}: choose one of {', '.join(ROUTINGS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give --out a folder path")
    stale: list[Path] = []
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out} is not empty: choose an empty folder or pass --force to overwrite it")
        stale = _own_files(out)
    cfg = config_dict(layers, seed=seed, routing=routing, shrink=_shrink)
    entries = _plan(cfg)
    need = sum(en.nbytes for en in entries) + MARGIN_BYTES
    where = _existing_parent(out)
    free = shutil.disk_usage(where).free + sum(p.stat().st_size for p in stale)
    if free < need:
        per_layer = sum(en.nbytes for en in entries if en.layer == 0)
        raise UserError(
            f"{layers} layers need {need / GB:.1f} GB of disk, but {where} has {free / GB:.1f} GB free: "
            f"free some space, choose --out on another disk, or pass fewer --layers "
            f"(each layer is {per_layer / GB:.2f} GB)"
        )
    for p in stale:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    _write_json(out / "config.json", cfg)
    _write_tokenizer(out, cfg["vocab_size"])
    shards = _shards(entries)
    total, weight_map = _write_shards(out, shards, seed, routing, threads)
    _write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    name = f"{BASE_MODEL}-synth-{layers}l-{routing}-s{seed}"
    return SynthModel(
        path=out,
        spec=ModelSpec.from_dir(out, name=name),
        layers=layers,
        seed=seed,
        routing=routing,
        total_bytes=total,
        seconds=time.perf_counter() - t0,
        shards=len(shards),
    )


def _write_shards(out: Path, shards: list[list[_Entry]], seed: int, routing: str, threads: Optional[int]):
    """Generate shard k+1 while a writer thread saves shard k; each file appears only when whole."""
    import torch
    from safetensors.torch import save_file

    workers = threads or len(os.sched_getaffinity(0))
    umask = os.umask(0o022)
    os.umask(umask)
    file_mode = 0o666 & ~umask
    weight_map: dict[str, str] = {}
    total = 0

    def save(tensors: dict, fname: str) -> None:
        partial = out / f".{fname}.partial"
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.chmod(partial, file_mode)  # safetensors creates 0600; give the usual umask'd mode
        os.replace(partial, out / fname)

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # our threads split the work; torch's own pool would oversubscribe
    try:
        with ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1) as writer:
            pending = None
            for k, shard in enumerate(shards):
                tensors = _materialize(shard, seed, routing, pool)
                fname = shard_name(k, len(shards))
                for tname, t in tensors.items():
                    weight_map[tname] = fname
                    total += t.numel() * t.element_size()
                if pending is not None:
                    pending.result()
                pending = writer.submit(save, tensors, fname)
                del tensors
            if pending is not None:
                pending.result()
    finally:
        torch.set_num_threads(torch_threads)
    return total, weight_map
