"""The tiny model: deterministic, both formats hold the same weights, real loaders accept it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ktutorial import tiny
from ktutorial.errors import UserError

torch = pytest.importorskip("torch")


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dequantized_safetensors(hf_dir) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    raw = {}
    for fname in sorted(set(index.values())):
        with safe_open(str(hf_dir / fname), framework="pt") as f:
            for k in f.keys():
                raw[k] = f.get_tensor(k)
    assert set(raw) == set(index)
    out = {}
    for k, t in raw.items():
        if k.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = raw[k + "_scale_inv"]
            br, bc = t.shape[0] // s.shape[0], t.shape[1] // s.shape[1]
            out[k] = (t.float() * s.repeat_interleave(br, 0).repeat_interleave(bc, 1)).numpy()
        else:
            out[k] = t.float().numpy()
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_model, tmp_path):
    again = tiny.generate(tmp_path / "again", seed=0)
    assert _files(again.root) == _files(tiny_model.root)
    other = tiny.generate(tmp_path / "other", seed=1)
    a, b = _files(tiny_model.root), _files(other.root)
    for name in ("hf/model-00001-of-00002.safetensors", "hf/model-00002-of-00002.safetensors", "gguf/model.gguf"):
        assert a[name] != b[name], name


def test_hf_folder_has_the_real_checkpoint_layout(tiny_model):
    hf = tiny_model.hf_dir
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "minimax_m2" and cfg["architectures"] == ["MiniMaxM2ForCausalLM"]
    q = cfg["quantization_config"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [128, 128] and q["fmt"] == "float8_e4m3fn"
    spec = tiny_model.spec
    assert spec.num_experts >= 16 and spec.experts_per_token == 2 and spec.num_layers >= 3
    assert spec.hidden_size % 128 == 0 and spec.expert_intermediate_size % 128 == 0
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 2
    from safetensors import safe_open

    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    with safe_open(str(hf / index[name]), framework="pt") as f:
        w2, s = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
    assert w2.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert tuple(w2.shape) == (spec.hidden_size, spec.expert_intermediate_size)
    assert tuple(s.shape) == (spec.hidden_size // 128, spec.expert_intermediate_size // 128)
    # Powers of two: value x scale is exact in F16, which is what makes the GGUF identical.
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    for k in ("gate.weight", "e_score_correction_bias"):
        assert f"model.layers.0.block_sparse_moe.{k}" in index
    tok_cfg = json.loads((hf / "tokenizer_config.json").read_text())
    assert "]~b]ai" in tok_cfg["chat_template"] and tok_cfg["eos_token"] == "[e~["


def test_both_formats_hold_the_same_weights(tiny_model):
    from gguf import GGUFReader

    st = _dequantized_safetensors(tiny_model.hf_dir)
    reader = GGUFReader(str(tiny_model.gguf_path))
    gg = {t.name: np.asarray(t.data) for t in reader.tensors}

    def same(gname, array):
        got = gg.pop(gname).astype(np.float32).reshape(array.shape)
        assert np.array_equal(got, array.astype(np.float32)), gname

    same("token_embd.weight", st.pop("model.embed_tokens.weight"))
    same("output.weight", st.pop("lm_head.weight"))
    same("output_norm.weight", st.pop("model.norm.weight"))
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
        "block_sparse_moe.e_score_correction_bias": "exp_probs_b.bias",
    }
    spec = tiny_model.spec
    for layer in range(spec.num_layers):
        p, b = f"model.layers.{layer}.", f"blk.{layer}."
        for hf_name, g_name in names.items():
            same(b + g_name, st.pop(p + hf_name))
        for proj, g_name in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
            stack = np.stack([st.pop(f"{p}block_sparse_moe.experts.{e}.{proj}.weight") for e in range(spec.num_experts)])
            same(b + g_name + ".weight", stack)
    assert not st and not gg, (sorted(st)[:5], sorted(gg)[:5])


def test_gguf_metadata(tiny_model):
    from gguf import GGUFReader

    r = GGUFReader(str(tiny_model.gguf_path))

    def val(key):
        f = r.fields[key]
        return f.contents()

    assert val("general.architecture") == "minimax-m2"
    assert val("minimax-m2.expert_count") == tiny_model.spec.num_experts
    assert val("minimax-m2.expert_used_count") == 2
    assert val("minimax-m2.expert_gating_func") == 2
    assert val("tokenizer.ggml.model") == "gpt2"
    tokens = val("tokenizer.ggml.tokens")
    eos = val("tokenizer.ggml.eos_token_id")
    assert tokens[eos] == "[e~[" and "]~b]ai" in val("tokenizer.chat_template")


def test_vocabulary_holds_bytes_and_markers():
    v = tiny.build_vocab()
    byte_level = set(tiny.bytes_to_unicode().values())
    assert byte_level <= set(v.tokens)
    for t in tiny.CONTROL_TOKENS + tiny.MARKUP_TOKENS:
        assert v.tokens[v.id(t)] == t


def test_transformers_loads_the_hf_folder(tiny_model):
    from transformers import AutoTokenizer, MiniMaxM2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("]~!b[]~b]system") and text.endswith("]~b]ai\n<think>\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("]~!b[") and tok.decode(ids) == text
    model = MiniMaxM2ForCausalLM.from_pretrained(tiny_model.hf_dir, dtype=torch.float32)
    st = _dequantized_safetensors(tiny_model.hf_dir)
    experts = model.model.layers[1].mlp.experts
    w1 = torch.from_numpy(st["model.layers.1.block_sparse_moe.experts.5.w1.weight"])
    w3 = torch.from_numpy(st["model.layers.1.block_sparse_moe.experts.5.w3.weight"])
    assert torch.equal(experts.gate_up_proj[5], torch.cat([w1, w3]))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), tiny_model.spec.vocab_size) and torch.isfinite(logits).all()


def test_non_empty_folder_is_refused_without_force(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        tiny.generate(tmp_path, seed=0)
    model = tiny.generate(tmp_path, seed=0, force=True)
    assert model.gguf_path.is_file() and (tmp_path / "notes.txt").read_text() == "mine"


def _cli(args) -> int:
    from ktutorial.cli import main

    try:
        return main(args)
    except SystemExit as exc:  # typer's standalone mode exits instead of returning
        return int(exc.code or 0)


def test_cli_tiny(tmp_path, capsys):
    assert _cli(["tiny", "--out", str(tmp_path / "m"), "--seed", "3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["seed"] == 3 and (tmp_path / "m" / "gguf" / "model.gguf").is_file()
    assert _cli(["tiny", "--out", str(tmp_path / "m")]) == 2
    assert "--force" in capsys.readouterr().err


def test_ensure_reuses_the_cache(tiny_model):
    again = tiny.ensure(seed=0)
    assert again.root == tiny_model.root
    assert again.served_model_name == "ktutorial-tiny"


# --- behaviour -------------------------------------------------------------------------------

BASH_TOOL = {
    "type": "function",
    "function": {
        "name": "Bash",
        "description": "Run a shell command",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string"}, "description": {"type": "string"}},
            "required": ["command"],
        },
    },
}
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": {"command": "echo ktutorial"}}}]}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "ktutorial"}


def _user(text):
    return {"role": "user", "content": text}


# (messages, tools offered, expected mode)
CASES = {
    "plain": ([_user("Hello")], False, "plain"),
    "plain-with-system": ([{"role": "system", "content": "Be brief."}, _user("Write a poem.")], False, "plain"),
    "call": ([_user("List the files")], True, "call"),
    "result": ([_user("List the files"), CALL, RESULT], True, "result"),
    "result-without-tools": ([_user("List the files"), CALL, RESULT], False, "result"),
    "call-after-round-trip": ([_user("a"), CALL, RESULT, {"role": "assistant", "content": "ok"}, _user("b")], True, "call"),
    "plain-after-round-trip": ([_user("a"), CALL, RESULT, {"role": "assistant", "content": "ok"}, _user("b")], False, "plain"),
}


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    from transformers import AutoTokenizer, MiniMaxM2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    model = MiniMaxM2ForCausalLM.from_pretrained(tiny_model.hf_dir, dtype=torch.float32).eval()
    return tok, model


def _prompt_ids(tok, messages, tools):
    out = tok.apply_chat_template(messages, tools=[BASH_TOOL] if tools else None, add_generation_prompt=True,
                                  tokenize=True, return_dict=True)
    return list(out["input_ids"])


def test_reply_chains_are_unique_tokens():
    v = tiny.build_vocab()
    seen = {}
    for mode, chain in tiny.REPLY_CHAINS.items():
        for piece in chain:
            i = v.id(piece)
            assert v.tokens[i] in (piece, tiny._enc(piece))
            if piece not in tiny.THINK_END:
                assert i not in seen, f"{piece!r} in {mode} and {seen.get(i)}"
                seen[i] = mode
    assert tiny.reply_text("call").endswith(
        '<minimax:tool_call>\n<invoke name="Bash">\n<parameter name="command">echo ktutorial</parameter>\n'
        "</invoke>\n</minimax:tool_call>")


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_follows_the_rule_with_wide_margins(hf_model, case):
    tok, model = hf_model
    messages, tools, mode = CASES[case]
    prompt = _prompt_ids(tok, messages, tools)
    vocab = tiny.build_vocab()
    reply = [vocab.id(p) for p in tiny.REPLY_CHAINS[mode]] + [tok.eos_token_id]
    assert tok.decode(reply[:-1]) == tiny.reply_text(mode)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply[:-1]])).logits[0, len(prompt) - 1:]
    top = logits.topk(2, dim=-1)
    assert top.indices[:, 0].tolist() == reply, tok.decode(top.indices[:, 0])
    margin = float((top.values[:, 0] - top.values[:, 1]).min())
    assert margin > 8.0, f"logit margin {margin:.2f} too thin for FP8/bf16/F16 rounding"


def test_transformers_greedy_reply_ends_by_itself(hf_model):
    tok, model = hf_model
    prompt = _prompt_ids(tok, [_user("Hello")], False)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
    new = out[0, len(prompt):].tolist()
    assert new[-1] == tok.eos_token_id and len(new) < 30
    assert tok.decode(new[:-1]) == tiny.reply_text("plain")


@pytest.fixture(scope="module")
def llama(tiny_model):
    from ktutorial import server

    with server.serve("tiny", threads=1) as srv:
        yield srv
    assert not srv.is_alive()


def test_llamacpp_tokenizes_like_transformers(llama, hf_model):
    import httpx

    tok, _ = hf_model
    text = tok.apply_chat_template([_user("Run `ls -la /tmp`, then 12345 things: café ünïcode")], tools=[BASH_TOOL],
                                   add_generation_prompt=True, tokenize=False)
    r = httpx.post(llama.base_url + "/tokenize", json={"content": text, "add_special": False, "parse_special": True})
    assert r.json()["tokens"] == tok(text, add_special_tokens=False)["input_ids"]


def test_llamacpp_openai_plain_tool_call_and_result(llama):
    import openai

    c = openai.OpenAI(base_url=llama.base_url + "/v1", api_key="unused")
    m = [_user("Hello")]
    plain = c.chat.completions.create(model=llama.model, messages=m, temperature=0, max_tokens=64)
    msg = plain.choices[0].message
    assert plain.choices[0].finish_reason == "stop"
    assert msg.content == tiny.ANSWER_TEXT["plain"]
    assert msg.reasoning_content.strip() == tiny.REASONING_TEXT["plain"]
    again = c.chat.completions.create(model=llama.model, messages=m, temperature=0, max_tokens=64)
    assert again.choices[0].message.content == msg.content  # same on every run

    called = c.chat.completions.create(model=llama.model, messages=m, tools=[BASH_TOOL], temperature=0, max_tokens=64)
    assert called.choices[0].finish_reason == "tool_calls"
    (tc,) = called.choices[0].message.tool_calls
    assert tc.function.name == tiny.TOOL_NAME and json.loads(tc.function.arguments) == tiny.TOOL_ARGUMENTS
    assert called.choices[0].message.reasoning_content.strip() == tiny.REASONING_TEXT["call"]

    history = m + [{"role": "assistant", "content": "", "tool_calls": [tc.model_dump()]},
                   {"role": "tool", "tool_call_id": tc.id, "content": "ktutorial"}]
    done = c.chat.completions.create(model=llama.model, messages=history, tools=[BASH_TOOL], temperature=0, max_tokens=64)
    assert done.choices[0].finish_reason == "stop"
    assert done.choices[0].message.content == tiny.ANSWER_TEXT["result"]

    stream = c.chat.completions.create(model=llama.model, messages=m, temperature=0, max_tokens=64, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == tiny.ANSWER_TEXT["plain"]


def test_llamacpp_anthropic_thinking_and_tool_use(llama):
    import anthropic

    a = anthropic.Anthropic(base_url=llama.base_url, api_key="unused")
    tools = [{"name": "Bash", "description": "Run a shell command",
              "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}]
    m = [{"role": "user", "content": "Hello"}]
    r = a.messages.create(model=llama.model, max_tokens=64, messages=m)
    kinds = [b.type for b in r.content]
    assert r.stop_reason == "end_turn" and kinds == ["thinking", "text"]
    assert r.content[1].text == tiny.ANSWER_TEXT["plain"]
    r = a.messages.create(model=llama.model, max_tokens=64, messages=m, tools=tools)
    assert r.stop_reason == "tool_use"
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "Bash" and use.input == tiny.TOOL_ARGUMENTS
    r2 = a.messages.create(model=llama.model, max_tokens=64, tools=tools, messages=m + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "ktutorial"}]}])
    assert r2.stop_reason == "end_turn" and r2.content[-1].text == tiny.ANSWER_TEXT["result"]


def test_config_tells_the_truth_about_every_linear_weight(tiny_model):
    """SGLang builds a layer FP8 where the config says so: a bf16 tensor there is served as garbage
    (seen on the GPU host with format v2, whose config claimed FP8 attention)."""
    from ktutorial.spec import quantization_mismatches

    hf = tiny_model.hf_dir
    assert quantization_mismatches(hf) == []
    assert not tiny_model.spec.is_quantized("model.layers.0.self_attn.q_proj")
    assert tiny_model.spec.is_quantized("model.layers.0.block_sparse_moe.experts.0.w1")


def test_config_check_catches_a_config_that_lies(tiny_model, tmp_path):
    import shutil

    lying = tmp_path / "lying"
    shutil.copytree(tiny_model.hf_dir, lying)
    cfg = json.loads((lying / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"].remove("self_attn")  # what v2 said
    (lying / "config.json").write_text(json.dumps(cfg))
    from ktutorial.spec import quantization_mismatches

    problems = quantization_mismatches(lying)
    attn = [p for p in problems if ".self_attn." in p]
    # q, k, v, o in each of the 4 layers; nothing else is wrong
    assert len(attn) == len(problems) == 4 * tiny_model.spec.num_layers
    assert "the config says FP8, the tensor is BF16 with no weight_scale_inv" in attn[0]
