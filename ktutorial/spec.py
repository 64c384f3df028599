"""ModelSpec: the shape of a MiniMax-M2-family model, read from its config.json, and the sizes
that follow from it (expert bytes, KV bytes a token, what one decoded token reads).

Sizes are in bytes (`*_bytes`); `GB` in this project means 10**9 bytes, as disk and model
cards count them. Nothing here imports torch: a plan can be made on any machine.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from safetensors import safe_open

GB = 10**9

# The fields a MiniMax-M2 config must carry for the arithmetic below.
REQUIRED_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_local_experts",
    "num_experts_per_tok",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)

# The one architecture the arithmetic below describes (MiniMax-M2, M2.1, M2.5 share it): every
# layer a 256-expert MoE with no shared expert, w1/w2/w3 experts, GQA attention with QK norm.
SUPPORTED_MODEL_TYPE = "minimax_m2"
SUPPORTED_ARCHITECTURE = "MiniMaxM2ForCausalLM"

FP8_BYTES = 1
BF16_BYTES = 2
SCALE_BYTES = 4  # weight_scale_inv is float32, one per [block x block] tile


class SpecError(ValueError):
    """A config.json that does not describe a MiniMax-M2-family model."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    hidden_size: int
    expert_intermediate_size: int
    num_layers: int
    num_experts: int
    experts_per_token: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rotary_dim: int
    tie_word_embeddings: bool = False
    # None when the checkpoint is not block-FP8 (then experts are counted in bf16).
    fp8_block: tuple[int, int] | None = (128, 128)
    max_position_embeddings: int = 0
    # quantization_config.modules_to_not_convert: substrings of module names kept unquantized
    # (SGLang and transformers match them as substrings).
    modules_to_not_convert: tuple[str, ...] = ("gate", "e_score_correction_bias", "lm_head")

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "model") -> "ModelSpec":
        check_architecture(config, name)
        missing = [f for f in REQUIRED_FIELDS if f not in config]
        if missing:
            raise SpecError(
                f"config.json of {name!r} lacks field(s) {', '.join(missing)}: "
                "is it the config.json of a MiniMax-M2-family model (model_type minimax_m2)?"
            )
        for f in REQUIRED_FIELDS[1:]:
            v = config[f]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SpecError(f"config.json field {f!r} must be a positive integer, got {v!r}")
        qc = config.get("quantization_config") or {}
        block = None
        if qc.get("quant_method") == "fp8":
            b = qc.get("weight_block_size")
            if not b or len(b) != 2:
                raise SpecError("quantization_config.weight_block_size must be [rows, cols] for fp8")
            block = (int(b[0]), int(b[1]))
        head_dim = int(config["head_dim"])
        return cls(
            name=name,
            model_type=str(config["model_type"]),
            hidden_size=config["hidden_size"],
            expert_intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_experts=config["num_local_experts"],
            experts_per_token=config["num_experts_per_tok"],
            num_attention_heads=config["num_attention_heads"],
            num_kv_heads=config["num_key_value_heads"],
            head_dim=head_dim,
            vocab_size=config["vocab_size"],
            rotary_dim=int(config.get("rotary_dim", head_dim)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            fp8_block=block,
            max_position_embeddings=int(config.get("max_position_embeddings", 0)),
            modules_to_not_convert=tuple(qc.get("modules_to_not_convert") or ()),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path, name: str | None = None) -> "ModelSpec":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise SpecError(
                f"{path} not found: point --model-dir at the folder holding the checkpoint's "
                "config.json (ktutorial download fetches it)"
            )
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SpecError(f"{path} is not valid JSON ({exc}); download it again") from exc
        return cls.from_config(config, name=name or Path(model_dir).name)

    @classmethod
    def known(cls, name: str) -> "ModelSpec":
        """The spec of a model that ships with the package (no download needed)."""
        return cls.from_config(known_model(name)["config"], name=name)

    # --- derived sizes --------------------------------------------------------------------

    @property
    def is_fp8(self) -> bool:
        return self.fp8_block is not None

    def is_quantized(self, module: str) -> bool:
        """Whether the config says linear `module` (e.g. "model.layers.0.self_attn.q_proj") is FP8."""
        return self.is_fp8 and not any(skip in module for skip in self.modules_to_not_convert)

    def _linear_bytes(self, rows: int, cols: int, module: str = "experts") -> int:
        """Bytes of one [rows, cols] linear weight as the checkpoint stores it."""
        if not self.is_quantized(module):
            return rows * cols * BF16_BYTES
        br, bc = self.fp8_block
        scales = -(-rows // br) * -(-cols // bc)
        return rows * cols * FP8_BYTES + scales * SCALE_BYTES

    @property
    def expert_bytes(self) -> int:
        """One expert: w1 (gate) and w3 (up) [I, H], w2 (down) [H, I], with their scales."""
        h, i = self.hidden_size, self.expert_intermediate_size
        return 2 * self._linear_bytes(i, h) + self._linear_bytes(h, i)

    @property
    def layer_expert_bytes(self) -> int:
        return self.num_experts * self.expert_bytes

    @property
    def all_expert_bytes(self) -> int:
        return self.num_layers * self.layer_expert_bytes

    @property
    def decode_expert_bytes_per_token(self) -> int:
        """Expert weights one decoded token reads: top-k experts in every layer."""
        return self.num_layers * self.experts_per_token * self.expert_bytes

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        return h * self.q_width + 2 * h * self.kv_width + self.q_width * h

    @property
    def attention_bytes_per_layer(self) -> int:
        """q/k/v/o projections (FP8 in M2.1's checkpoint) plus norms and the router (bf16/fp32)."""
        h = self.hidden_size
        attn = "model.layers.0.self_attn.q_proj"
        proj = (
            self._linear_bytes(self.q_width, h, attn)
            + 2 * self._linear_bytes(self.kv_width, h, attn)
            + self._linear_bytes(h, self.q_width, attn)
        )
        norms = (2 * h + self.q_width + self.kv_width) * BF16_BYTES
        router = h * self.num_experts * BF16_BYTES + self.num_experts * SCALE_BYTES
        return proj + norms + router

    @property
    def embedding_params(self) -> int:
        n = self.vocab_size * self.hidden_size
        return n if self.tie_word_embeddings else 2 * n

    @property
    def embedding_bytes(self) -> int:
        """Embedding and lm_head, which stay bf16 (unquantized) in the checkpoint."""
        return self.embedding_params * BF16_BYTES + self.hidden_size * BF16_BYTES

    @property
    def dense_bytes(self) -> int:
        """Everything that is not an expert: what must sit on the GPU whatever the split."""
        return self.num_layers * self.attention_bytes_per_layer + self.embedding_bytes

    def kv_bytes_per_token(self, dtype: str = "bf16") -> int:
        """KV cache a token takes in every layer: K and V, each kv_heads x head_dim."""
        per_elem = {"bf16": 2, "fp16": 2, "auto": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
        if dtype not in per_elem:
            raise SpecError(f"unknown KV cache dtype {dtype!r}; use one of {sorted(per_elem)}")
        return self.num_layers * self.kv_width * 2 * per_elem[dtype]

    @property
    def checkpoint_bytes(self) -> int:
        return self.all_expert_bytes + self.dense_bytes

    @property
    def total_params(self) -> int:
        h, i = self.hidden_size, self.expert_intermediate_size
        experts = self.num_layers * self.num_experts * 3 * h * i
        return experts + self.num_layers * self.attention_params_per_layer + self.embedding_params

    @property
    def active_params(self) -> int:
        h, i = self.hidden_size, self.expert_intermediate_size
        experts = self.num_layers * self.experts_per_token * 3 * h * i
        return experts + self.num_layers * self.attention_params_per_layer + self.embedding_params

    def summary(self) -> dict[str, Any]:
        """The derived sizes, named with their units, for tables and records."""
        return {
            "name": self.name,
            "layers": self.num_layers,
            "experts_per_layer": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "total_params_b": round(self.total_params / 1e9, 2),
            "active_params_b": round(self.active_params / 1e9, 2),
            "expert_mb": round(self.expert_bytes / 1e6, 2),
            "layer_experts_gb": round(self.layer_expert_bytes / GB, 3),
            "all_experts_gb": round(self.all_expert_bytes / GB, 1),
            "dense_gb": round(self.dense_bytes / GB, 2),
            "checkpoint_gb": round(self.checkpoint_bytes / GB, 1),
            "kv_bytes_per_token_bf16": self.kv_bytes_per_token("bf16"),
            "kv_bytes_per_token_fp8": self.kv_bytes_per_token("fp8"),
            "decode_expert_gb_per_token": round(self.decode_expert_bytes_per_token / GB, 2),
        }


def check_architecture(config: dict[str, Any], name: str = "model") -> None:
    """SpecError unless `config` is a MiniMax-M2-architecture config.json. Runs before the field
    check, so another family's config (whose fields differ) is named as such, not as a missing field."""
    if not isinstance(config, dict):
        raise SpecError(f"config.json of {name!r} is not a JSON object")
    model_type = config.get("model_type")
    archs = config.get("architectures")
    archs = [archs] if isinstance(archs, str) else list(archs or [])
    if model_type is None and not archs:
        raise SpecError(f"config.json of {name!r} lacks field model_type (and architectures): ktutorial plans "
                        f"model_type {SUPPORTED_MODEL_TYPE!r} ({SUPPORTED_ARCHITECTURE}) only")
    wrong_type = model_type is not None and model_type != SUPPORTED_MODEL_TYPE
    wrong_arch = bool(archs) and SUPPORTED_ARCHITECTURE not in archs
    if wrong_type or wrong_arch:
        found = ", ".join(p for p in (f"model_type {model_type!r}" if model_type is not None else "",
                                      f"architectures {archs}" if archs else "") if p)
        raise SpecError(
            f"config.json of {name!r} is {found}: ktutorial plans the MiniMax-M2 architecture only "
            f"(model_type {SUPPORTED_MODEL_TYPE!r}, architectures [{SUPPORTED_ARCHITECTURE!r}]: MiniMax-M2, "
            "M2.1, M2.5 and their fine-tunes); its expert, attention and KV arithmetic does not describe other models")


def unknown_model_message(name: str, names: list[str], also: str = "") -> str:
    """'unknown model X (did you mean Y?); known models: ...': close spellings named first."""
    close = difflib.get_close_matches(name.lower(), names, n=2, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"unknown model {name!r}{hint}; known models: {', '.join(names)}{also}"


def known_models() -> list[str]:
    root = resources.files("ktutorial") / "data" / "models"
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def known_model(name: str) -> dict[str, Any]:
    """config.json and model.json of a model that ships with the package."""
    names = known_models()
    if name not in names:
        raise SpecError(unknown_model_message(name, names))
    root = resources.files("ktutorial") / "data" / "models" / name
    return {
        "config": json.loads((root / "config.json").read_text()),
        **json.loads((root / "model.json").read_text()),
    }


# Parameters that are not linear layers (no quantization applies to them whatever the config says).
_NOT_LINEAR = ("embed_tokens", "norm", "e_score_correction_bias")


def quantization_mismatches(model_dir: str | Path) -> list[str]:
    """Every linear weight of a checkpoint folder against its config.json: FP8 with a
    `weight_scale_inv` exactly where the config says so, unquantized without one elsewhere.
    Returns the mismatches in words (empty: the config tells the truth). Reads headers only."""
    spec = ModelSpec.from_dir(model_dir)
    index = json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())["weight_map"]
    dtypes: dict[str, str] = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(Path(model_dir) / shard), framework="numpy") as f:
            for key in f.keys():
                dtypes[key] = f.get_slice(key).get_dtype()
    problems = []
    for key, dtype in sorted(dtypes.items()):
        if not key.endswith(".weight") or any(part in key for part in _NOT_LINEAR):
            continue
        module = key[: -len(".weight")]
        has_scale = key + "_scale_inv" in dtypes
        fp8 = dtype.startswith("F8")
        if spec.is_quantized(module) and not (fp8 and has_scale):
            problems.append(f"{key}: the config says FP8, the tensor is {dtype}"
                            f"{'' if has_scale else ' with no weight_scale_inv'}")
        elif not spec.is_quantized(module) and (fp8 or has_scale):
            problems.append(f"{key}: the config says unquantized, the tensor is {dtype}"
                            f"{' with a weight_scale_inv' if has_scale else ''}")
    return problems
