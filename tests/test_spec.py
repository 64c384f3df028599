import json

import pytest

from ktutorial.spec import ModelSpec, SpecError, known_model, known_models


def test_minimax_m21_sizes_match_the_published_arithmetic():
    s = ModelSpec.known("minimax-m2.1")
    # FACTS: one expert 14.16 MB in FP8, 3.62 GB a layer, 224.7 GB of experts in all.
    assert round(s.expert_bytes / 1e6, 2) == 14.16
    assert round(s.layer_expert_bytes / 1e9, 2) == 3.62
    assert round(s.all_expert_bytes / 1e9, 1) == 224.7
    # 62 layers x 8 KV heads x 128 x (K and V) x 2 bytes
    assert s.kv_bytes_per_token("bf16") == 253_952
    assert s.kv_bytes_per_token("fp8") == 253_952 // 2
    # one decoded token reads 8 experts in each of 62 layers: about 7.0 GB
    assert round(s.decode_expert_bytes_per_token / 1e9, 1) == 7.0
    # about 229 B parameters, about 10 B active (FACTS); attention ~44 M a layer
    assert 225 < s.total_params / 1e9 < 232
    assert 9.5 < s.active_params / 1e9 < 11.5
    assert round(s.attention_params_per_layer / 1e6) == 44
    assert round(s.embedding_params / 1e9, 2) == 1.23


def test_expert_bytes_include_the_block_scales():
    s = ModelSpec.known("minimax-m2.1")
    weights = 3 * 3072 * 1536
    scales = 3 * (1536 // 128) * (3072 // 128) * 4
    assert s.expert_bytes == weights + scales


def test_missing_field_is_named(tmp_path):
    cfg = dict(known_model("minimax-m2.1")["config"])
    del cfg["num_local_experts"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="num_local_experts"):
        ModelSpec.from_dir(tmp_path)


def test_bad_values_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(SpecError, match="config.json not found"):
        ModelSpec.from_dir(tmp_path)
    cfg = dict(known_model("minimax-m2.1")["config"], hidden_size=0)
    with pytest.raises(SpecError, match="hidden_size"):
        ModelSpec.from_config(cfg)
    with pytest.raises(SpecError, match="known models: .*minimax-m2.1"):
        ModelSpec.known("llama-7b")


def test_packaged_models_are_listed():
    assert "minimax-m2.1" in known_models()
    assert known_model("minimax-m2.1")["repo_id"] == "MiniMaxAI/MiniMax-M2.1"
