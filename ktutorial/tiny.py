"""The embedded tiny model: a MiniMax-M2-architecture checkpoint generated from a seed.

`generate(out, seed)` writes the same weights in two formats:

- `out/hf/`: the real checkpoint's layout (config.json with the minimax_m2 fields and the fp8
  128x128 quantization_config, FP8 e4m3 experts with float32 `weight_scale_inv`, bf16 attention,
  two safetensors shards + model.safetensors.index.json, tokenizer.json, tokenizer_config.json
  with the chat template). transformers' MiniMaxM2ForCausalLM and kt-kernel's FP8 method load it.
- `out/gguf/model.gguf`: a `minimax-m2` GGUF for llama.cpp. Experts are F16 and everything else
  F32; the FP8 block scales are powers of two, so every FP8 value times its scale is exact in F16,
  and bf16 values are exact in F32: both files hold bit-identical weights.

Same seed, same bytes (no timestamps, fixed order). `ensure(seed)` generates once into the
ktutorial cache and reuses it. Shape: 4 layers, hidden 256, 16 experts of width 128 (top 2,
sigmoid router with correction bias), 4 query / 2 KV heads of 128 (rotary 64, QK norm), a
byte-level BPE vocabulary of 4298 tokens (all 256 bytes, 4000 merges shipped in
data/tiny/merges.txt, the reply tokens, MiniMax's markers), context 131072.

Behaviour (the same for every seed; seeds change only the noise weights). Replies are greedy-
stable: at temperature 0 every run gives the same tokens, and even at temperature 1 the chosen
token has a logit margin of >= ~14 over the next one. After the generation prompt
`]~b]ai\n<think>\n` the model writes a reasoning line, `</think>`, `\n\n`, then one of three
endings, then the end-of-turn token `[e~[` (EOS in both formats), 14-16 tokens in all:

- "call"   -- the prompt offers tools (a `<tools>` block, i.e. the request has `tools`) and no
  tool result follows the last user message: reasoning "Tools are offered, so I run one command
  with Bash." then `<minimax:tool_call>\n<invoke name="Bash">\n<parameter name="command">echo
  ktutorial</parameter>\n</invoke>\n</minimax:tool_call>`. OpenAI: tool_calls = [Bash
  {"command": "echo ktutorial"}], finish_reason "tool_calls"; Anthropic: a tool_use block.
  The request must offer a tool named `Bash` with a string `command` parameter (Claude Code
  does): llama.cpp's grammar forces an offered name, so other tool names get garbage calls.
- "result" -- a tool result (`]~b]tool` message) follows the last user message, tools offered
  or not: reasoning "The tool result is back, so I can answer now." and the answer
  "Done: the command ran and printed its output."
- "plain"  -- otherwise: reasoning "The user wrote a message. I reply with the fixed greeting."
  and the answer "Hello from the ktutorial tiny model."

The exact token lists are `REASONING`, `ANSWER` and `REPLY_CHAINS`; `reply_text(mode)` is the
generated text (llama.cpp's reasoning_content keeps the reasoning's trailing newline: strip it).
The user's words do not matter. "Follows the last user message" is decided by counting user
markers; it stays exact for at least 24 user turns. Without the generation prompt (raw
completion) any text is continued with "\n" and a reply; with ignore_eos the reply repeats.

How it works: embeddings are one-hot token identities plus a large constant that makes every
RMS norm a fixed scaling. Layer 0 head 0 counts user markers against the `]~!b[` sink (value
1/(1+n)), head 2 detects `<tools>`; layer 1 head 0 detects a `]~b]tool` marker whose user count
equals the current one. The output head is a next-token table over token identity, with the
two flags deciding the two branch points (first reasoning token, first answer token). Layers
2-3 have random rotary heads, and every layer random FP8 experts routed by a per-token bucket
with wide router margins; they write only noise dims that move logits by about +-1, so kt-kernel
and llama.cpp differences show up in logits without changing any reply.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import gguf
import numpy as np

from ktutorial import paths
from ktutorial.errors import UserError
from ktutorial.spec import ModelSpec

# Bump when the bytes generate() writes change: ensure() keys its cache folder on it.
# 3: config.json names self_attn unquantized (SGLang built FP8 attention without scales from v2).
FORMAT_VERSION = 3
SERVED_MODEL_NAME = "ktutorial-tiny"

# --- shape: MiniMax-M2's architecture, scaled down; FP8 blocks need multiples of 128 --------
HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 128  # per expert
NUM_LAYERS = 4
NUM_EXPERTS = 16
EXPERTS_PER_TOKEN = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 128
ROTARY_DIM = 64
ROPE_THETA = 5_000_000.0
RMS_NORM_EPS = 1e-6
# Claude Code sends ~77 KB of prompt: about 25k tokens at this vocabulary's ~3 characters a token.
MAX_POSITION_EMBEDDINGS = 131072
FP8_BLOCK = 128

# --- vocabulary ----------------------------------------------------------------------------
BOS = "]~!b["
EOS = "[e~["
ROLE_SYSTEM = "]~b]system"
ROLE_USER = "]~b]user"
ROLE_AI = "]~b]ai"
ROLE_TOOL = "]~b]tool"
# Control tokens: parsed in prompts, never printed in replies.
CONTROL_TOKENS = (BOS, EOS, ROLE_SYSTEM, ROLE_USER, ROLE_AI, ROLE_TOOL)
# Single tokens that do print: the reasoning and tool-call parsers look for their text.
MARKUP_TOKENS = (
    "<think>",
    "</think>",
    "<minimax:tool_call>",
    "</minimax:tool_call>",
    "<tools>",
    "</tools>",
    "<response>",
    "</response>",
)

# --- behaviour: what the model says (see the module docstring for the rule) ----------------
# Each list is the exact token sequence the model emits. The output head is a next-token
# table keyed by the current token, so no token may appear twice across all lists.
REASONING = {
    "plain": ["The user", " wrote a", " message.", " I reply", " with the", " fixed", " greeting.\n"],
    "call": ["Tools are", " offered,", " so I", " run one", " command", " with Bash.\n"],
    "result": ["The tool", " result is", " back,", " so I can", " answer", " now.\n"],
}
ANSWER = {
    "plain": ["Hello", " from the", " ktutorial", " tiny model."],
    "call": [
        "<minimax:tool_call>",
        '\n<invoke name="Bash">\n',
        '<parameter name="command">',
        "echo ktutorial",
        "</parameter>\n",
        "</invoke>\n",
        "</minimax:tool_call>",
    ],
    "result": ["Done:", " the command", " ran and", " printed", " its output."],
}
THINK_END = ["</think>", "\n\n"]
MODES = ("plain", "call", "result")
REPLY_CHAINS = {m: REASONING[m] + THINK_END + ANSWER[m] for m in MODES}

TOOL_NAME = "Bash"
TOOL_ARGUMENTS = {"command": "echo ktutorial"}
REASONING_TEXT = {m: "".join(REASONING[m]).strip() for m in MODES}
ANSWER_TEXT = {m: "".join(ANSWER[m]) for m in ("plain", "result")}


def reply_text(mode: str) -> str:
    """The exact text the model generates after the generation prompt, before end-of-turn."""
    return "".join(REPLY_CHAINS[mode])


CHAT_TEMPLATE = r"""{#- ktutorial tiny model: a chat template in MiniMax-M2's style -#}
{%- macro visible_text(content) -%}
{%- if content is string -%}{{- content -}}
{%- elif content is none -%}{{- '' -}}
{%- elif content is iterable and content is not mapping -%}
{%- for item in content -%}
{%- if item is mapping and item.type == 'text' -%}{{- item.text -}}
{%- elif item is string -%}{{- item -}}
{%- endif -%}
{%- endfor -%}
{%- else -%}{{- content -}}
{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0].role == 'system' -%}
{%- set system_message = visible_text(messages[0].content) -%}
{%- set conversation = messages[1:] -%}
{%- else -%}
{%- set system_message = 'You are a helpful assistant.' -%}
{%- set conversation = messages -%}
{%- endif -%}
{%- set ns = namespace(last_user_index=-1) -%}
{%- for m in conversation -%}
{%- if m.role == 'user' -%}{%- set ns.last_user_index = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- ']~!b[]~b]system\n' ~ system_message -}}
{%- if tools -%}
{{- '\n\n# Tools\nYou may call one or more tools to assist with the user query.\nHere are the tools available in JSONSchema format:\n\n<tools>\n' -}}
{%- for tool in tools -%}
{%- if tool.function is defined -%}{%- set spec = tool.function -%}{%- else -%}{%- set spec = tool -%}{%- endif -%}
{{- '<tool>' ~ (spec | tojson) ~ '</tool>\n' -}}
{%- endfor -%}
{{- '</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n\n<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1</parameter>\n</invoke>\n</minimax:tool_call>' -}}
{%- endif -%}
{{- '[e~[\n' -}}
{%- for m in conversation -%}
{%- if m.role == 'assistant' -%}
{{- ']~b]ai\n' -}}
{%- set content = visible_text(m.content) -%}
{%- set reasoning = '' -%}
{%- if m.reasoning_content is string and m.reasoning_content -%}
{%- set reasoning = m.reasoning_content -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}
{%- set content = content.split('</think>')[-1].strip('\n') -%}
{%- endif -%}
{%- if reasoning and loop.index0 > ns.last_user_index -%}
{{- '<think>\n' ~ reasoning ~ '\n</think>\n\n' -}}
{%- endif -%}
{{- content -}}
{%- if m.tool_calls -%}
{{- '<minimax:tool_call>\n' -}}
{%- for tc in m.tool_calls -%}
{%- if tc.function is defined -%}{%- set call = tc.function -%}{%- else -%}{%- set call = tc -%}{%- endif -%}
{{- '<invoke name="' ~ call.name ~ '">\n' -}}
{%- if call.arguments is mapping -%}
{%- for key, value in call.arguments.items() -%}
{{- '<parameter name="' ~ key ~ '">' -}}
{%- if value is string -%}{{- value -}}{%- else -%}{{- value | tojson -}}{%- endif -%}
{{- '</parameter>\n' -}}
{%- endfor -%}
{%- elif call.arguments -%}
{{- call.arguments -}}
{%- endif -%}
{{- '</invoke>\n' -}}
{%- endfor -%}
{{- '</minimax:tool_call>' -}}
{%- endif -%}
{{- '[e~[\n' -}}
{%- elif m.role == 'tool' -%}
{%- if loop.first or conversation[loop.index0 - 1].role != 'tool' -%}{{- ']~b]tool' -}}{%- endif -%}
{{- '\n<response>' ~ visible_text(m.content) ~ '</response>' -}}
{%- if loop.last or conversation[loop.index0 + 1].role != 'tool' -%}{{- '[e~[\n' -}}{%- endif -%}
{%- elif m.role == 'system' -%}
{{- ']~b]system\n' ~ visible_text(m.content) ~ '[e~[\n' -}}
{%- else -%}
{{- ']~b]user\n' ~ visible_text(m.content) ~ '[e~[\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- ']~b]ai\n<think>\n' -}}{%- endif -%}
"""

# o200k's split pattern: what llama.cpp uses for tokenizer.ggml.pre = "minimax-m2", so both
# runtimes cut a prompt into the same pieces before BPE.
PRETOKENIZE_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class TinyModel:
    root: Path
    hf_dir: Path
    gguf_path: Path
    seed: int
    served_model_name: str = SERVED_MODEL_NAME

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dir(self.hf_dir, name=SERVED_MODEL_NAME)

    @classmethod
    def at(cls, root: str | Path, seed: int) -> "TinyModel":
        root = Path(root)
        return cls(root=root, hf_dir=root / "hf", gguf_path=root / "gguf" / "model.gguf", seed=seed)


# --- vocabulary ----------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_B2U = bytes_to_unicode()


def _enc(text: str) -> str:
    return "".join(_B2U[b] for b in text.encode("utf-8"))


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]  # byte-level strings, index = token id
    merges: list[tuple[str, str]]
    control: dict[str, int]  # text -> id
    markup: dict[str, int]

    @property
    def size(self) -> int:
        return len(self.tokens)

    def id(self, text: str) -> int:
        if text in self.control:
            return self.control[text]
        if text in self.markup:
            return self.markup[text]
        return self.tokens.index(_enc(text))


def _merges() -> list[tuple[str, str]]:
    """The shipped BPE merges (package data): byte-level pairs, in rank order."""
    text = resources.files("ktutorial").joinpath("data/tiny/merges.txt").read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#version"):
            a, b = line.split(" ")
            out.append((a, b))
    return out


def build_vocab() -> Vocab:
    """Bytes, the merged tokens in rank order, the reply tokens, markup, then control tokens."""
    tokens = [_B2U[b] for b in range(256)]
    seen = set(tokens)
    merges = _merges()
    for a, b in merges:
        if a not in seen or b not in seen:
            raise AssertionError(f"merge {a} {b} uses a token that no earlier merge made")
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    # Reply tokens: whole words or phrases the model emits; BPE never produces most of them.
    for chain in REPLY_CHAINS.values():
        for piece in chain:
            if piece in MARKUP_TOKENS or piece in CONTROL_TOKENS:
                continue
            enc = _enc(piece)
            if enc not in seen:
                seen.add(enc)
                tokens.append(enc)
    markup = {}
    for t in MARKUP_TOKENS:
        markup[t] = len(tokens)
        tokens.append(t)
    control = {}
    for t in CONTROL_TOKENS:
        control[t] = len(tokens)
        tokens.append(t)
    return Vocab(tokens=tokens, merges=merges, control=control, markup=markup)


def _tokenizer_json(v: Vocab) -> dict:
    added = []
    for text, i in sorted({**v.markup, **v.control}.items(), key=lambda kv: kv[1]):
        added.append(
            {
                "id": i,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": text in v.control,
            }
        )
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(v.tokens) if t not in v.control and t not in v.markup},
            "merges": [[a, b] for a, b in v.merges],
        },
    }


def _tokenizer_config(v: Vocab) -> dict:
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": t in v.control,
            }
            for t, i in sorted({**v.markup, **v.control}.items(), key=lambda kv: kv[1])
        },
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": None,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


# --- weights --------------------------------------------------------------------------------


def _bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16, kept as float32 (exact in both files)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).float().numpy()


def _fp8_blocks(w: np.ndarray, rng: np.random.Generator):
    """Quantize [N, K] to FP8 e4m3 with one power-of-two scale per 128x128 block.

    Returns (fp8 torch tensor, float32 scale_inv [N/128, K/128], dequantized float32)."""
    import torch

    n, k = w.shape
    nb, kb = n // FP8_BLOCK, k // FP8_BLOCK
    blocks = w.reshape(nb, FP8_BLOCK, kb, FP8_BLOCK)
    amax = np.abs(blocks).max(axis=(1, 3))
    # Power of two with headroom under e4m3's 448, so value x scale is exact in F16/F32.
    scale = np.exp2(np.ceil(np.log2(np.where(amax > 0, amax, 448.0) / 448.0))).astype(np.float32)
    q = torch.from_numpy((blocks / scale[:, None, :, None]).reshape(n, k).astype(np.float32)).to(torch.float8_e4m3fn)
    deq = (q.float().numpy().reshape(nb, FP8_BLOCK, kb, FP8_BLOCK) * scale[:, None, :, None]).reshape(n, k)
    return q, scale, deq.astype(np.float32)


# --- the constructed model -------------------------------------------------------------------
# Residual stream layout (HIDDEN_SIZE dims). A big constant dim dominates every RMS norm, so
# norms act as fixed scalings and the feature dims below keep their meaning in every layer.
SLOTS = 64  # one-hot identity of the tokens that matter (reply tokens, markers), plus OTHER
BUCKET0, BUCKETS = 64, 16  # every token's router bucket, one-hot
CONST = 80  # value RESIDUAL_CONST in every embedding
F_USERS = 81  # 1 / (1 + e^-3 x user markers so far)           (layer 0, head 0)
F_TOOLS = 82  # ~1 when a <tools> block is in the context        (layer 0, head 2)
F_RESULT = 83  # ~1 when a tool result follows the last user marker (layer 1, head 0)
JUNK0 = 84  # the rest: expert outputs, noise heads, per-token jitter
RESIDUAL_CONST = 256.0
# rms(x) = RESIDUAL_CONST / sqrt(HIDDEN_SIZE): this gain gives x_hat = x on every feature dim.
NORM_GAIN = RESIDUAL_CONST / HIDDEN_SIZE**0.5
# Logit margins: A for the next-token table, MODE_MARGIN at the two branch points. Rounding
# (FP8 experts, bf16 kt-kernel activations, F16 KV cache) moves logits by well under 1.
TABLE_LOGIT = 40.0
MODE_MARGIN = 16.0
# Attention score scales (in score units, i.e. after the 1/sqrt(head_dim) factor).
SCORE_FAR = 40.0  # pushes ordinary tokens out of the detection heads
SCORE_TOOLS = 10.0
SCORE_USER = -3.0  # user markers vs the BOS sink: a gentle 1/(1 + 0.05 n) keeps later turns apart
SCORE_RESULT = 10.0  # a tool marker whose user count equals the current one
SCORE_COUNT_GAIN = 1600.0  # x user-count difference; keeps 9+ user turns apart
Q_BALLAST = 2.0**20  # huge q/k components with zero norm weight: QK norms become fixed scalings
K_BALLAST = 2.0**16


def _behaviour_tables(vocab: Vocab):
    """(slot of each token id, successor of each slot, branch rows by mode) for the output head."""
    newline = vocab.id("\n")
    ids = {m: [vocab.id(t) for t in REPLY_CHAINS[m]] for m in MODES}
    special = [vocab.control[BOS], vocab.control[ROLE_USER], vocab.control[ROLE_TOOL], vocab.markup["<tools>"]]
    ordered = [newline] + special
    for m in MODES:
        for i in ids[m]:
            if i not in ordered:
                ordered.append(i)
    other_slot = len(ordered)
    if other_slot >= SLOTS:
        raise AssertionError("too many reply tokens for the identity slots")
    slot = np.full(vocab.size, other_slot, dtype=np.int64)
    for k, i in enumerate(ordered):
        slot[i] = k
    successor: dict[int, int | None] = {other_slot: newline}
    for i in special:
        successor[int(slot[i])] = newline
    branch_rows = {m: [] for m in MODES}
    successor[int(slot[newline])] = None  # branch 1: the first reasoning token
    for m in MODES:
        branch_rows[m].append((int(slot[newline]), ids[m][0]))
        chain = ids[m]
        n_reason = len(REASONING[m]) + len(THINK_END)
        for k, i in enumerate(chain):
            s = int(slot[i])
            if k == n_reason - 1:  # "\n\n" after </think>: branch 2, the answer's first token
                successor[s] = None
                branch_rows[m].append((s, chain[k + 1]))
            else:
                nxt = chain[k + 1] if k + 1 < len(chain) else vocab.control[EOS]
                if successor.get(s, nxt) != nxt:
                    raise AssertionError(f"token {vocab.tokens[i]!r} has two successors")
                successor[s] = nxt
    return slot, successor, branch_rows


def _designed_weights(seed: int, vocab: Vocab) -> dict[str, np.ndarray]:
    """Float32 weights (bf16-exact) by HF name that make the behaviour in the docstring.

    Layer 0: head 0 counts user markers against the BOS sink; head 2 spots <tools>.
    Layer 1: head 0 spots a tool marker whose user count equals the current one. Layers 2-3:
    random heads (rotary, position-dependent) that write only noise dims. Every layer's experts
    are random and routed by token bucket with wide router margins; they write noise dims.
    The output head reads the token identity (next-token table) and the two flags."""
    rng = np.random.default_rng(seed)
    h, i_sz, n_exp, v = HIDDEN_SIZE, INTERMEDIATE_SIZE, NUM_EXPERTS, vocab.size
    qd, kd = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    slot, successor, branch_rows = _behaviour_tables(vocab)
    junk = np.arange(JUNK0, h)
    ident = np.arange(SLOTS)
    buckets = np.arange(BUCKET0, BUCKET0 + BUCKETS)
    bos, user, tool = vocab.control[BOS], vocab.control[ROLE_USER], vocab.control[ROLE_TOOL]
    tools_tok = vocab.markup["<tools>"]
    w: dict[str, np.ndarray] = {}

    emb = np.zeros((v, h), np.float32)
    emb[np.arange(v), slot] = 1.0
    emb[np.arange(v), BUCKET0 + rng.integers(0, BUCKETS, v)] = 1.0
    emb[:, CONST] = RESIDUAL_CONST
    emb[:, JUNK0:] = rng.standard_normal((v, h - JUNK0)) * 0.02
    w["model.embed_tokens.weight"] = _bf16(emb)

    norm = np.full(h, NORM_GAIN, np.float32)
    norm[CONST] = HIDDEN_SIZE**0.5 / RESIDUAL_CONST  # the constant reads as 1.0 after the norm
    sqrt_d = HEAD_DIM**0.5
    nr = ROTARY_DIM  # first non-rotary dim inside a head: position-free features live there

    def q_ix(head, k):
        return head * HEAD_DIM + nr + k

    def k_ix(kv, k):
        return kv * HEAD_DIM + nr + k

    ballast_q, ballast_k = q_ix(1, HEAD_DIM - nr - 1), k_ix(0, HEAD_DIM - nr - 1)
    # With the ballast dominating, rms(q) = Q_BALLAST / sqrt(qd): this weight makes q_hat =
    # sqrt(head_dim) * q, so scores (q_hat . k_hat / sqrt(head_dim)) equal q . k.
    q_norm_gain = sqrt_d * Q_BALLAST / qd**0.5
    k_norm_gain = K_BALLAST / kd**0.5

    for layer in range(NUM_LAYERS):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = norm.copy()
        w[p + "post_attention_layernorm.weight"] = norm.copy()
        wq = np.zeros((qd, h), np.float32)
        wk = np.zeros((kd, h), np.float32)
        wv = np.zeros((kd, h), np.float32)
        wo = np.zeros((h, qd), np.float32)
        if layer < 2:
            wq[ballast_q, CONST] = Q_BALLAST
            wk[ballast_k, CONST] = K_BALLAST
            qn = np.full(qd, q_norm_gain, np.float32)
            kn = np.full(kd, k_norm_gain, np.float32)
            qn[ballast_q] = 0.0
            kn[ballast_k] = 0.0
        if layer == 0:
            # head 0 / kv 0: weight on the BOS sink = 1 / (1 + e^SCORE_USER x users so far).
            wk[k_ix(0, 0), CONST] = 1.0
            wk[k_ix(0, 0), slot[bos]] = -1.0
            wk[k_ix(0, 0), slot[user]] = -1.0
            wk[k_ix(0, 1), slot[user]] = 1.0
            wq[q_ix(0, 0), CONST] = -SCORE_FAR
            wq[q_ix(0, 1), CONST] = SCORE_USER
            wv[k_ix(0, 0), slot[bos]] = 1.0
            wo[F_USERS, q_ix(0, 0)] = 1.0
            # head 2 / kv 1: all weight on <tools> when present, else on the BOS sink (value 0).
            wk[k_ix(1, 0), CONST] = 1.0
            wk[k_ix(1, 0), slot[bos]] = -1.0
            wk[k_ix(1, 0), slot[tools_tok]] = -1.0
            wk[k_ix(1, 1), slot[tools_tok]] = 1.0
            wq[q_ix(2, 0), CONST] = -SCORE_FAR
            wq[q_ix(2, 1), CONST] = SCORE_TOOLS
            wv[k_ix(1, 0), slot[tools_tok]] = 1.0
            wo[F_TOOLS, q_ix(2, 0)] = 1.0
        elif layer == 1:
            # head 0 / kv 0: score(tool marker t) = SCORE_RESULT - gain * (F(t) - F(now)), F the
            # user-count feature (equal iff no user marker came after t); the BOS sink scores 0;
            # other tokens -gain * F(p) << 0.
            g = SCORE_COUNT_GAIN
            wk[k_ix(0, 0), slot[tool]] = 1.0
            wk[k_ix(0, 1), F_USERS] = 1.0
            wk[k_ix(0, 2), slot[bos]] = 1.0
            wq[q_ix(0, 0), CONST] = SCORE_RESULT
            wq[q_ix(0, 0), F_USERS] = g
            wq[q_ix(0, 1), CONST] = -g
            wq[q_ix(0, 2), CONST] = g
            wv[k_ix(0, 0), slot[tool]] = 1.0
            wo[F_RESULT, q_ix(0, 0)] = 1.0
        else:
            # Noise heads: random rotary queries and keys, values from token identity, output
            # into noise dims only. They make positions matter (rope) without steering replies.
            reads = np.concatenate([ident, buckets])
            wq[:, reads] = rng.standard_normal((qd, reads.size)) * 0.5
            wk[:, reads] = rng.standard_normal((kd, reads.size)) * 0.5
            wv[:, reads] = rng.standard_normal((kd, reads.size)) * 0.3
            wo[junk, :] = rng.standard_normal((junk.size, qd)) * 0.02
            qn = np.ones(qd, np.float32)
            kn = np.ones(kd, np.float32)
        w[p + "self_attn.q_proj.weight"] = _bf16(wq)
        w[p + "self_attn.k_proj.weight"] = _bf16(wk)
        w[p + "self_attn.v_proj.weight"] = _bf16(wv)
        w[p + "self_attn.o_proj.weight"] = _bf16(wo)
        w[p + "self_attn.q_norm.weight"] = _bf16(qn)
        w[p + "self_attn.k_norm.weight"] = _bf16(kn)

        # Router: each bucket picks two experts by a wide sigmoid margin (>0.6 in score).
        gate = np.zeros((n_exp, h), np.float32)
        for b in range(BUCKETS):
            chosen = rng.choice(n_exp, EXPERTS_PER_TOKEN, replace=False)
            col = -rng.uniform(2.0, 4.0, n_exp)
            col[chosen] = rng.uniform(1.5, 4.0, EXPERTS_PER_TOKEN)
            gate[:, BUCKET0 + b] = col
        w[p + "block_sparse_moe.gate.weight"] = _bf16(gate)
        w[p + "block_sparse_moe.e_score_correction_bias"] = (rng.standard_normal(n_exp) * 0.01).astype(np.float32)
        for x in range(n_exp):
            q = p + f"block_sparse_moe.experts.{x}."
            w[q + "w1.weight"] = (rng.standard_normal((i_sz, h)) * 0.25).astype(np.float32)
            w[q + "w3.weight"] = (rng.standard_normal((i_sz, h)) * 0.25).astype(np.float32)
            down = np.zeros((h, i_sz), np.float32)
            down[junk] = rng.standard_normal((junk.size, i_sz)) * 0.02
            w[q + "w2.weight"] = down

    w["model.norm.weight"] = norm.copy()
    head = np.zeros((v, h), np.float32)
    head[:, JUNK0:] = rng.standard_normal((v, h - JUNK0)) * 0.3  # expert/noise dims move logits a little
    for s, nxt in successor.items():
        if nxt is not None:
            head[nxt, s] = TABLE_LOGIT
    for m in MODES:
        for s, nxt in branch_rows[m]:
            head[nxt, s] = TABLE_LOGIT
            # Mode terms on the branch tokens (flags are ~0 or ~1):
            #   plain 0 | call: -M + 2M tools - 4M result | result: -M + 2M result
            if m == "call":
                head[nxt, CONST] = -MODE_MARGIN
                head[nxt, F_TOOLS] = 2 * MODE_MARGIN
                head[nxt, F_RESULT] = -4 * MODE_MARGIN
            elif m == "result":
                head[nxt, CONST] = -MODE_MARGIN
                head[nxt, F_RESULT] = 2 * MODE_MARGIN
    w["lm_head.weight"] = _bf16(head)
    return w


def _is_expert(name: str) -> bool:
    return ".block_sparse_moe.experts." in name


def _quantize(w: dict[str, np.ndarray], seed: int):
    """FP8 parts for the HF folder, and the same weights dequantized (what GGUF stores)."""
    rng = np.random.default_rng(seed + 1)
    fp8, deq = {}, {}
    for name, a in w.items():
        if _is_expert(name):
            q, scale, d = _fp8_blocks(a, rng)
            fp8[name] = (q, scale)
            deq[name] = d
        else:
            deq[name] = a
    return fp8, deq


# --- writers --------------------------------------------------------------------------------


def config_dict(vocab: Vocab) -> dict:
    return {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        "attn_type_list": [1] * NUM_LAYERS,
        "bos_token_id": vocab.control[BOS],
        "eos_token_id": vocab.control[EOS],
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "num_attention_heads": NUM_HEADS,
        "num_experts_per_tok": EXPERTS_PER_TOKEN,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "num_local_experts": NUM_EXPERTS,
        "qk_norm_type": "per_layer",
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "rotary_dim": ROTARY_DIM,
        "scoring_func": "sigmoid",
        "shared_intermediate_size": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_qk_norm": True,
        "use_routing_bias": True,
        "vocab_size": vocab.size,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "float8_e4m3fn",
            "quant_method": "fp8",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            # The tiny's attention is bf16 (its designed heads need exact weights): say so, or
            # SGLang builds FP8 attention layers with no scales and serves garbage. SGLang and
            # transformers match these names as substrings of module names.
            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head", "self_attn"],
        },
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_hf(hf: Path, vocab: Vocab, w: dict[str, np.ndarray], fp8: dict) -> None:
    import torch
    from safetensors.torch import save_file

    hf.mkdir(parents=True)
    _write_json(hf / "config.json", config_dict(vocab))
    _write_json(
        hf / "generation_config.json",
        {"bos_token_id": vocab.control[BOS], "eos_token_id": vocab.control[EOS], "do_sample": True,
         "temperature": 1.0, "top_p": 0.95, "top_k": 40},
    )
    _write_json(hf / "tokenizer.json", _tokenizer_json(vocab))
    _write_json(hf / "tokenizer_config.json", _tokenizer_config(vocab))
    _write_json(hf / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS})
    (hf / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")

    # Shard like the real checkpoint: layers split across files, embeddings first, head last.
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for name, a in w.items():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            s = shards[0] if layer < NUM_LAYERS // 2 else shards[1]
        else:
            s = shards[0] if name.startswith("model.embed_tokens") else shards[1]
        if name in fp8:
            q, scale = fp8[name]
            s[name] = q.contiguous()
            s[name.replace(".weight", ".weight_scale_inv")] = torch.from_numpy(scale.copy())
        elif name.endswith("e_score_correction_bias"):
            s[name] = torch.from_numpy(a.copy())  # float32 in the real checkpoint
        else:
            s[name] = torch.from_numpy(a.copy()).to(torch.bfloat16)
    weight_map = {}
    total = 0
    for k, s in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, str(hf / fname), metadata={"format": "pt"})
        for name, t in s.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    _write_json(
        hf / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )


def _write_gguf(path: Path, vocab: Vocab, deq: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MINIMAXM2]
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_name(SERVED_MODEL_NAME)
    wr.add_context_length(MAX_POSITION_EMBEDDINGS)
    wr.add_embedding_length(HIDDEN_SIZE)
    wr.add_block_count(NUM_LAYERS)
    # feed_forward_length sets llama.cpp's expert tensor shapes: equal to the expert width.
    wr.add_feed_forward_length(INTERMEDIATE_SIZE)
    wr.add_expert_feed_forward_length(INTERMEDIATE_SIZE)
    wr.add_head_count(NUM_HEADS)
    wr.add_head_count_kv(NUM_KV_HEADS)
    wr.add_key_length(HEAD_DIM)
    wr.add_value_length(HEAD_DIM)
    wr.add_layer_norm_rms_eps(RMS_NORM_EPS)
    wr.add_expert_count(NUM_EXPERTS)
    wr.add_expert_used_count(EXPERTS_PER_TOKEN)
    wr.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    wr.add_rope_dimension_count(ROTARY_DIM)
    wr.add_rope_freq_base(ROPE_THETA)
    wr.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("minimax-m2")
    wr.add_token_list(vocab.tokens)
    types = [gguf.TokenType.NORMAL] * vocab.size
    for i in vocab.markup.values():
        types[i] = gguf.TokenType.USER_DEFINED
    for i in vocab.control.values():
        types[i] = gguf.TokenType.CONTROL
    wr.add_token_types(types)
    wr.add_token_merges([f"{a} {b}" for a, b in vocab.merges])
    wr.add_bos_token_id(vocab.control[BOS])
    wr.add_eos_token_id(vocab.control[EOS])
    wr.add_add_bos_token(False)  # the chat template writes ]~!b[ itself
    wr.add_chat_template(CHAT_TEMPLATE)

    def f32(a):
        return np.ascontiguousarray(a, dtype=np.float32)

    wr.add_tensor("token_embd.weight", f32(deq["model.embed_tokens.weight"]))
    wr.add_tensor("output_norm.weight", f32(deq["model.norm.weight"]))
    wr.add_tensor("output.weight", f32(deq["lm_head.weight"]))
    for layer in range(NUM_LAYERS):
        p, b = f"model.layers.{layer}.", f"blk.{layer}."
        wr.add_tensor(b + "attn_norm.weight", f32(deq[p + "input_layernorm.weight"]))
        wr.add_tensor(b + "attn_q.weight", f32(deq[p + "self_attn.q_proj.weight"]))
        wr.add_tensor(b + "attn_k.weight", f32(deq[p + "self_attn.k_proj.weight"]))
        wr.add_tensor(b + "attn_v.weight", f32(deq[p + "self_attn.v_proj.weight"]))
        wr.add_tensor(b + "attn_output.weight", f32(deq[p + "self_attn.o_proj.weight"]))
        wr.add_tensor(b + "attn_q_norm.weight", f32(deq[p + "self_attn.q_norm.weight"]))
        wr.add_tensor(b + "attn_k_norm.weight", f32(deq[p + "self_attn.k_norm.weight"]))
        wr.add_tensor(b + "ffn_norm.weight", f32(deq[p + "post_attention_layernorm.weight"]))
        wr.add_tensor(b + "ffn_gate_inp.weight", f32(deq[p + "block_sparse_moe.gate.weight"]))
        wr.add_tensor(b + "exp_probs_b.bias", f32(deq[p + "block_sparse_moe.e_score_correction_bias"]))
        for proj, gname in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
            stack = np.stack(
                [deq[p + f"block_sparse_moe.experts.{x}.{proj}.weight"] for x in range(NUM_EXPERTS)]
            )
            # Exact: FP8 e4m3 values times power-of-two scales fit F16 (checked by the tests).
            wr.add_tensor(b + gname + ".weight", stack.astype(np.float16))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


# --- entry points ---------------------------------------------------------------------------


def weights(seed: int = 0) -> tuple[Vocab, dict, dict[str, np.ndarray]]:
    """(vocab, fp8 parts by name, float32 weights by HF name) for a seed, without writing."""
    vocab = build_vocab()
    w = _designed_weights(seed, vocab)
    fp8, deq = _quantize(w, seed)
    return vocab, fp8, deq


def generate(out_dir: str | Path, seed: int = 0, force: bool = False) -> TinyModel:
    """Write the tiny model for `seed` into out_dir/hf and out_dir/gguf/model.gguf."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give --out a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out} is not empty: choose an empty folder or pass --force to overwrite it")
        for sub in ("hf", "gguf", "tiny.json"):
            target = out / sub
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    vocab, fp8, deq = weights(seed)
    model = TinyModel.at(out, seed)
    _write_hf(model.hf_dir, vocab, deq, fp8)
    _write_gguf(model.gguf_path, vocab, deq)
    _write_json(out / "tiny.json", {"seed": seed, "format_version": FORMAT_VERSION,
                                    "served_model_name": SERVED_MODEL_NAME})
    return model


def ensure(seed: int = 0) -> TinyModel:
    """The tiny model for `seed` in the ktutorial cache, generated on first use."""
    root = paths.models_dir() / f"tiny-s{seed}-v{FORMAT_VERSION}"
    if (root / "tiny.json").is_file():
        return TinyModel.at(root, seed)
    # Build beside it and rename: parallel test workers and helpers may race here.
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-s{seed}-", dir=paths.models_dir()))
    try:
        generate(tmp, seed=seed, force=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "tiny.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return TinyModel.at(root, seed)
