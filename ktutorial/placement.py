"""Expert placement from recorded traffic: record which experts SGLang-KT routes to, write the file
its frequency placement reads back, and measure the share of expert activations on GPU experts.

- `record(api, ...)`: against a running SGLang-KT server launched with the expert-distribution
  recorder (`--expert-distribution-recorder-mode stat --expert-distribution-recorder-buffer-size -1`,
  optionally `--record-kt-gpu-expert-distribution`): start, send a prompt set through
  ktutorial.client, stop, dump, and read the files the server wrote into the folder its
  SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR names: `expert_distribution_recorder_<time>.pt` holding
  `logical_count` [passes, layers, experts] and `gpu_expert_distribution_<time>.pt` holding
  `gpu_expert_masks` of the same shape (the GPU-resident experts at each forward pass).
- `write_placement(counts, path)`: the .pt that `--kt-expert-placement-strategy frequency
  --init-expert-location PATH` reads back (`{"logical_count": [1, layers, experts]}`; SGLang-KT
  sums the first axis anyway) and a JSON summary beside it; `read_placement` loads one with the
  checks SGLang-KT makes (key, three axes, the model's layers and experts).
- `activation_share(counts, masks)`: the share of expert activations on GPU experts, overall,
  per layer, and for prefill and decode passes apart.
- The masks: the engine's own dump where it was recorded; otherwise the engine's own functions:
  kt-kernel's `generate_gpu_experts_masks` for frequency (what SGLang-KT calls: counts summed over
  passes, a budget of GPU experts per layer x MoE layers ranked over all layers at once, so
  layers get different counts) and sglang-kt's `generate_uniform_masks` for uniform (experts
  0..N-1 of every layer) where sglang is installed, else ktutorial.hybrid's mirror of it (the
  source is named in what is returned).
- `compare(profile, ...)`: launch A (uniform placement) records the training prompts, then the
  held-out ones; its training traffic becomes the placement file; launch B (frequency placement
  from that file) serves the held-out prompts again. One `placement_share` record per placement.
- `router_dump(h, ...)`: the same counts from the tiny model's own router in transformers (no
  GPU), pass by pass as SGLang counts them: the method, checkable on any machine.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import httpx
import torch
import yaml

from ktutorial import client, hybrid, paths, results, server
from ktutorial.engines.sglang_kt import SGLangAPI, parse_command
from ktutorial.errors import MissingDependency, UserError
from ktutorial.profiles import Profile, load_profile
from ktutorial.tables import Markdown, join, table

RECORDER_DIR_ENV = "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"
SGLANG_DEFAULT_RECORDER_DIR = "/tmp"  # sglang/srt/environ.py's default for the variable
COUNTS_FILE = re.compile(r"^expert_distribution_recorder_(\d+(?:\.\d+)?)\.pt$")  # stat mode, rank 0
MASKS_FILE = re.compile(r"^gpu_expert_distribution_(\d+(?:\.\d+)?)\.pt$")
STRATEGIES = ("uniform", "frequency")
KT_KERNEL_INSTALL = "pip install kt-kernel (the GPU machine has it with sglang-kt)"

# What the comparison's launches add to the profile's plan, and why.
RECORDER_FLAGS: dict[str, Any] = {
    "expert-distribution-recorder-mode": "stat",  # per-pass counts, logical_count [passes, layers, experts]
    "expert-distribution-recorder-buffer-size": -1,  # keep every pass (the default ring of 1000 drops some)
    "record-kt-gpu-expert-distribution": True,  # the GPU-expert masks the engine actually used, per pass
    # Off: with it, after a prefill chunk at or over --kt-gpu-prefill-token-threshold runs a whole
    # layer on the GPU, kt re-places that layer's GPU experts to the batch's hottest, so the
    # placement under test would drift during the run (the planner turns it on for serving).
    "kt-enable-dynamic-expert-update": False,
    # Every request prefills in full: both launches count the same tokens whatever ran before.
    "disable-radix-cache": True,
}


# ---- the prompt set ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSet:
    """Training prompts (recorded, they place the experts) and held-out prompts (scored)."""

    name: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    output_tokens: int = 32
    description: str = ""

    def part(self, which: str) -> tuple[str, ...]:
        if which not in ("train", "heldout"):
            raise UserError(f"prompt set part {which!r}: use train or heldout")
        return self.train if which == "train" else self.heldout


def load_prompt_set(name_or_path: str = "placement") -> PromptSet:
    """A shipped prompt set by name (ktutorial/data/prompts/NAME.yaml) or a YAML file of the same
    shape: name, output_tokens, train: [...], heldout: [...] (disjoint, neither empty)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    else:
        root = resources.files("ktutorial") / "data" / "prompts"
        shipped = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))
        if name_or_path not in shipped:
            raise UserError(f"unknown prompt set {name_or_path!r}; shipped: {', '.join(shipped)} "
                            "(or the path of a .yaml with train: and heldout: lists)")
        text = (root / f"{name_or_path}.yaml").read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"prompt set {name_or_path!r} is not valid YAML: {exc}") from exc
    train = tuple(str(p) for p in data.get("train") or [])
    heldout = tuple(str(p) for p in data.get("heldout") or [])
    if not train or not heldout:
        raise UserError(f"prompt set {name_or_path!r} needs non-empty train: and heldout: lists")
    shared = sorted(set(train) & set(heldout))
    if shared:
        raise UserError(f"prompt set {name_or_path!r}: held-out prompts must be unseen, but {len(shared)} are also "
                        f"in train (first: {shared[0][:60]!r})")
    output_tokens = int(data.get("output_tokens", 32))
    if output_tokens < 1:
        raise UserError(f"prompt set {name_or_path!r}: output_tokens must be at least 1")
    return PromptSet(str(data.get("name") or path.stem), train, heldout, output_tokens,
                     str(data.get("description") or ""))


# ---- the engine's files --------------------------------------------------------------------------


@dataclass(frozen=True)
class DumpFiles:
    counts: Path
    masks: Optional[Path] = None


def dump_listing(folder: str | Path) -> set[str]:
    """Names of the recorder's files in `folder` now (before a dump, to tell the new ones)."""
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if COUNTS_FILE.match(p.name) or MASKS_FILE.match(p.name)}


def _newest(names: Sequence[str], pattern: re.Pattern) -> Optional[str]:
    found = [(float(m.group(1)), n) for n in names if (m := pattern.match(n))]
    return max(found)[1] if found else None


def find_dump(folder: str | Path, before: set[str], masks_expected: bool = False) -> DumpFiles:
    """The files one /dump_expert_distribution_record wrote into `folder`: those not in `before`
    (the newest of each kind, by the time in its name)."""
    folder = Path(folder)
    new = sorted(dump_listing(folder) - set(before))
    counts = _newest(new, COUNTS_FILE)
    if counts is None:
        raise UserError(
            f"no new expert_distribution_recorder_<time>.pt in {folder} after the dump: the server writes into the "
            f"folder its own {RECORDER_DIR_ENV} names (sglang's default {SGLANG_DEFAULT_RECORDER_DIR}); pass that "
            "folder (--dump-dir), and launch with --expert-distribution-recorder-mode stat")
    masks = _newest(new, MASKS_FILE)
    if masks is None and masks_expected:
        raise UserError(f"the server records GPU-expert masks but no new gpu_expert_distribution_<time>.pt "
                        f"appeared in {folder}")
    return DumpFiles(folder / counts, folder / masks if masks else None)


def _load(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        # The server saves CUDA tensors; map them here so a CPU machine reads them too.
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for a file that is not its format
        raise UserError(f"{path} is not a torch file of tensors ({type(exc).__name__}: {str(exc)[:200]})") from exc


def _three_axes(tensor: Any, path: Path, key: str, num_layers: Optional[int], num_experts: Optional[int]) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise UserError(f"{path.name}: {key} must be a tensor [passes, layers, experts], got {shape}")
    _, layers, experts = tensor.shape
    if num_layers is not None and layers != num_layers:
        raise UserError(f"{path.name} counts {layers} layers but the model has {num_layers}: it was recorded on "
                        "another model; record this model's traffic (`ktutorial placement record`)")
    if num_experts is not None and experts != num_experts:
        raise UserError(f"{path.name} counts {experts} experts a layer but the model has {num_experts}: it was "
                        "recorded on another model; record this model's traffic (`ktutorial placement record`)")
    return tensor


def load_counts(path: str | Path, num_layers: Optional[int] = None, num_experts: Optional[int] = None) -> torch.Tensor:
    """`logical_count` [passes, layers, experts] of a recorder dump or a placement file, int64 on
    the CPU, with the checks SGLang-KT makes when it reads one back (kt_ep_wrapper.py: a dict
    with logical_count or a bare tensor, three axes, the model's layer and expert counts)."""
    path = Path(path)
    data = _load(path)
    if isinstance(data, dict):
        if "logical_count" not in data:
            raise UserError(f"{path.name} holds no logical_count (keys: {', '.join(map(str, data)) or 'none'}): "
                            "pass the expert_distribution_recorder_<time>.pt of a stat-mode dump or a placement file")
        data = data["logical_count"]
    return _three_axes(data, path, "logical_count", num_layers, num_experts).to(torch.int64)


def load_masks(path: str | Path, num_layers: Optional[int] = None, num_experts: Optional[int] = None) -> torch.Tensor:
    """`gpu_expert_masks` [passes, layers, experts] (bool) of a gpu_expert_distribution_<time>.pt."""
    path = Path(path)
    data = _load(path)
    if not isinstance(data, dict) or "gpu_expert_masks" not in data:
        raise UserError(f"{path.name} holds no gpu_expert_masks: pass a gpu_expert_distribution_<time>.pt")
    return _three_axes(data["gpu_expert_masks"], path, "gpu_expert_masks", num_layers, num_experts).to(torch.bool)


def write_placement(counts: torch.Tensor, path: str | Path, source: Optional[dict[str, Any]] = None) -> tuple[Path, Path]:
    """Write the placement file SGLang-KT reads back and a JSON summary beside it; returns both paths.

    `counts`: [passes, layers, experts] as dumped (or [layers, experts]). The .pt holds
    {"logical_count": int64 [1, layers, experts]}, the passes summed (SGLang-KT sums them on
    reading; summing here keeps the file small). The name must end in .pt: SGLang-KT reads
    counts only from such a path."""
    path = Path(path)
    if path.suffix != ".pt":
        raise UserError(f"{path.name}: the placement file must end in .pt (SGLang-KT reads counts only from a .pt)")
    counts = torch.as_tensor(counts).to(torch.int64).cpu()
    if counts.dim() == 2:
        counts = counts[None]
    _three_axes(counts, path, "counts", None, None)
    total = counts.sum(dim=0)
    if int(total.sum()) <= 0:
        raise UserError("no expert activations were recorded: send prompts between start and stop")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"logical_count": total[None].clone()}, str(path))
    per_layer = total.sum(dim=1)
    hottest = []
    for layer in range(total.shape[0]):
        order = torch.argsort(total[layer], descending=True, stable=True)[:8]
        hottest.append([[int(e), round(float(total[layer, e]) / max(1, int(per_layer[layer])), 4)] for e in order])
    summary = {
        "file": path.name,
        "format": "torch .pt: {'logical_count': int64 [1, layers, experts]} (SGLang's recorder layout, passes summed)",
        "read_back": f"--kt-expert-placement-strategy frequency --init-expert-location {path.name}",
        "layers": int(total.shape[0]),
        "experts": int(total.shape[1]),
        "passes_recorded": int(counts.shape[0]),
        "activations": int(total.sum()),
        "activations_per_layer": per_layer.tolist(),
        "hottest_experts_per_layer": hottest,  # [expert, share of the layer's activations], 8 a layer
        "source": source or {},
    }
    summary_path = path.with_suffix(".json")
    summary_path.write_text(json.dumps(summary, indent=1))
    return path, summary_path


def read_placement(path: str | Path, num_layers: Optional[int] = None, num_experts: Optional[int] = None) -> torch.Tensor:
    """The counts of a placement file, checked as SGLang-KT checks them (see load_counts)."""
    path = Path(path)
    if path.suffix != ".pt":
        raise UserError(f"{path.name}: SGLang-KT reads placement counts only from a path ending in .pt")
    return load_counts(path, num_layers, num_experts)


# ---- masks and shares ----------------------------------------------------------------------------


def frequency_masks(counts: torch.Tensor, gpu_experts_per_layer: int) -> torch.Tensor:
    """Bool [layers, experts]: SGLang-KT's frequency placement, by kt-kernel's own function.

    As sglang-kt's kt_ep_wrapper does: the counts summed over passes, the budget
    `gpu_experts_per_layer` x MoE layers (every layer of MiniMax-M2 is one), ranked over all
    layers at once, so a busy layer gets more GPU experts than a quiet one."""
    try:
        from kt_kernel import generate_gpu_experts_masks  # optional, heavy: its extension loads
    except ImportError as exc:
        raise MissingDependency("kt-kernel", KT_KERNEL_INSTALL) from exc
    counts = torch.as_tensor(counts)
    freq = (counts.sum(dim=0) if counts.dim() == 3 else counts).float()
    num_layers, num_experts = freq.shape
    _check_budget(gpu_experts_per_layer, num_experts)
    return generate_gpu_experts_masks(freq, gpu_experts_per_layer * num_layers).to(torch.bool)


def uniform_masks(num_layers: int, num_experts: int, gpu_experts_per_layer: int) -> tuple[torch.Tensor, str]:
    """(bool [layers, experts], source): SGLang-KT's uniform placement, experts 0..N-1 of every
    layer, by sglang-kt's own generate_uniform_masks where sglang is installed (the GPU machine),
    else by ktutorial.hybrid's mirror of it."""
    _check_budget(gpu_experts_per_layer, num_experts)
    try:
        from sglang.srt.layers.moe.kt_ep_wrapper import generate_uniform_masks  # optional, heavy
    except Exception as exc:  # not installed, or its CUDA-side imports fail on this machine
        masks = hybrid.placement_masks("uniform", gpu_experts_per_layer, num_layers, num_experts)
        why = "not installed" if isinstance(exc, ImportError) else f"{type(exc).__name__} on import"
        return masks, f"ktutorial.hybrid.placement_masks (sglang {why} here)"
    masks = generate_uniform_masks(num_layers, num_experts, gpu_experts_per_layer * num_layers, 0, 1)
    return masks.to(torch.bool), "sglang kt_ep_wrapper.generate_uniform_masks"


def _check_budget(n: int, num_experts: int) -> None:
    if not 0 <= int(n) <= num_experts:
        raise UserError(f"GPU experts per layer must be between 0 and {num_experts} (the layer's expert count), got {n}")


def activation_share(counts: torch.Tensor, masks: torch.Tensor, experts_per_token: Optional[int] = None) -> dict[str, Any]:
    """Share of expert activations (token x top-k choices) that land on GPU-resident experts.

    `counts`: [passes, layers, experts] or [layers, experts]; `masks`: bool [layers, experts]
    (one placement) or [passes, layers, experts] (each pass's own, as the engine dumps them).
    With `experts_per_token`, passes of one token (decode, one request at a time) and the
    others (prefill) are also scored apart."""
    counts = torch.as_tensor(counts).to(torch.float64)
    masks = torch.as_tensor(masks).to(torch.bool)
    if counts.dim() == 2:
        counts = counts[None]
    if masks.dim() == 2 and counts.dim() == 3 and tuple(masks.shape) == tuple(counts.shape[1:]):
        masks = masks[None].expand_as(counts)
    if counts.dim() != 3 or tuple(masks.shape) != tuple(counts.shape):
        raise UserError(f"counts {tuple(counts.shape)} and masks {tuple(masks.shape)} do not match: both are "
                        "[passes, layers, experts] (or masks [layers, experts])")
    on_gpu = counts * masks
    total = float(counts.sum())
    if total <= 0:
        raise UserError("no expert activations counted: record some traffic first")
    per_layer_total = counts.sum(dim=(0, 2))
    per_layer_gpu = on_gpu.sum(dim=(0, 2))
    out: dict[str, Any] = {
        "share": float(on_gpu.sum()) / total,
        "per_layer": [float(g / t) if t > 0 else None for g, t in zip(per_layer_gpu, per_layer_total)],
        "activations": int(total),
        "activations_on_gpu": int(on_gpu.sum()),
        "passes": int((counts.sum(dim=(1, 2)) > 0).sum()),
    }
    if experts_per_token:
        # Every token is routed once in every MoE layer: layer 0's count / k is the pass's tokens.
        tokens = counts[:, 0, :].sum(dim=-1) / experts_per_token
        for name, sel in (("decode", tokens == 1), ("prefill", tokens > 1)):
            part = counts[sel].sum()
            out[f"{name}_share"] = float(on_gpu[sel].sum() / part) if part > 0 else None
            out[f"{name}_passes"] = int(sel.sum())
        out["tokens"] = int(tokens.sum())
    return out


def mask_summary(masks: torch.Tensor, counts: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """What the engine's per-pass masks show: GPU experts per layer (of the first pass that ran
    the MoE), and whether every such pass had the same placement (static: no dynamic update)."""
    masks = torch.as_tensor(masks).to(torch.bool)
    if masks.dim() == 2:
        return {"gpu_experts_by_layer": masks.sum(dim=1).tolist(), "static": True, "placement": masks}
    ran = masks.flatten(1).any(dim=1)
    if counts is not None:
        ran = ran & (torch.as_tensor(counts).flatten(1).sum(dim=1) > 0)
    if not bool(ran.any()):
        raise UserError("the dumped GPU-expert masks are empty: no forward pass ran a KT MoE layer while recording")
    used = masks[ran]
    first = used[0]
    return {"gpu_experts_by_layer": first.sum(dim=1).tolist(), "static": bool((used == first).all()), "placement": first}


# ---- recording against a running server ------------------------------------------------------------


@dataclass
class Recording:
    """One recorded prompt set: the engine's counts (and masks), and each request's timing."""

    prompts: list[str]
    counts: torch.Tensor  # int64 [passes, layers, experts]
    masks: Optional[torch.Tensor]  # bool [passes, layers, experts], or None when not recorded
    files: DumpFiles
    requests: list[dict[str, Any]] = field(default_factory=list)  # client.StreamTiming.to_dict() each
    settings: dict[str, Any] = field(default_factory=dict)  # the server's recorder settings

    @property
    def decode_tok_s(self) -> list[float]:
        return [r["decode_tok_s"] for r in self.requests if r.get("decode_tok_s")]


def record(
    api: SGLangAPI,
    prompts: Sequence[str],
    dump_dir: str | Path,
    *,
    model: Optional[str] = None,
    output_tokens: int = 32,
    num_layers: Optional[int] = None,
    num_experts: Optional[int] = None,
) -> Recording:
    """Record the expert traffic of `prompts` on the server behind `api`: start the recorder,
    stream each prompt (chat template, greedy, exactly `output_tokens` tokens), stop, dump,
    and load the files the server wrote into `dump_dir` (its SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR)."""
    if not prompts:
        raise UserError("no prompts to record")
    settings = api.recorder_settings()
    masks_expected = bool(settings.get("record_kt_gpu_expert_distribution"))
    api.start_expert_record()
    requests = []
    try:
        for text in prompts:
            api.before_request()
            timing = client.timed_stream(api.base_url, model, text, max_tokens=output_tokens, ignore_eos=True,
                                         temperature=0)
            requests.append(timing.to_dict())
    finally:
        api.stop_expert_record()
    before = dump_listing(dump_dir)
    api.dump_expert_record()
    files = find_dump(dump_dir, before, masks_expected=masks_expected)
    counts = load_counts(files.counts, num_layers, num_experts)
    masks = load_masks(files.masks, num_layers, num_experts) if files.masks else None
    if masks is not None and masks.shape != counts.shape:
        raise UserError(f"{files.masks.name} has {masks.shape[0]} passes but {files.counts.name} {counts.shape[0]}: "
                        "they come from different dumps; dump again")
    return Recording(list(prompts), counts, masks, files, requests, settings)


def record_placement(
    base_url: str,
    out: str | Path,
    *,
    prompt_set: str = "placement",
    part: str = "train",
    dump_dir: str | Path = SGLANG_DEFAULT_RECORDER_DIR,
    model: Optional[str] = None,
    output_tokens: Optional[int] = None,
) -> dict[str, Any]:
    """`ktutorial placement record`: record a prompt set against a running server and write the
    placement file (`out`, a .pt) and its JSON summary. Returns what was written."""
    prompts = load_prompt_set(prompt_set)
    out = Path(out)
    if out.suffix != ".pt":
        raise UserError(f"--out {out.name}: the placement file must end in .pt (SGLang-KT reads counts only from a .pt)")
    with httpx.Client(trust_env=False) as http:
        api = SGLangAPI(base_url, http)
        if not SGLangAPI.serves(base_url, http):
            raise UserError(f"{base_url} is not an SGLang server (no /get_model_info): llama.cpp has no expert "
                            "recorder; serve an SGLang-KT profile (tiny-sglang, minimax-m2.1) on a GPU machine")
        rec = record(api, prompts.part(part), dump_dir, model=model,
                     output_tokens=output_tokens or prompts.output_tokens)
    pt, summary = write_placement(rec.counts, out, source={
        "prompt_set": prompts.name, "part": part, "prompts": len(rec.prompts),
        "counts_file": rec.files.counts.name, "server": {k: v for k, v in rec.settings.items() if k != "init_expert_location"},
    })
    return {"placement_file": str(pt), "summary_file": str(summary), "counts_file": str(rec.files.counts),
            "masks_file": str(rec.files.masks) if rec.files.masks else None, "passes": int(rec.counts.shape[0]),
            "activations": int(rec.counts.sum()), "requests": len(rec.requests)}


# ---- the comparison: uniform against recorded placement, through the engine -----------------------


def _profile(profile: Profile | str, model_dir: Optional[str]) -> Profile:
    prof = profile if isinstance(profile, Profile) else load_profile(str(profile))
    if prof.engine != "sglang-kt":
        raise UserError(
            f"profile {prof.name!r} runs llama.cpp, which has no expert-distribution recorder and no GPU-expert "
            "placement: compare placements with an SGLang-KT profile on a GPU machine (--profile tiny-sglang or "
            "minimax-m2.1-synth), or see the same shares computed in-process on the tiny model (transformers + "
            "kt-kernel, no GPU) with `ktutorial hybrid routing`")
    return prof if model_dir is None else prof.model_copy(update={"model_dir": str(model_dir)})


def _launch(prof: Profile, strategy: str, n: Optional[int], dump_dir: Path, placement_file: Optional[Path],
            plan_options: dict, dry_run: bool, ready_timeout_s: Optional[float]) -> server.Launch:
    overrides = {**RECORDER_FLAGS, "kt-expert-placement-strategy": strategy}
    if n is not None:
        overrides["kt-num-gpu-experts"] = n
    if placement_file is not None:
        overrides["init-expert-location"] = str(placement_file)
    launch = server.prepare(prof, dry_run=dry_run, overrides=overrides, plan_options=plan_options or None,
                            ready_timeout_s=ready_timeout_s)
    launch.env[RECORDER_DIR_ENV] = str(dump_dir)
    launch.profile = f"{prof.name}-placement-{strategy}"
    return launch


def _share_row(strategy: str, rec: Recording, k: int, expected: torch.Tensor, expected_source: str) -> dict[str, Any]:
    masks = rec.masks if rec.masks is not None else expected
    summary = mask_summary(masks, rec.counts)
    share = activation_share(rec.counts, masks, k)
    decode = rec.decode_tok_s
    return {
        "strategy": strategy,
        "share": share,
        "masks_from": "engine dump" if rec.masks is not None else expected_source,
        "gpu_experts_by_layer": summary["gpu_experts_by_layer"],
        "masks_static": summary["static"],
        "masks_match_placement": bool(torch.equal(summary["placement"], expected.to(torch.bool))),
        "expected_masks_from": expected_source,
        "decode_tok_s": decode,
        "files": rec.files,
        "requests": rec.requests,
    }


def placement_records(comparison: dict[str, Any], env: Optional[dict] = None) -> list[dict[str, Any]]:
    """One `placement_share` record per placement of a compare() result."""
    env = env if env is not None else results.environment_stamp(engine="sglang-kt", model=comparison["model"])
    records = []
    for row in comparison["rows"]:
        share = row["share"]
        per_layer = [s for s in share["per_layer"] if s is not None]
        decode = row["decode_tok_s"]
        records.append(results.make_record(
            "placement_share",
            params={
                "profile": comparison["profile"],
                "model": comparison["model"],
                "strategy": row["strategy"],
                "gpu_experts_per_layer": comparison["gpu_experts_per_layer"],
                "num_layers": comparison["num_layers"],
                "num_experts": comparison["num_experts"],
                "experts_per_token": comparison["experts_per_token"],
                "prompt_set": comparison["prompt_set"],
                "train_prompts": comparison["train_prompts"],
                "heldout_prompts": comparison["heldout_prompts"],
                "output_tokens": comparison["output_tokens"],
                "scored_on": "heldout",
                "measured_with": comparison["measured_with"],
                "placement_file": comparison["placement_file"] if row["strategy"] == "frequency" else None,
                "counts_file": row["files"].counts.name,
                "masks_file": row["files"].masks.name if row["files"].masks else None,
                "masks_from": row["masks_from"],
                "expected_masks_from": row["expected_masks_from"],
                "dynamic_expert_update": False,
                "kt_gpu_prefill_token_threshold": comparison.get("kt_gpu_prefill_token_threshold"),
            },
            metrics={
                "gpu_activation_share": share["share"],
                "decode_gpu_activation_share": share.get("decode_share"),
                "prefill_gpu_activation_share": share.get("prefill_share"),
                "predicted_share": row.get("predicted_share"),
                "oracle_share": comparison.get("oracle_share"),
                "min_layer_share": min(per_layer) if per_layer else None,
                "max_layer_share": max(per_layer) if per_layer else None,
                "activations": share["activations"],
                "forward_passes": share["passes"],
                "decode_passes": share.get("decode_passes"),
                "tokens": share.get("tokens"),
                "masks_static": row["masks_static"],
                "masks_match_placement": row["masks_match_placement"],
                "decode_tok_s": statistics.median(decode) if decode else None,
                "requests": len(row["requests"]),
            },
            samples={
                "per_layer_share": share["per_layer"],
                "gpu_experts_by_layer": row["gpu_experts_by_layer"],
                "decode_tok_s": decode,
                "heldout_counts": row["heldout_counts"],
                "train_counts": comparison["train_counts"],
            },
            env=env,
        ))
    return records


def compare(
    profile: Profile | str,
    gpu_experts: Optional[int] = None,
    *,
    out: Optional[str | Path] = None,
    prompt_set: str = "placement",
    model_dir: Optional[str] = None,
    work_dir: Optional[str | Path] = None,
    plan_options: Optional[dict] = None,
    dry_run: bool = False,
    ready_timeout_s: Optional[float] = None,
) -> dict[str, Any]:
    """Uniform against recorded placement on held-out prompts, through the engine.

    Launch A (uniform, recorder on) records the training prompts, dumps (the traffic), records
    the held-out prompts, dumps; the traffic becomes the placement file; launch B (frequency
    from that file, recorder on) records the held-out prompts, dumps. Each server is stopped
    before the next starts. `out`: a JSONL file for the two `placement_share` records (appended
    as each launch finishes). `dry_run`: the two commands, nothing started."""
    prof = _profile(profile, model_dir)
    prompts = load_prompt_set(prompt_set)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    work = Path(work_dir) if work_dir else paths.home() / "placement" / f"{prof.name}-{stamp}"
    if gpu_experts is None:
        gpu_experts = prof.sglang.get("kt-num-gpu-experts")
    dumps = {s: work / f"dumps-{s}" for s in STRATEGIES}
    placement_file = work / "placement-train.pt"
    opts = dict(plan_options or {})
    launch_a = _launch(prof, "uniform", gpu_experts, dumps["uniform"], None, opts, dry_run, ready_timeout_s)
    flags = parse_command(launch_a.command)
    if gpu_experts is None:  # the plan's own count
        gpu_experts = int(flags["kt-num-gpu-experts"])
    spec = launch_a.plan.spec
    _check_budget(gpu_experts, spec.num_experts)

    def launch_b() -> server.Launch:  # prepared when it starts: its port is free then
        return _launch(prof, "frequency", gpu_experts, dumps["frequency"], placement_file, opts, dry_run,
                       ready_timeout_s)

    threshold = flags.get("kt-gpu-prefill-token-threshold")
    info: dict[str, Any] = {
        "profile": prof.name,
        "model": launch_a.model,
        "measured_with": "sglang-kt",
        "gpu_experts_per_layer": int(gpu_experts),
        "num_layers": spec.num_layers,
        "num_experts": spec.num_experts,
        "experts_per_token": spec.experts_per_token,
        "prompt_set": prompts.name,
        "train_prompts": len(prompts.train),
        "heldout_prompts": len(prompts.heldout),
        "output_tokens": prompts.output_tokens,
        "placement_file": placement_file.name,
        "kt_gpu_prefill_token_threshold": int(threshold) if threshold else None,
        "work_dir": str(work),
    }
    if dry_run:
        return {**info, "dry_run": True, "commands": {"uniform": launch_a.shell(), "frequency": launch_b().shell()}}
    shape = dict(num_layers=spec.num_layers, num_experts=spec.num_experts)
    env = results.environment_stamp(engine="sglang-kt", model=launch_a.model)

    def run(launch: server.Launch, parts: Sequence[str]) -> list[Recording]:
        dump_dir = Path(launch.env[RECORDER_DIR_ENV])
        dump_dir.mkdir(parents=True, exist_ok=True)
        with server.Server(launch) as srv, httpx.Client(trust_env=False) as http:
            api = SGLangAPI(srv.base_url, http)
            return [record(api, prompts.part(p), dump_dir, model=srv.model, output_tokens=prompts.output_tokens,
                           **shape) for p in parts]

    train, heldout_a = run(launch_a, ("train", "heldout"))
    row_a, expected_frequency = _score_uniform(info, train, heldout_a, placement_file)
    if out is not None:
        for rec in placement_records(info, env):
            results.append_record(out, rec)
    (heldout_b,) = run(launch_b(), ("heldout",))
    row_b = _score_frequency(info, heldout_b, expected_frequency)
    if out is not None:
        results.append_record(out, placement_records({**info, "rows": [row_b]}, env)[0])
    return info


def _score_uniform(info: dict[str, Any], train: Recording, heldout: Recording,
                   placement_file: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """After the uniform run: write the placement file from its training traffic, score its
    held-out traffic, and predict the frequency placement's share on that same traffic.
    Returns (the uniform row, the frequency masks SGLang-KT will compute from the file)."""
    L, E, n, k = info["num_layers"], info["num_experts"], info["gpu_experts_per_layer"], info["experts_per_token"]
    write_placement(train.counts, placement_file, source={
        "profile": info["profile"], "prompt_set": info["prompt_set"], "part": "train",
        "prompts": info["train_prompts"], "counts_file": train.files.counts.name, "placement_when_recorded": "uniform"})
    expected_uniform, uniform_source = uniform_masks(L, E, n)
    expected_frequency = frequency_masks(read_placement(placement_file, L, E), n)
    info["train_counts"] = train.counts.sum(dim=0).tolist()
    row = _share_row("uniform", heldout, k, expected_uniform, uniform_source)
    row["heldout_counts"] = heldout.counts.sum(dim=0).tolist()
    row["predicted_share"] = activation_share(heldout.counts, expected_uniform)["share"]
    # The frequency placement scored on this held-out traffic: what the frequency run should
    # measure if its replies route as these did (they differ by GPU-vs-CPU rounding only).
    info["_predicted_frequency"] = activation_share(heldout.counts, expected_frequency)["share"]
    # The most this budget could keep on the GPU: frequency fitted on the held-out traffic itself.
    info["oracle_share"] = activation_share(heldout.counts, frequency_masks(heldout.counts, n))["share"]
    info["rows"] = [row]
    return row, expected_frequency


def _score_frequency(info: dict[str, Any], heldout: Recording, expected: torch.Tensor) -> dict[str, Any]:
    row = _share_row("frequency", heldout, info["experts_per_token"], expected,
                     "kt_kernel.generate_gpu_experts_masks on the placement file")
    row["heldout_counts"] = heldout.counts.sum(dim=0).tolist()
    row["predicted_share"] = info.pop("_predicted_frequency")
    info["rows"] = [*info["rows"], row]
    info["gain"] = row["share"]["share"] - info["rows"][0]["share"]["share"]
    info["recorded_beats_uniform"] = info["gain"] > 0
    return row


def offline_compare(h: hybrid.Hybrid, tokenizer, gpu_experts: int, work_dir: str | Path, *,
                    prompt_set: str = "placement", output_tokens: Optional[int] = None,
                    model: str = "ktutorial-tiny") -> dict[str, Any]:
    """compare()'s scoring without an engine: the recorder's counts come from the model's own
    router in transformers (router_dump) and the masks from the engine's own functions.
    Routing does not depend on placement here, so the held-out traffic of both placements is
    the same; compare() through the engine is the measurement, this is its method on any machine."""
    prompts = load_prompt_set(prompt_set)
    tokens = output_tokens or prompts.output_tokens
    work = Path(work_dir)
    placement_file = work / "placement-train.pt"
    _check_budget(gpu_experts, h.num_experts)
    info: dict[str, Any] = {
        "profile": "in-process", "model": model, "measured_with": "transformers router (in-process)",
        "gpu_experts_per_layer": int(gpu_experts), "num_layers": h.num_layers, "num_experts": h.num_experts,
        "experts_per_token": h.config.num_experts_per_tok, "prompt_set": prompts.name,
        "train_prompts": len(prompts.train), "heldout_prompts": len(prompts.heldout), "output_tokens": tokens,
        "placement_file": placement_file.name, "kt_gpu_prefill_token_threshold": None, "work_dir": str(work),
    }
    work.mkdir(parents=True, exist_ok=True)
    recordings = {}
    for part in ("train", "heldout"):
        counts = router_dump(h, tokenizer, prompts.part(part), tokens)
        path = work / f"expert_distribution_recorder_{part}.pt"
        torch.save({"logical_count": counts}, str(path))  # the layout the engine dumps
        recordings[part] = Recording(list(prompts.part(part)), counts, None, DumpFiles(path))
    _, expected_frequency = _score_uniform(info, recordings["train"], recordings["heldout"], placement_file)
    _score_frequency(info, recordings["heldout"], expected_frequency)
    return info


def comparison_json(info: dict[str, Any]) -> dict[str, Any]:
    """compare()'s result without tensors and paths objects: what the CLI prints."""
    out = {k: v for k, v in info.items() if k not in ("rows", "train_counts")}
    out["rows"] = [
        {"strategy": r["strategy"], **{k: r["share"].get(k) for k in ("share", "decode_share", "prefill_share",
                                                                       "per_layer", "activations", "passes")},
         "predicted_share": r.get("predicted_share"), "gpu_experts_by_layer": r["gpu_experts_by_layer"],
         "masks_from": r["masks_from"], "masks_static": r["masks_static"],
         "masks_match_placement": r["masks_match_placement"],
         "decode_tok_s": statistics.median(r["decode_tok_s"]) if r["decode_tok_s"] else None,
         "counts_file": r["files"].counts.name, "masks_file": r["files"].masks.name if r["files"].masks else None}
        for r in info.get("rows", [])
    ]
    return out


def comparison_table(shown: dict[str, Any]) -> Markdown:
    """comparison_json()'s rows as a table: the share of expert activations on GPU experts for each
    placement on the held-out prompts, and what recorded placement gains over uniform."""
    def pct(v: Optional[float]) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    rows = [{"placement": r["strategy"], "share": pct(r["share"]), "decode": pct(r["decode_share"]),
             "prefill": pct(r["prefill_share"]), "predicted": pct(r["predicted_share"]),
             "GPU experts by layer": " ".join(map(str, r["gpu_experts_by_layer"])),
             "decode tok/s": "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"} for r in shown["rows"]]
    return join(f"Expert activations on GPU experts, held-out prompts ({shown['gpu_experts_per_layer']} GPU experts "
                f"a layer, {shown['profile']})", table(rows),
                f"recorded minus uniform: {100 * shown['gain']:+.1f} points")


# ---- the same counts without a GPU: the tiny model's own router -----------------------------------


def router_dump(h: hybrid.Hybrid, tokenizer, prompts: Sequence[str], output_tokens: int = 32) -> torch.Tensor:
    """int64 [passes, layers, experts] as SGLang's stat recorder dumps it for `prompts` served one
    at a time with `output_tokens` greedy tokens each: one prefill pass per prompt (its chat-
    templated tokens), then one decode pass per generated token fed back (output_tokens - 1 of
    them; the last token is never fed). Routed by the model's own router in transformers
    (Hybrid.trace: the router is causal, so one pass over prompt + reply routes each token as
    incremental decoding does)."""
    passes = []
    for text in prompts:
        ids = hybrid.chat_prompt_ids(tokenizer, text)
        reply, _ = h.greedy(ids, output_tokens, ignore_eos=True)
        fed = reply[:-1]
        chosen = h.trace(ids + fed).chosen  # [layers, tokens, k]
        spans = [(0, len(ids))] + [(len(ids) + i, len(ids) + i + 1) for i in range(len(fed))]
        for start, stop in spans:
            ids_pass = chosen[:, start:stop, :].reshape(h.num_layers, -1)
            passes.append(torch.stack([torch.bincount(row, minlength=h.num_experts) for row in ids_pass]))
    return torch.stack(passes).to(torch.int64)
