"""The synthetic MiniMax-M2.1 checkpoint: names, shapes, dtypes and scales as the real one,
read by ModelSpec, transformers and kt-kernel; deterministic; refuses what it should."""

from __future__ import annotations

import json
import math
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402

from ktutorial import synth  # noqa: E402
from ktutorial.errors import UserError  # noqa: E402
from ktutorial.fp8 import dequantize_block  # noqa: E402
from ktutorial.spec import ModelSpec, known_model  # noqa: E402

REAL = known_model("minimax-m2.1")["config"]
# Reduced variant (same code, tests only): 16 experts and the tokenizer's vocabulary, widths real.
SMALL = {"num_local_experts": 16, "vocab_size": 4298}


@pytest.fixture(autouse=True)
def _delete_what_we_wrote(request):
    """Checkpoints are hundreds of MB: remove each test's tmp_path at once, not at pytest's leisure."""
    yield
    path = request.node.funcargs.get("tmp_path")
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def full1(tmp_path_factory):
    """Full width, one layer: 6.1 GB, about 20 s on a 2-core machine."""
    out = tmp_path_factory.mktemp("synth-full1")
    model = synth.generate(out, layers=1, seed=0)
    yield model
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def small2(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth-small2")
    model = synth.generate(out, layers=2, seed=3, routing="skewed", _shrink=SMALL)
    yield model
    shutil.rmtree(out, ignore_errors=True)


Header = namedtuple("Header", "dtype shape file")


def headers(path: Path) -> dict[str, Header]:
    """Every tensor's dtype and shape from the safetensors headers (no data read)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                s = h.get_slice(key)
                out[key] = Header(s.get_dtype(), tuple(s.get_shape()), f.name)
    return out


def expected_tensors(cfg: dict) -> dict[str, tuple[str, tuple]]:
    """name -> (safetensors dtype, shape), written out from the config (independent of synth)."""
    h, i, e, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], cfg["vocab_size"]
    qd = cfg["num_attention_heads"] * cfg["head_dim"]
    kd = cfg["num_key_value_heads"] * cfg["head_dim"]
    exp = {
        "model.embed_tokens.weight": ("BF16", (v, h)),
        "model.norm.weight": ("BF16", (h,)),
        "lm_head.weight": ("BF16", (v, h)),
    }

    def fp8(name, n, k):
        exp[name + ".weight"] = ("F8_E4M3", (n, k))
        exp[name + ".weight_scale_inv"] = ("F32", (math.ceil(n / 128), math.ceil(k / 128)))

    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        exp[p + "input_layernorm.weight"] = ("BF16", (h,))
        exp[p + "post_attention_layernorm.weight"] = ("BF16", (h,))
        exp[p + "self_attn.q_norm.weight"] = ("BF16", (qd,))
        exp[p + "self_attn.k_norm.weight"] = ("BF16", (kd,))
        fp8(p + "self_attn.q_proj", qd, h)
        fp8(p + "self_attn.k_proj", kd, h)
        fp8(p + "self_attn.v_proj", kd, h)
        fp8(p + "self_attn.o_proj", h, qd)
        exp[p + "block_sparse_moe.gate.weight"] = ("F32", (e, h))
        exp[p + "block_sparse_moe.e_score_correction_bias"] = ("F32", (e,))
        for x in range(e):
            fp8(p + f"block_sparse_moe.experts.{x}.w1", i, h)
            fp8(p + f"block_sparse_moe.experts.{x}.w3", i, h)
            fp8(p + f"block_sparse_moe.experts.{x}.w2", h, i)
    return exp


def read(model, name: str) -> torch.Tensor:
    index = json.loads((model.path / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(model.path / index[name]), framework="pt") as h:
        return h.get_tensor(name)


def dequantized(model, name: str) -> torch.Tensor:
    return dequantize_block(read(model, name + ".weight"), read(model, name + ".weight_scale_inv"))


# --- full width, one layer ---------------------------------------------------------------------


def test_config_is_the_real_one_with_n_layers(full1):
    cfg = json.loads((full1.path / "config.json").read_text())
    for key, value in REAL.items():
        if key not in ("num_hidden_layers", "attn_type_list"):
            assert cfg[key] == value, key
    assert cfg["num_hidden_layers"] == 1 and cfg["attn_type_list"] == [1]
    assert cfg["quantization_config"] == REAL["quantization_config"]
    assert cfg["ktutorial_synth"]["seed"] == 0 and cfg["ktutorial_synth"]["routing"] == "random"


def test_every_tensor_name_shape_and_dtype(full1):
    cfg = json.loads((full1.path / "config.json").read_text())
    got = headers(full1.path)
    want = expected_tensors(cfg)
    assert set(got) == set(want)
    for name, (dtype, shape) in want.items():
        assert (got[name].dtype, got[name].shape) == (dtype, shape), name
    index = json.loads((full1.path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: h.file for k, h in got.items()}
    sizes = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    total = sum(math.prod(h.shape) * sizes[h.dtype] for h in got.values())
    assert index["metadata"]["total_size"] == total == full1.total_bytes
    # Shards of a few GB: none above the target, and more than one.
    files = sorted(full1.path.glob("*.safetensors"))
    assert len(files) == full1.shards > 1
    assert max(f.stat().st_size for f in files) <= synth.SHARD_BYTES + 10**7


def test_fp8_exactly_where_the_real_checkpoint_has_it(full1):
    """modules_to_not_convert (matched as substrings, as SGLang does) are never FP8; every FP8
    weight has its block scale; experts and attention projections are FP8."""
    got = headers(full1.path)
    skip = REAL["quantization_config"]["modules_to_not_convert"]
    for name, h in got.items():
        if h.dtype == "F8_E4M3":
            assert not any(s in name for s in skip), name
            assert name[: -len("weight")] + "weight_scale_inv" in got, name
        quantizable = ".experts." in name or any(f"self_attn.{p}_proj" in name for p in "qkvo")
        if quantizable and name.endswith(".weight"):
            assert h.dtype == "F8_E4M3", name
    assert got["model.layers.0.block_sparse_moe.gate.weight"].dtype == "F32"


def test_model_spec_reads_the_real_arithmetic(full1):
    spec = ModelSpec.from_dir(full1.path)
    real = ModelSpec.known("minimax-m2.1")
    assert spec.expert_bytes == real.expert_bytes == 14_159_232  # 14.16 MB
    assert spec.summary()["expert_mb"] == 14.16
    assert spec.num_layers == 1 and spec.num_experts == 256 and spec.experts_per_token == 8
    assert spec.fp8_block == (128, 128) and spec.vocab_size == 200064
    assert spec.layer_expert_bytes == real.layer_expert_bytes
    got = headers(full1.path)
    sizes = {"F8_E4M3": 1, "F32": 4}
    on_disk = sum(math.prod(h.shape) * sizes[h.dtype] for n, h in got.items() if ".experts." in n)
    assert on_disk == spec.layer_expert_bytes
    assert full1.spec == ModelSpec.from_dir(full1.path, name=full1.spec.name)


@pytest.mark.parametrize(
    "name", ["model.layers.0.block_sparse_moe.experts.7.w2", "model.layers.0.self_attn.q_proj"]
)
def test_dequantized_weights_are_finite_with_the_intended_std(full1, name):
    raw = read(full1, name + ".weight").view(torch.uint8)
    assert not bool(((raw & 0x7F) == 0x7F).any())  # no NaN codes
    w = dequantized(full1, name)
    assert bool(torch.isfinite(w).all())
    assert abs(float(w.std()) / synth.WEIGHT_STD - 1) < 0.03
    assert abs(float(w.mean())) < 1e-3
    scale = read(full1, name + ".weight_scale_inv")
    assert float(scale.std() / scale.mean()) > 0.1  # varied: a scale-layout bug shows


def test_embedding_std(full1):
    e = read(full1, "model.embed_tokens.weight")[:4096].float()
    assert bool(torch.isfinite(e).all()) and abs(float(e.std()) / synth.WEIGHT_STD - 1) < 0.03


def test_transformers_reads_config_and_tokenizer(full1):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(full1.path), local_files_only=True)
    assert cfg.model_type == "minimax_m2" and type(cfg).__name__ == "MiniMaxM2Config"
    assert cfg.num_hidden_layers == 1 and cfg.num_local_experts == 256 and cfg.hidden_size == 3072
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5
    tok = AutoTokenizer.from_pretrained(str(full1.path), local_files_only=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert 0 < len(ids) and max(ids) < cfg.vocab_size
    assert cfg.eos_token_id == tok.convert_tokens_to_ids("[e~[")


# --- reduced variant (same code, 16 experts, small vocabulary) ---------------------------------


def test_reduced_variant_layout(small2):
    cfg = json.loads((small2.path / "config.json").read_text())
    assert cfg["num_local_experts"] == 16 and cfg["ktutorial_synth"]["shrunk"] == SMALL
    got = headers(small2.path)
    assert {k: (h.dtype, h.shape) for k, h in got.items()} == expected_tensors(cfg)
    with pytest.raises(ValueError):
        synth.config_dict(1, shrink={"hidden_size": 256})


def test_skewed_routing_concentrates_on_a_few_experts(small2, tmp_path):
    """Route unit-RMS inputs through the checkpoint's gate and bias, as the model does."""
    rand = synth.generate(tmp_path / "r", layers=1, seed=3, routing="random", _shrink=SMALL)
    x = torch.randn(4096, 3072, generator=torch.Generator().manual_seed(0))

    def top8_share(model, layer):
        p = f"model.layers.{layer}.block_sparse_moe."
        scores = torch.sigmoid(x @ read(model, p + "gate.weight").T)
        chosen = torch.topk(scores + read(model, p + "e_score_correction_bias"), 8, dim=-1).indices
        counts = torch.bincount(chosen.flatten(), minlength=16).float()
        return counts.sort(descending=True).values[:2].sum() / counts.sum()  # 2 of 16 ~ 8 of 256

    uniform = 2 / 16
    assert float(top8_share(rand, 0)) < uniform * 1.6
    for layer in (0, 1):
        assert float(top8_share(small2, layer)) > uniform * 1.9
    assert json.loads((small2.path / "config.json").read_text())["ktutorial_synth"]["routing"] == "skewed"


def test_skewed_bias_at_full_width_gives_hot_experts():
    bias = torch.from_numpy(synth._router_bias(0, "model.layers.0.block_sparse_moe.e_score_correction_bias", 256, "skewed"))
    gate = torch.randn(256, 3072, generator=torch.Generator().manual_seed(1)) * synth.ROUTER_STD
    x = torch.randn(2048, 3072, generator=torch.Generator().manual_seed(2))
    chosen = torch.topk(torch.sigmoid(x @ gate.T) + bias, 8, dim=-1).indices
    counts = torch.bincount(chosen.flatten(), minlength=256).sort(descending=True).values.float()
    assert float(counts[:8].sum() / counts.sum()) > 0.45  # 8 of 256 experts take about half


def test_same_seed_same_bytes(small2, tmp_path):
    a = synth.generate(tmp_path / "a", layers=1, seed=3, routing="skewed", _shrink=SMALL, threads=1)
    b = synth.generate(tmp_path / "b", layers=1, seed=4, routing="skewed", _shrink=SMALL)
    for name in ("model.layers.0.block_sparse_moe.experts.3.w1.weight",
                 "model.layers.0.block_sparse_moe.experts.3.w1.weight_scale_inv",
                 "model.layers.0.block_sparse_moe.e_score_correction_bias",
                 "model.layers.0.block_sparse_moe.gate.weight", "model.embed_tokens.weight"):
        # Layer 0 of a 1-layer and a 2-layer checkpoint, 1 thread and all: the same bytes.
        assert torch.equal(read(a, name).view(torch.uint8), read(small2, name).view(torch.uint8)), name
        assert not torch.equal(read(b, name).view(torch.uint8), read(a, name).view(torch.uint8)), name


def test_refuses_a_non_empty_folder_and_force_replaces_only_its_files(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        synth.generate(out, layers=1, _shrink=SMALL)
    (out / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    model = synth.generate(out, layers=1, _shrink=SMALL, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model-00009-of-00009.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == [synth.shard_name(0, model.shards)]
    assert not list(out.glob(".*partial"))


def test_checks_free_disk_first(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda p: real(p)._replace(free=10**9))
    with pytest.raises(UserError, match=r"8 layers need 31\.\d GB .*fewer --layers"):
        synth.generate(tmp_path / "x", layers=8)
    assert not (tmp_path / "x").exists()
    assert synth.needed_bytes(8) > 8 * ModelSpec.known("minimax-m2.1").layer_expert_bytes


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="routing"):
        synth.generate(tmp_path / "a", layers=1, routing="zipf")
    with pytest.raises(UserError, match="layers"):
        synth.generate(tmp_path / "a", layers=0)


def test_fp8_code_map_is_finite_and_symmetric():
    values = synth._code_values()
    assert np.isfinite(values).all() and values.min() == -values.max() == -15.0
    assert np.abs(values).min() == 1.0
    codes = synth.fp8_codes_from_bytes(np.arange(256, dtype=np.uint8))
    assert not np.isin(codes, [0x7F, 0xFF]).any()


def test_transformers_loads_it_strictly_and_runs_finite(small2):
    hybrid = pytest.importorskip("ktutorial.hybrid")
    model = hybrid.load_model(small2.path, device="cpu")  # strict=True: every parameter named
    ids = torch.arange(100, 132).unsqueeze(0)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert bool(torch.isfinite(out.logits).all())
    for h in out.hidden_states:
        rms = float(h.float().pow(2).mean().sqrt())
        assert 1e-3 < rms < 10, rms
    assert 0.3 < float(out.logits.std()) < 5


def test_kt_kernel_fp8_reads_the_layout(small2):
    """In a process of its own: kt-kernel sizes its CPU buffers once a process, by the first
    model's width, so after the tiny model's tests (hidden 256) a 3072-wide layer cannot run."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import json, sys, torch
        from ktutorial import ktkernel
        from ktutorial.fp8 import rel_err
        try:
            experts = ktkernel.CPUExperts(sys.argv[1], 1, threads=2, chunk=16)
        except ktkernel.MissingDependency as exc:
            print(json.dumps({"missing": str(exc)})); sys.exit(0)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 3072, generator=g)
        ids = torch.stack([torch.randperm(16, generator=g)[:8] for _ in range(8)])
        w = torch.rand(8, 8, generator=g)
        w = w / w.sum(1, keepdim=True)
        got = experts.forward(x, ids, w).clone()
        ref = ktkernel.reference_experts(sys.argv[1], 1, x, ids, w)
        print(json.dumps({"ref_max": float(ref.abs().max()), "rel_err": float(rel_err(got, ref))}))
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(small2.path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "missing" in out:
        pytest.skip(out["missing"])
    assert out["ref_max"] > 0
    assert out["rel_err"] < 2e-2


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_calls_generate(small2, monkeypatch, capsys):
    from ktutorial.cli import main

    seen = {}

    def fake(out, layers, seed, routing, force):
        seen.update(out=out, layers=layers, seed=seed, routing=routing, force=force)
        return small2

    monkeypatch.setattr(synth, "generate", fake)
    assert main(["synth", "--out", "x", "--layers", "3", "--routing", "skewed", "--seed", "5", "--json"]) == 0
    assert seen == {"out": "x", "layers": 3, "seed": 5, "routing": "skewed", "force": False}
    assert json.loads(capsys.readouterr().out)["routing"] == "skewed"


def test_cli_refusal_exits_2(tmp_path):
    from ktutorial.cli import main

    (tmp_path / "f").write_text("x")
    assert main(["synth", "--out", str(tmp_path), "--layers", "1"]) == 2
