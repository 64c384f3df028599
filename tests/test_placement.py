"""placement.py: the recorder's files, the placement file SGLang-KT reads back, the share of
expert activations on GPU experts, and uniform against recorded placement on the tiny model.

No GPU here, so the engine's counts come from the tiny model's own router in transformers
(placement.router_dump, the recorder's [passes, layers, experts] layout) and the masks from the
engine's own code: kt-kernel's generate_gpu_experts_masks (installed), and sglang-kt 0.7.2's
_init_kt_gpu_experts_masks / generate_uniform_masks executed from their source in the parser venv
(`make sglang-parser-env`): SGLang's own read-back code loads the placement file written here.
The run through the engine itself is `ktutorial placement compare` on a GPU host.
"""

from __future__ import annotations

import ast
import json
import logging
import types
from pathlib import Path

import pytest
import torch

from ktutorial import hybrid as hy
from ktutorial import placement as pl
from ktutorial import results
from ktutorial.engines import sglang_kt
from ktutorial.errors import UserError

OUTPUT_TOKENS = 6  # a few decode passes per prompt: the layout, not the length, is under test


# ---- sglang-kt's own placement code, from its source ------------------------------------------------


def _sglang_file(relative: str) -> Path:
    exe = sglang_kt.default_parser_python()
    if not exe.exists():
        pytest.fail(f"{exe.parent.parent.name} is missing: run `make sglang-parser-env` (make test builds it first)")
    found = sorted(exe.parent.parent.glob(f"lib/python3*/site-packages/{relative}"))
    assert found, f"sglang-kt's {relative} not in the parser venv"
    return found[0]


@pytest.fixture(scope="module")
def sglang_placement():
    """sglang-kt's `_init_kt_gpu_experts_masks` and `generate_uniform_masks`, executed from the
    installed kt_ep_wrapper.py (the module itself needs CUDA to import): the engine's read-back
    of --init-expert-location and its uniform placement, unchanged."""
    source = _sglang_file("sglang/srt/layers/moe/kt_ep_wrapper.py").read_text()
    tree = ast.parse(source)
    wanted = {"_init_kt_gpu_experts_masks", "generate_uniform_masks"}
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {d.name for d in defs} == wanted
    from kt_kernel import generate_gpu_experts_masks

    namespace = {
        "torch": torch, "logger": logging.getLogger("sglang-kt"), "Optional": __import__("typing").Optional,
        "generate_gpu_experts_masks": generate_gpu_experts_masks, "_KT_GPU_EXPERTS_MASKS": None,
        "get_tensor_model_parallel_rank": lambda: 0, "dist": types.SimpleNamespace(is_initialized=lambda: False),
    }
    exec(compile(ast.Module(body=defs, type_ignores=[]), "kt_ep_wrapper.py", "exec"), namespace)

    def read_back(path, num_layers, num_experts, gpu_experts, strategy="frequency"):
        namespace["_KT_GPU_EXPERTS_MASKS"] = None  # the engine caches it per process
        args = types.SimpleNamespace(
            get_hf_config=lambda: types.SimpleNamespace(num_hidden_layers=num_layers, num_local_experts=num_experts),
            kt_gpu_experts_ratio=None, kt_num_gpu_experts=gpu_experts, kt_expert_placement_strategy=strategy,
            init_expert_location=str(path))
        return namespace["_init_kt_gpu_experts_masks"](args)

    return types.SimpleNamespace(read_back=read_back, uniform=namespace["generate_uniform_masks"])


# ---- the share arithmetic, on counts made by hand -----------------------------------------------------

# 2 passes x 2 layers x 4 experts, top-2: a 3-token prefill, then one decode token.
HAND_COUNTS = torch.tensor([
    [[3, 1, 1, 1], [0, 2, 2, 2]],
    [[1, 1, 0, 0], [0, 0, 1, 1]],
])
HAND_MASKS = torch.tensor([[True, False, False, False], [False, False, True, True]])


def test_share_counts_activations_on_gpu_experts_exactly():
    s = pl.activation_share(HAND_COUNTS, HAND_MASKS, experts_per_token=2)
    # on the GPU: prefill 3 + 4 of 12, decode 1 + 2 of 4
    assert s["share"] == 10 / 16
    assert s["per_layer"] == [4 / 8, 6 / 8]
    assert s["prefill_share"] == 7 / 12 and s["decode_share"] == 3 / 4
    assert (s["activations"], s["activations_on_gpu"], s["passes"], s["tokens"]) == (16, 10, 2, 4)
    assert (s["prefill_passes"], s["decode_passes"]) == (1, 1)
    # a [layers, experts] count (passes summed) gives the same overall share
    assert pl.activation_share(HAND_COUNTS.sum(0), HAND_MASKS)["share"] == 10 / 16


def test_share_takes_each_passs_own_mask():
    per_pass = torch.stack([HAND_MASKS, ~HAND_MASKS])  # the second pass ran the complement
    s = pl.activation_share(HAND_COUNTS, per_pass, experts_per_token=2)
    assert s["share"] == (7 + 1) / 16 and s["decode_share"] == 1 / 4
    summary = pl.mask_summary(per_pass, HAND_COUNTS)
    assert summary["static"] is False and summary["gpu_experts_by_layer"] == [1, 2]
    assert pl.mask_summary(torch.stack([HAND_MASKS, HAND_MASKS]), HAND_COUNTS)["static"] is True


@pytest.mark.parametrize("counts, masks, words", [
    (torch.zeros(1, 2, 4), HAND_MASKS, "no expert activations"),
    (HAND_COUNTS, torch.ones(3, 4, dtype=torch.bool), "do not match"),
])
def test_share_refuses_what_it_cannot_score(counts, masks, words):
    with pytest.raises(UserError, match=words):
        pl.activation_share(counts, masks)


def test_frequency_masks_are_kt_kernels_global_top_k():
    # layer 1 is the busier one: with 2 GPU experts a layer (budget 4) it gets 3, layer 0 gets 1
    counts = torch.tensor([[[9, 1, 0, 0], [8, 7, 6, 0]]])
    masks = pl.frequency_masks(counts, 2)
    assert masks.tolist() == [[True, False, False, False], [True, True, True, False]]
    with pytest.raises(UserError, match="between 0 and 4"):
        pl.frequency_masks(counts, 5)


def test_uniform_masks_are_sglangs_own(sglang_placement):
    masks, source = pl.uniform_masks(4, 16, 3)
    assert torch.equal(masks, sglang_placement.uniform(4, 16, 3 * 4, 0, 1))
    assert masks.sum(dim=1).tolist() == [3, 3, 3, 3] and masks[:, :3].all()
    assert "hybrid" in source and "not installed" in source  # its mirror here, and the record says so


# ---- the engine's files ----------------------------------------------------------------------------


def _dump(folder: Path, when: str, counts: torch.Tensor, masks: torch.Tensor | None = None) -> None:
    """Files named and shaped as sglang's _StatAccumulator / dump_record write them (the masks a
    moment after the counts, each named by its own time.time())."""
    torch.save({"rank": 0, "logical_count": counts.to(torch.int32), "average_utilization_rate_over_window": None},
               str(folder / f"expert_distribution_recorder_{when}.pt"))
    if masks is not None:
        torch.save({"gpu_expert_masks": masks}, str(folder / f"gpu_expert_distribution_{when}9.pt"))


def test_find_dump_takes_the_new_files_of_this_dump(tmp_path):
    _dump(tmp_path, "1733000000.5", HAND_COUNTS)
    (tmp_path / "unrelated.pt").write_bytes(b"x")
    before = pl.dump_listing(tmp_path)
    masks = torch.stack([HAND_MASKS, HAND_MASKS])
    _dump(tmp_path, "1733000100.25", HAND_COUNTS * 2, masks)
    _dump(tmp_path, "1733000200.75", HAND_COUNTS * 3, masks)  # two dumps since: the newest wins
    files = pl.find_dump(tmp_path, before, masks_expected=True)
    assert files.counts.name == "expert_distribution_recorder_1733000200.75.pt"
    assert files.masks.name == "gpu_expert_distribution_1733000200.759.pt"
    assert torch.equal(pl.load_counts(files.counts, 2, 4), HAND_COUNTS * 3)
    assert pl.load_counts(files.counts).dtype == torch.int64
    assert torch.equal(pl.load_masks(files.masks, 2, 4), masks)


def test_find_dump_says_where_the_server_writes_when_nothing_is_new(tmp_path):
    _dump(tmp_path, "1733000000.5", HAND_COUNTS)
    with pytest.raises(UserError, match="SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"):
        pl.find_dump(tmp_path, pl.dump_listing(tmp_path))
    before = pl.dump_listing(tmp_path)
    _dump(tmp_path, "1733000300.0", HAND_COUNTS)  # counts but no masks, though the server records them
    with pytest.raises(UserError, match="gpu_expert_distribution"):
        pl.find_dump(tmp_path, before, masks_expected=True)


def test_placement_file_round_trips_through_sglangs_own_read_back(tmp_path, sglang_placement):
    pt, summary = pl.write_placement(HAND_COUNTS, tmp_path / "traffic.pt", source={"prompt_set": "hand"})
    data = torch.load(str(pt), weights_only=True)  # as sglang-kt loads it
    assert set(data) == {"logical_count"} and data["logical_count"].shape == (1, 2, 4)
    assert data["logical_count"][0].tolist() == HAND_COUNTS.sum(0).tolist()
    assert torch.equal(pl.read_placement(pt, 2, 4), HAND_COUNTS.sum(0, keepdim=True))
    engine = sglang_placement.read_back(pt, 2, 4, gpu_experts=1)
    assert torch.equal(engine, pl.frequency_masks(pl.read_placement(pt), 1))
    info = json.loads(summary.read_text())
    assert info["activations_per_layer"] == [8, 8] and info["hottest_experts_per_layer"][0][0] == [0, 0.5]
    assert info["read_back"] == "--kt-expert-placement-strategy frequency --init-expert-location traffic.pt"


def test_bad_placement_files_are_refused_with_the_fix(tmp_path, sglang_placement):
    other = tmp_path / "other-model.pt"
    torch.save({"logical_count": torch.ones(1, 62, 256, dtype=torch.int32)}, str(other))
    with pytest.raises(UserError, match="62 layers but the model has 4: it was recorded on another model"):
        pl.read_placement(other, 4, 16)
    with pytest.raises(ValueError, match="num_layers"):  # the engine refuses it as well, at launch
        sglang_placement.read_back(other, 4, 16, gpu_experts=4)
    wide = tmp_path / "wide.pt"
    torch.save({"logical_count": torch.ones(1, 4, 256)}, str(wide))
    with pytest.raises(UserError, match="256 experts a layer but the model has 16"):
        pl.read_placement(wide, 4, 16)
    masks_only = tmp_path / "masks.pt"
    torch.save({"gpu_expert_masks": torch.ones(1, 4, 16, dtype=torch.bool)}, str(masks_only))
    with pytest.raises(UserError, match="holds no logical_count .keys: gpu_expert_masks"):
        pl.read_placement(masks_only)
    flat = tmp_path / "flat.pt"
    torch.save({"logical_count": torch.ones(4, 16)}, str(flat))
    with pytest.raises(UserError, match=r"\[passes, layers, experts\], got \(4, 16\)"):
        pl.read_placement(flat)
    junk = tmp_path / "junk.pt"
    junk.write_text("not torch")
    with pytest.raises(UserError, match="not a torch file"):
        pl.read_placement(junk)
    with pytest.raises(UserError, match="must end in .pt"):
        pl.write_placement(HAND_COUNTS, tmp_path / "traffic.json")
    with pytest.raises(UserError, match="no expert activations"):
        pl.write_placement(torch.zeros(1, 4, 16), tmp_path / "empty.pt")


# ---- the prompt set and the launches ----------------------------------------------------------------


def test_shipped_prompt_set_is_disjoint_and_varied():
    ps = pl.load_prompt_set()
    assert len(ps.train) >= 8 and len(ps.heldout) >= 6 and not set(ps.train) & set(ps.heldout)
    lengths = sorted(len(p) for p in ps.train + ps.heldout)
    assert lengths[-1] > 3 * lengths[0]  # short and long requests


def test_bad_prompt_sets_are_refused(tmp_path):
    with pytest.raises(UserError, match="unknown prompt set 'nope'; shipped: placement"):
        pl.load_prompt_set("nope")
    overlap = tmp_path / "overlap.yaml"
    overlap.write_text("train: [a, b]\nheldout: [b, c]\n")
    with pytest.raises(UserError, match="1 are also in train"):
        pl.load_prompt_set(str(overlap))
    empty = tmp_path / "empty.yaml"
    empty.write_text("train: [a]\n")
    with pytest.raises(UserError, match="non-empty train: and heldout:"):
        pl.load_prompt_set(str(empty))


def _cli(argv: list[str]) -> int:
    from ktutorial import cli

    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code or 0


def test_compare_refuses_a_llamacpp_profile_and_names_what_to_use(capsys):
    assert _cli(["placement", "compare", "--profile", "tiny", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no expert-distribution recorder" in err and "tiny-sglang" in err and "ktutorial hybrid routing" in err


def test_record_refuses_a_llamacpp_server(tiny_model, tmp_path):
    from ktutorial import server as srv

    with srv.Server(srv.llamacpp_launch(tiny_model.gguf_path, tiny_model.served_model_name, threads=1)) as running:
        with pytest.raises(UserError, match="not an SGLang server .* llama.cpp has no expert recorder"):
            pl.record_placement(running.base_url, tmp_path / "p.pt", dump_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_compare_dry_run_renders_both_launches_and_sglangs_parser_reads_them(capsys, tmp_path):
    assert _cli(["placement", "compare", "--profile", "tiny-sglang", "--gpu", "H200:141", "--gpu-experts", "4",
                 "--dry-run", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["gpu_experts_per_layer"] == 4 and (shown["num_layers"], shown["num_experts"]) == (4, 16)
    commands = {}
    for strategy, line in shown["commands"].items():
        env, _, rest = line.partition(" python ")
        assert f"{pl.RECORDER_DIR_ENV}=" in env and f"dumps-{strategy}" in env
        commands[strategy] = rest.split()
    out = sglang_kt.check_with_real_parser(list(commands.values()))
    uniform, frequency = (r["values"] for r in out["results"])
    for values in (uniform, frequency):
        assert values["expert_distribution_recorder_mode"] == "stat"
        assert values["expert_distribution_recorder_buffer_size"] == -1
        assert values["record_kt_gpu_expert_distribution"] is True
        assert values["kt_enable_dynamic_expert_update"] is False  # the planner's default is on
        assert values["disable_radix_cache"] is True and values["kt_num_gpu_experts"] == 4
    assert uniform["kt_expert_placement_strategy"] == "uniform" and uniform["init_expert_location"] == "trivial"
    assert frequency["kt_expert_placement_strategy"] == "frequency"
    assert frequency["init_expert_location"].endswith("/placement-train.pt")


# ---- uniform against recorded placement on the tiny model (its own router, kt-kernel's split) ---------


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return hy.open_hybrid(tiny_model.hf_dir)


@pytest.fixture(scope="module")
def offline(loaded, tmp_path_factory):
    h, tok = loaded
    return pl.offline_compare(h, tok, 4, tmp_path_factory.mktemp("placement"), output_tokens=OUTPUT_TOKENS)


def test_router_dump_has_the_recorders_layout(loaded):
    h, tok = loaded
    prompts = pl.load_prompt_set().heldout[:2]
    counts = pl.router_dump(h, tok, prompts, OUTPUT_TOKENS)
    k = h.config.num_experts_per_tok
    assert counts.dtype == torch.int64 and counts.shape == (2 * OUTPUT_TOKENS, h.num_layers, h.num_experts)
    tokens = counts.sum(dim=2) // k  # every token routed once in every layer
    assert (tokens == tokens[:, :1]).all()
    # one prefill pass (the chat-templated prompt), then OUTPUT_TOKENS - 1 single-token decode passes
    lens = [len(hy.chat_prompt_ids(tok, p)) for p in prompts]
    assert tokens[:, 0].tolist() == [n for length in lens for n in [length] + [1] * (OUTPUT_TOKENS - 1)]


def test_recorded_placement_beats_uniform_on_held_out_prompts(offline):
    uniform, frequency = offline["rows"]
    assert (uniform["strategy"], frequency["strategy"]) == ("uniform", "frequency")
    assert frequency["share"]["share"] > uniform["share"]["share"] + 0.05, offline["gain"]
    assert frequency["share"]["decode_share"] > uniform["share"]["decode_share"]
    assert offline["recorded_beats_uniform"] and offline["gain"] == pytest.approx(
        frequency["share"]["share"] - uniform["share"]["share"])
    # same budget (4 x 4 layers), spent unevenly by frequency; uniform is 4 in every layer
    assert uniform["gpu_experts_by_layer"] == [4, 4, 4, 4] and sum(frequency["gpu_experts_by_layer"]) == 16
    # the plain model routes the same whatever the placement: the prediction is the measurement
    assert frequency["predicted_share"] == frequency["share"]["share"]
    assert frequency["share"]["share"] <= offline["oracle_share"] <= 1


def test_placement_file_from_the_tiny_traffic_is_what_sglang_reads_back(offline, sglang_placement):
    path = Path(offline["work_dir"]) / offline["placement_file"]
    engine = sglang_placement.read_back(path, 4, 16, gpu_experts=4)
    expected = pl.frequency_masks(pl.read_placement(path, 4, 16), 4)
    assert torch.equal(engine, expected)
    assert engine.sum(dim=1).tolist() == offline["rows"][1]["gpu_experts_by_layer"]


def test_share_is_what_kt_kernels_split_sees(loaded, offline):
    """The masks in kt-kernel's real split: the share computed from the router's counts equals the
    share of activations the split kept off the CPU, for both placements."""
    h, tok = loaded
    path = Path(offline["work_dir"]) / offline["placement_file"]
    placements = {"uniform": pl.uniform_masks(4, 16, 4)[0], "frequency": pl.frequency_masks(pl.read_placement(path), 4)}
    ids = [hy.chat_prompt_ids(tok, p) for p in pl.load_prompt_set().heldout[:3]]
    h.use("hybrid")
    try:
        for masks in placements.values():
            h.set_masks(masks)
            h.reset_stats()
            counts = []
            for seq in ids:
                chosen = h.trace(seq).chosen  # [layers, tokens, k]
                counts.append(torch.stack([torch.bincount(c.reshape(-1), minlength=16) for c in chosen]))
            stats = h.reset_stats()
            assert stats.gpu_activations > 0 and stats.cpu_activations > 0
            assert pl.activation_share(torch.stack(counts), masks)["share"] == pytest.approx(stats.gpu_share, abs=1e-12)
    finally:
        h.use("plain")


def test_placement_records_describe_both_placements(offline):
    recs = pl.placement_records(offline, env=results.environment_stamp(model="ktutorial-tiny"))
    assert [r["params"]["strategy"] for r in recs] == ["uniform", "frequency"]
    for r in recs:
        results.validate_record(r)
        assert r["kind"] == "placement_share"
        p, m, s = r["params"], r["metrics"], r["samples"]
        assert (p["gpu_experts_per_layer"], p["num_layers"], p["num_experts"]) == (4, 4, 16)
        assert p["dynamic_expert_update"] is False and p["scored_on"] == "heldout"
        assert p["train_prompts"] == len(pl.load_prompt_set().train)
        assert 0 < m["gpu_activation_share"] < 1 and m["min_layer_share"] <= m["max_layer_share"]
        assert m["masks_static"] and m["masks_match_placement"]
        assert m["gpu_activation_share"] <= m["oracle_share"] <= 1
        assert len(s["per_layer_share"]) == 4 and sum(s["gpu_experts_by_layer"]) == 16
        assert "/" not in p["counts_file"] and "/" not in str(p["placement_file"] or "")  # names, no paths
    assert recs[1]["params"]["placement_file"] == "placement-train.pt" and recs[0]["params"]["placement_file"] is None
    assert recs[1]["metrics"]["gpu_activation_share"] > recs[0]["metrics"]["gpu_activation_share"]


def test_compare_cli_prints_both_placements_and_the_gain(offline, monkeypatch, capsys):
    monkeypatch.setattr(pl, "compare", lambda *a, **k: offline)  # the table from a finished comparison
    assert _cli(["placement", "compare", "--profile", "tiny-sglang"]) == 0
    text = capsys.readouterr().out
    uniform, frequency = (r["share"]["share"] for r in offline["rows"])
    assert f"{100 * uniform:.1f}%" in text and f"{100 * frequency:.1f}%" in text
    assert f"recorded minus uniform: {100 * (frequency - uniform):+.1f} points" in text
