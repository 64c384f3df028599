"""The `ktutorial` command: a thin layer over the modules. Each command parses its options,
calls one library function, and prints the result (a table, or JSON with --json).

Library errors that a reader can fix (bad input, a missing file, a busy port) derive from
`ktutorial.errors.UserError`; they print as one line with the fix and exit 2, not a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal as _signal
import sys
import time
import time as _time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ktutorial import __version__, ccproxy, client, lab, load, perfmodel, published_launch, results, server, tune, tutorial
from ktutorial import bench as benchmod
from ktutorial import claude_code as cc
from ktutorial import download as dl
from ktutorial import kernel_bench as kb
from ktutorial import report as reportmod
from ktutorial import results as records
from ktutorial import selftest as st
from ktutorial import server as srv
from ktutorial import synth as synth_mod
from ktutorial import tiny as tiny_mod
from ktutorial.docs import build_site
from ktutorial.doctor import doctor, plan_for
from ktutorial.engines import sglang_kt
from ktutorial.errors import UserError
from ktutorial.profiles import load_profile

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Serve MiniMax-M2.1 with SGLang + KT-Kernel on one workstation, reproducibly.",
)
console = Console()
err_console = Console(stderr=True)


def print_json(obj) -> None:
    """JSON on stdout, nothing else: scripts pipe it."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ==== section: foundation (spec, tiny, selftest) ===========================================
@app.command()
def version() -> None:
    """Print ktutorial's version."""
    print(__version__)


@app.command()
def tiny(
    out: str = typer.Option(..., "--out", help="Folder to write hf/ and gguf/model.gguf into."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    force: bool = typer.Option(False, "--force", help="Overwrite hf/ and gguf/ in a non-empty folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the paths as JSON."),
) -> None:
    """Generate the tiny MiniMax-M2-architecture model (HF FP8 folder + GGUF) from a seed."""
    model = tiny_mod.generate(out, seed=seed, force=force)
    info = {"hf_dir": str(model.hf_dir), "gguf_path": str(model.gguf_path), "seed": seed,
            "served_model_name": model.served_model_name}
    if as_json:
        print_json(info)
    else:
        console.print(f"tiny model (seed {seed}): {model.hf_dir} and {model.gguf_path}", highlight=False)


@app.command()
def synth(
    out: str = typer.Option(..., "--out", help="Folder to write the checkpoint into (serve it from there)."),
    layers: int = typer.Option(..., "--layers", min=1, help="num_hidden_layers (M2.1 has 62); each layer is 3.7 GB."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    routing: str = typer.Option("random", "--routing", help="random (near-uniform experts) or skewed (a few hot experts a layer)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the files a previous synth wrote in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Generate a full-width, truncated-depth MiniMax-M2.1 checkpoint (random FP8) for SGLang-KT."""
    model = synth_mod.generate(out, layers=layers, seed=seed, routing=routing, force=force)
    info = model.summary()
    if as_json:
        print_json(info)
    else:
        console.print(f"{info['name']}: {info['total_gb']} GB in {info['shards']} shards at {model.path}, "
                      f"written in {info['seconds']} s ({info['gb_per_s']} GB/s)", highlight=False)


@app.command()
def selftest(
    threads: int = typer.Option(2, "--threads", min=1, help="CPU threads for kt-kernel and llama.cpp."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Generate the tiny model, run kt-kernel FP8 and llama.cpp on it for real, and check both."""
    report = st.run(threads=threads)
    if as_json:
        print_json(report)
    else:
        kt, ll = report["kt_kernel"], report["llamacpp"]
        mark = lambda ok: "[green]pass[/]" if ok else "[bold red]FAIL[/]"  # noqa: E731
        console.print(f"tiny model: {report['tiny']['layers']} layers, {report['tiny']['experts']} experts, "
                      f"generated in {report['tiny']['seconds']} s")
        console.print(f"kt-kernel FP8 ({kt['variant']} build): rel err {kt['rel_err']:.2e} "
                      f"(limit {kt['rel_err_limit']:.0e}), masked experts skipped: "
                      f"{kt['masked_experts_skipped']} -> {mark(kt['ok'])}")
        if kt["warning"]:
            console.print(f"[yellow]warning:[/] {kt['warning']}", highlight=False)
        console.print(f"llama.cpp OpenAI chat: {ll['chat_answer']!r} -> {mark(ll['chat_ok'])}", highlight=False)
        console.print(f"llama.cpp Anthropic messages: {ll['messages_answer']!r} -> {mark(ll['messages_ok'])}",
                      highlight=False)
        console.print(f"server stopped: {mark(ll['stopped'])}")
        console.print(f"selftest {'passed' if report['ok'] else 'FAILED'} in {report['seconds']} s")
    if as_json and report["kt_kernel"].get("warning"):
        err_console.print(f"warning: {report['kt_kernel']['warning']}", highlight=False)
    raise typer.Exit(0 if report["ok"] else 1)


# ==== end section: foundation ===============================================================

# ==== section: check, plan and fetch (hardware, plan, doctor, download, verify) ============
@app.command("doctor")
def doctor_cmd(
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    disk_path: str = typer.Option("~/models", "--disk-path", help="Where the checkpoint would go (free disk is checked there)."),
) -> None:
    """This machine against the MiniMax-M2.1 tutorial's needs, each missing thing with its fix,
    and whether the tiny profile runs here. Exits 1 only when the tiny profile cannot run."""
    report = doctor(disk_path=os.path.expanduser(disk_path))
    if json_out:
        print_json(report.as_dict())
    else:
        console.print(report)
    if not report.tiny_ready:
        raise typer.Exit(1)


@app.command("plan")
def plan_cmd(
    model: Optional[str] = typer.Option(
        None, "--model", help="A known model (ktutorial ships its config): minimax-m2.1 (the default), minimax-m2.5."),
    model_dir: Optional[str] = typer.Option(
        None, "--model-dir", help="A checkpoint folder: reads its config.json (any MiniMax-M2-architecture model)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Describe a GPU: NAME:GB, e.g. 'RTX 5090:32' (the maker's GB, i.e. GiB)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="How many of --gpu."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Tensor-parallel size (default: the most GPUs the model splits over)."),
    ram_gb: Optional[float] = typer.Option(None, "--ram-gb", help="Describe host RAM in GB (default for a described machine: 256)."),
    cpu_cores: Optional[int] = typer.Option(None, "--cpu-cores", help="Describe physical CPU cores (default 32)."),
    logical_cpus: Optional[int] = typer.Option(None, "--logical-cpus", help="Describe logical CPUs when SMT is on (default: = cores)."),
    numa_nodes: Optional[int] = typer.Option(None, "--numa-nodes", help="Describe NUMA nodes (default 1)."),
    cpu_flags: Optional[str] = typer.Option(
        None, "--cpu-flags", help="Describe CPU flags: avx2,avx512f,avx512bw,avx512_vnni,avx512_vbmi,avx512_bf16,amx_tile,..."),
    context_tokens: Optional[int] = typer.Option(None, "--context-tokens", help="Longest context one request must fit (default 65536)."),
    kv_dtype: str = typer.Option("bf16", "--kv-dtype", help="KV cache: bf16 or fp8 (half the bytes)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Fix a setting: FLAG=VALUE (sglang-kt flag name); repeat it."),
    json_out: bool = typer.Option(False, "--json", help="Print {verdict, reasons, settings, memory, command} as JSON."),
) -> None:
    """Launch settings for SGLang + KT with a reason each, where the memory goes, and whether it
    fits. Plans for this machine unless you describe one (--gpu, --ram-gb, ...). Exits 1 when it
    does not fit."""
    plan = plan_for(model=model, model_dir=model_dir, gpu=gpu, gpus=gpus, tp=tp, ram_gb=ram_gb,
                    cpu_cores=cpu_cores, numa_nodes=numa_nodes, cpu_flags=cpu_flags,
                    context_tokens=context_tokens, kv_dtype=kv_dtype, sets=sets, logical_cpus=logical_cpus)
    # A plan that fits renders a validated command; one that does not still shows what it would run.
    try:
        command = sglang_kt.render_command(plan, python="python")
    except sglang_kt.SettingsError:
        if plan.fits:
            raise
        command = None
    env = sglang_kt.render_env(plan)
    predicted = perfmodel.predict_plan(plan)  # the committed fit, scaled to this machine and these settings
    if json_out:
        print_json({**plan.as_dict(), "command": command, "env": env,
                    "shell": sglang_kt.command_line(command, env) if command else None, "predicted": predicted})
    else:
        console.print(plan)
        if predicted["available"]:
            cells = ", ".join(f"{n}: {p['prefill_tok_s']:.0f} / {p['decode_tok_s']:.1f}" for n, p in predicted["by_prompt_len"].items())
            console.print(f"predicted prefill / decode tok/s by prompt length: {cells} ({predicted['note']})",
                          highlight=False, soft_wrap=True)
        else:
            console.print(f"predicted: none ({predicted['reason']})", highlight=False, soft_wrap=True)
        if command is not None:
            console.print("command:", highlight=False)
            print(sglang_kt.command_line(command, env))
    if not plan.fits:
        raise typer.Exit(1)


@app.command("published-launch")
def published_launch_cmd(
    name: str = typer.Argument("minimax-m2.5", help="A published launch or its model (data/published_launches.yaml)."),
    json_out: bool = typer.Option(False, "--json", help="Print the check as JSON."),
) -> None:
    """A tutorial's published launch command re-planned on the machine it names: fits or not, with
    the numbers, and the RAM and storage the tutorial states checked against the arithmetic."""
    check = published_launch.check_launch(name)
    if json_out:
        print_json(check)
    else:
        for line in published_launch.summary_lines(check):
            console.print(line, highlight=False, soft_wrap=True)
    if check["verdict"] != "fits":
        raise typer.Exit(1)


@app.command("download")
def download_cmd(
    local_dir: str = typer.Option(..., "--local-dir", help="Folder to download into (created if needed)."),
    model: Optional[str] = typer.Option(None, "--model", help="A known model, e.g. minimax-m2.1."),
    repo: Optional[str] = typer.Option(None, "--repo", help="Any hub repo ORG/NAME, instead of --model."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit (default: the model's)"),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)"),
    include: Optional[list[str]] = typer.Option(None, "--include", help="Glob of files to fetch; repeat it."),
    workers: int = typer.Option(8, "--workers", help="Files fetched in parallel."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be fetched and whether it fits."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Download a model from the Hugging Face hub: checks free disk first, resumes, keeps a manifest
    for `ktutorial verify`. The token comes from HF_TOKEN and is never printed."""
    if (model is None) == (repo is None):
        raise UserError("pass exactly one of --model NAME (e.g. --model minimax-m2.1) or --repo ORG/NAME")
    repo_id, default_rev = dl.repo_for_model(model) if model else (repo, "main")
    revision = revision or default_rev
    if model and (note := dl.unpinned_note(model, revision)):
        typer.echo(f"note: {note}", err=True)  # stderr: --json output stays one document
    if dry_run:
        plan = dl.plan_download(repo_id, local_dir, revision, include, endpoint)
        if json_out:
            print_json(plan.summary())
        else:
            for k, v in plan.summary().items():
                console.print(f"{k:>18}  {v}", highlight=False)
            if not plan.fits:
                console.print(f"[bold red]{plan.refusal()}[/]", highlight=False)
        raise typer.Exit(0 if plan.fits else 1)
    result = dl.download(repo_id, local_dir, revision, include, max_workers=workers, endpoint=endpoint)
    if json_out:
        print_json(result.summary())
        return
    s = result.summary()
    console.print(
        f"[green]downloaded[/] {repo_id}@{result.commit[:12]} into {result.local_dir}: "
        f"{result.files} files, {dl.format_bytes(result.bytes_total)} "
        f"({result.files_fetched} fetched, {dl.format_bytes(result.bytes_fetched)}"
        + (f", {s['fetched_mb_per_s']} MB/s" if s["fetched_mb_per_s"] else "")
        + f"); check it with: ktutorial verify {result.local_dir}",
        highlight=False,
    )


@app.command("verify")
def verify_cmd(
    model_dir: str = typer.Argument(..., help="The folder ktutorial download wrote."),
    sha256: bool = typer.Option(False, "--sha256", help="Also compare checksums with the hub's (reads every byte)"),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a downloaded checkpoint: shards present and of the hub's size, headers readable, every
    expert tensor of every layer present. Exits 1 naming each bad file."""
    report = dl.verify(model_dir, check_sha256=sha256)
    if json_out:
        print_json(report.to_dict())
    else:
        for note in report.notes:
            console.print(f"note: {note}", highlight=False)
        if report.ok:
            console.print(
                f"[green]ok[/] {model_dir}: {report.files_checked} files, {report.shards_checked} shards, "
                f"{report.tensors_checked} tensors, {report.expert_tensors_expected} expert tensors, "
                f"{report.sha256_checked} checksums",
                highlight=False,
            )
        else:
            title = f"verify {model_dir}: {len(report.bad_files)} bad file(s)"
            table = Table("file", "problem", "detail", title=title)
            for p in report.problems:
                table.add_row(p.path, p.kind, p.detail)
            console.print(table)
            console.print("fix: run the same `ktutorial download` again (it refetches files of the wrong "
                          "size); for a checksum mismatch delete the file first", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


# ==== end section: check, plan and fetch ====================================================

# ==== section: serve and talk (serve, stop, status, chat) ==================================
def _print_launch(launch) -> None:
    if launch.plan is not None:
        console.print(launch.plan)
    console.print(f"[bold]{launch.engine}[/] command (served as {launch.model!r}):", highlight=False)
    print(launch.shell())


@app.command("serve")
def serve_cmd(
    profile: str = typer.Option("tiny", "--profile", help="tiny, minimax-m2.1, or a profile .yaml."),
    port: Optional[int] = typer.Option(None, "--port", help="Port on 127.0.0.1 (default: a free one)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the validated command (and plan); start nothing."),
    detach: bool = typer.Option(False, "--detach", help="Leave it running in the background; `ktutorial stop` ends it."),
    reuse: bool = typer.Option(False, "--reuse", help="If a server for this profile already runs, use it."),
    ready_timeout: Optional[float] = typer.Option(None, "--ready-timeout", help="Seconds to wait until it answers."),
    threads: Optional[int] = typer.Option(None, "--threads", help="llama.cpp: CPU threads (profile's default)."),
    ctx_size: Optional[int] = typer.Option(None, "--ctx-size", help="llama.cpp: context tokens."),
    llama_server: Optional[str] = typer.Option(None, "--llama-server", help="llama.cpp: a llama-server binary instead of xllamacpp."),
    cpu_moe: bool = typer.Option(False, "--cpu-moe", help="llama.cpp: all MoE experts in host memory."),
    n_cpu_moe: Optional[int] = typer.Option(None, "--n-cpu-moe", help="llama.cpp: experts of the first N layers in host memory."),
    override_tensor: Optional[list[str]] = typer.Option(None, "--override-tensor", help="llama.cpp: REGEX=BUFFER, e.g. exps=CPU; repeat it."),
    n_gpu_layers: Optional[int] = typer.Option(None, "--n-gpu-layers", help="llama.cpp: layers on the GPU (default: all that fit)."),
    no_op_offload: bool = typer.Option(False, "--no-op-offload", help="llama.cpp: no GPU offload of host-resident weights' matmuls."),
    reasoning_format: str = typer.Option("deepseek", "--reasoning-format", help="llama.cpp: deepseek (split reasoning off) or none (inline <think>)."),
    model_dir: Optional[str] = typer.Option(None, "--model-dir", help="SGLang: the checkpoint folder (default: the profile's)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="SGLang plan: describe a GPU, NAME:GB, e.g. 'RTX 5090:32'."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="SGLang plan: how many of --gpu."),
    tp: Optional[int] = typer.Option(None, "--tp", help="SGLang plan: tensor-parallel size."),
    ram_gb: Optional[float] = typer.Option(None, "--ram-gb", help="SGLang plan: describe host RAM in GB."),
    cpu_cores: Optional[int] = typer.Option(None, "--cpu-cores", help="SGLang plan: describe physical CPU cores."),
    logical_cpus: Optional[int] = typer.Option(None, "--logical-cpus", help="SGLang plan: describe logical CPUs."),
    numa_nodes: Optional[int] = typer.Option(None, "--numa-nodes", help="SGLang plan: describe NUMA nodes."),
    cpu_flags: Optional[str] = typer.Option(None, "--cpu-flags", help="SGLang plan: describe CPU flags, e.g. avx2,avx512f,avx512_bf16."),
    context_tokens: Optional[int] = typer.Option(None, "--context-tokens", help="SGLang plan: longest context to fit (default: the profile's)."),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help="SGLang plan: bf16 or fp8."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="SGLang plan: fix a setting FLAG=VALUE; repeat it."),
    json_out: bool = typer.Option(False, "--json", help="Print the server (or the dry-run launch) as JSON."),
) -> None:
    """Start a model server for a profile: llama.cpp for tiny, SGLang + KT for minimax-m2.1
    (planned for this machine, or for one described with the plan options, as `ktutorial plan`).

    Without --detach it runs in the foreground until Ctrl-C, then stops the server."""
    plan_options = dict(
        model_dir=model_dir, gpu=gpu, gpus=gpus, tp=tp, ram_gb=ram_gb, cpu_cores=cpu_cores,
        logical_cpus=logical_cpus, numa_nodes=numa_nodes, cpu_flags=cpu_flags, context_tokens=context_tokens,
        kv_dtype=kv_dtype, sets=sets,
    )
    options = dict(
        threads=threads, ctx_size=ctx_size, llama_server=llama_server, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe,
        override_tensor=override_tensor, n_gpu_layers=n_gpu_layers, op_offload=False if no_op_offload else None,
        reasoning_format=reasoning_format, ready_timeout_s=ready_timeout,
        plan_options={k: v for k, v in plan_options.items() if v is not None},
    )
    if dry_run:
        launch = srv.prepare(profile, port, dry_run=True, **options)
        if json_out:
            print_json({"engine": launch.engine, "model": launch.model, "command": launch.command,
                        "env": launch.env, "shell": launch.shell(),
                        "plan": launch.plan.as_dict() if launch.plan is not None else None})
        else:
            _print_launch(launch)
        return
    server = srv.serve(profile, port, detach=detach, reuse=reuse, **options)
    if json_out:
        print_json(server.state())
    else:
        console.print(
            f"[green]ready[/] {server.engine} serving {server.model!r} at {server.base_url} "
            f"(pid {server.pid}; log {server.log_path})",
            highlight=False,
            soft_wrap=True,
        )
    if detach or not server.owned:  # detached, or found running (--reuse): leave it be
        if not json_out:
            console.print("stop it with: ktutorial stop", highlight=False)
        return

    def _interrupt(signum, frame):  # SIGTERM to this command stops the server like Ctrl-C
        raise KeyboardInterrupt

    _signal.signal(_signal.SIGTERM, _interrupt)
    err_console.print("serving in the foreground; Ctrl-C stops it", highlight=False)
    try:
        while server.is_alive():
            _time.sleep(0.5)
        rc = server.returncode()
        err_console.print(f"[bold red]error:[/] the server exited (code {rc}); log: {server.log_path}", highlight=False)
        for diagnosis in server.diagnoses(rc):
            err_console.print(f"  - {diagnosis}", highlight=False)
        server.stop()
        raise typer.Exit(1)
    except KeyboardInterrupt:
        server.stop()
        err_console.print(f"stopped {server.engine} pid {server.pid}", highlight=False)


@app.command("stop")
def stop_cmd(
    all_servers: bool = typer.Option(False, "--all", help="Stop every server ktutorial started."),
    pid: Optional[int] = typer.Option(None, "--pid", help="Only the server with this pid."),
    port: Optional[int] = typer.Option(None, "--port", help="Only the server on this port."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Stop the running server (its whole process group), including one a crashed notebook left."""
    stopped = srv.stop_servers(all=all_servers, pid=pid, port=port)
    if json_out:
        print_json(stopped)
        return
    if not stopped:
        console.print("no running server", highlight=False)
    for entry in stopped:
        console.print(f"stopped {entry['engine']} pid {entry['pid']} at {entry['base_url']}", highlight=False)


@app.command("status")
def status_cmd(json_out: bool = typer.Option(False, "--json", help="Print the servers as JSON.")) -> None:
    """List running servers: engine, pid, base URL, model, profile."""
    entries = srv.running()
    if json_out:
        print_json(entries)
        return
    if not entries:
        console.print("no running server (start one: ktutorial serve --profile tiny --detach)", highlight=False)
        return
    table = Table("engine", "pid", "base URL", "model", "profile", "started (UTC)")
    for column in table.columns:
        column.overflow = "fold"  # URLs and names whole, on two lines if need be
    for e in entries:
        table.add_row(e["engine"], str(e["pid"]), e["base_url"], e["model"], str(e.get("profile")),
                      e.get("started_utc") or "")
    console.print(table)
    for e in entries:
        console.print(f"log of pid {e['pid']}: {e.get('log_path')}", highlight=False, soft_wrap=True)


@app.command("chat")
def chat_cmd(
    text: str = typer.Argument(..., help="What to say."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Server URL (default: the running server)."),
    model: Optional[str] = typer.Option(None, "--model", help="Served model name (default: the server's)."),
    anthropic: bool = typer.Option(False, "--anthropic", help="Use the Anthropic Messages API (/v1/messages)."),
    stream: bool = typer.Option(False, "--stream", help="Print the reply as it arrives."),
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt."),
    max_tokens: int = typer.Option(512, "--max-tokens"),
    hide_reasoning: bool = typer.Option(False, "--hide-reasoning", help="Print only the answer."),
    json_out: bool = typer.Option(False, "--json", help="Print the whole result as JSON."),
) -> None:
    """Send one message to a served model and print the reasoning (dim) and the answer."""
    shown: dict[str, bool] = {"reasoning": False, "content": False}

    def on_delta(kind: str, piece: str) -> None:
        if kind == "reasoning" and hide_reasoning:
            return
        if kind == "content" and shown["reasoning"] and not shown["content"]:
            sys.stdout.write("\n")
        shown[kind] = True
        if kind == "reasoning":
            console.print(piece, style="dim", end="", highlight=False, markup=False)
        else:
            sys.stdout.write(piece)
        sys.stdout.flush()

    live = on_delta if (stream and not json_out) else None
    if anthropic:
        result = client.messages(base_url, model, text, system=system, max_tokens=max_tokens, stream=stream,
                                 on_delta=live)
        reasoning, answer = result.thinking, result.text
    else:
        result = client.chat(base_url, model, text, stream=stream, system=system, max_tokens=max_tokens,
                             on_delta=live)
        reasoning, answer = result.reasoning, result.content
    if json_out:
        print_json(dataclasses.asdict(result))
        return
    if live:
        sys.stdout.write("\n")
        return
    if reasoning and not hide_reasoning:
        console.print(reasoning, style="dim", highlight=False, markup=False)
    print(answer)


# ==== end section: serve and talk ===========================================================

# ==== section: measure (bench, sweep, kernel-bench, report) ================================
def _bench_defaults(base_url: Optional[str]):
    """The base URL, and the bench sizes of the running server's profile (tiny: short prompts)."""
    if base_url:
        return base_url, None

    srv = server.current_server()
    try:
        return srv.base_url, load_profile(srv.profile) if srv.profile else None
    except UserError:
        return srv.base_url, None


@app.command()
def bench(
    out: str = typer.Option(..., "--out", help="JSONL file; one record per measured request is appended"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="default: the running server"),
    input_lens: Optional[str] = typer.Option(None, "--input-lens", help="e.g. 2048,8192,32768 (default: the server's profile)"),
    output_len: Optional[int] = typer.Option(None, "--output-len"),
    repeats: Optional[int] = typer.Option(None, "--repeats"),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="unrecorded requests before each length"),
    config: Optional[str] = typer.Option(None, "--config", help="label of this configuration in tables"),
    concurrency: Optional[str] = typer.Option(
        None, "--concurrency", help="load benchmark: requests in flight at once, one level after another, e.g. 1,2,4,8"),
    request_rate: Optional[str] = typer.Option(
        None, "--request-rate", help="with --concurrency: Poisson arrivals at this many req/s (default inf: all at once)"),
    num_requests: Optional[int] = typer.Option(
        None, "--num-requests", help="with --concurrency: requests per level (default 4 × concurrency, at least 8)"),
    seed: int = typer.Option(0, "--seed", help="with --request-rate: the arrival times' seed"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Single-request prefill/decode benchmark against a running server; writes records.

    With --concurrency: the load benchmark instead (TTFT, ITL, TPOT and E2E percentiles,
    requests/s and output tok/s at each level), one `load` record a level."""
    url, profile = _bench_defaults(base_url)
    defaults = profile.bench if profile else None
    if concurrency is None:
        if request_rate is not None or num_requests is not None:
            raise UserError("--request-rate and --num-requests belong to the load benchmark: add --concurrency 1,2,4,8")
    else:
        if repeats is not None:
            raise UserError("--repeats is the single-request benchmark's: with --concurrency give --num-requests")
        _bench_load(url, profile, out, concurrency, request_rate, num_requests, seed, input_lens, output_len, warmup,
                    config, as_json)
        return
    lens = benchmod.parse_lens(input_lens) if input_lens else (defaults.input_lens if defaults else [2048, 8192, 32768])
    out_len = output_len if output_len is not None else (defaults.output_len if defaults else 512)
    reps = repeats if repeats is not None else (defaults.repeats if defaults else 3)
    warm = warmup if warmup is not None else (defaults.warmup if defaults else 1)
    revision = benchmod.model_revision_for(profile) if profile else None
    recs = benchmod.measure(url, input_lens=lens, output_len=out_len, repeats=reps, warmup=warm, out=out,
                            config=config, model_revision=revision)
    groups = results.compare(recs, ["input_len"], metrics=["prefill_tok_s", "decode_tok_s", "server_decode_tok_s"])
    if as_json:
        print_json({"out": out, "records": len(recs), "summary": groups})
        return

    table = Table(title=f"{recs[0]['params']['config']} — {len(recs)} records appended to {out}")
    for col in ("input tokens", "prefill tok/s", "decode tok/s", "decode (server)", "n"):
        table.add_column(col, justify="right")
    for g in groups:
        m = g["metrics"]
        cell = lambda s: "-" if s["mean"] is None else f"{s['mean']:.1f} ± {s['stdev']:.1f}"  # noqa: E731
        table.add_row(str(g["key"]["input_len"]), cell(m["prefill_tok_s"]), cell(m["decode_tok_s"]),
                      cell(m["server_decode_tok_s"]), str(g["n"]))
    console.print(table)


def _bench_load(url, profile, out, concurrency, request_rate, num_requests, seed, input_lens, output_len, warmup,
                config, as_json) -> None:
    """`bench --concurrency`: the load benchmark (ktutorial.load) at one input length."""
    defaults = profile.bench if profile else None
    levels = load.parse_concurrency(concurrency)
    rate = load.parse_request_rate(request_rate)
    if input_lens:
        lens = benchmod.parse_lens(input_lens)
        if len(lens) != 1:
            raise UserError(f"the load benchmark runs one input length, got {lens}: pass one, e.g. --input-lens {lens[0]}")
        length = lens[0]
    else:  # the profile's shortest: many requests of its longest take long
        length = defaults.input_lens[0] if defaults else 512
    run = load.measure_load(
        url, concurrency=levels, input_len=length,
        output_len=output_len if output_len is not None else (defaults.output_len if defaults else 64),
        num_requests=num_requests, request_rate=rate, seed=seed,
        warmup=warmup if warmup is not None else (defaults.warmup if defaults else 1),
        out=out, config=config, model_revision=benchmod.model_revision_for(profile) if profile else None,
    )  # fmt: skip
    if as_json:
        print_json({"out": out, "records": len(run.records), "levels": [
            {k: r["params"][k] for k in ("concurrency", "num_requests", "request_rate_req_s")}
            | {k: v for k, v in r["metrics"].items() if k != "errors"} for r in run.records]})
        return
    console.print(run)
    console.print(f"{len(run.records)} load records appended to {out}", highlight=False)
    for warning in run.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    for rec in run.records:
        if rec["metrics"]["failed"]:
            first = rec["metrics"]["errors"][0]["error"]
            err_console.print(f"[red]concurrency {rec['params']['concurrency']}: {rec['metrics']['failed']} of "
                              f"{rec['params']['num_requests']} requests failed[/] (first error: {first})", highlight=False)
    if any(rec["metrics"]["failed"] for rec in run.records):
        raise typer.Exit(1)  # recorded, and a script still notices


@app.command()
def replies(
    out: Optional[str] = typer.Option(None, "--out", help="JSONL file the reply_check records are appended to."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="default: the running server"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The tiny model's exact replies over OpenAI and Anthropic (plain, streamed, a Bash tool round
    trip) through a running server; exit 1 if any differs."""
    url, profile = _bench_defaults(base_url)
    recs = benchmod.reply_checks(url, client.resolve(url)[1], {"profile": profile.name if profile else None})
    for rec in recs:
        if out:
            results.append_record(out, rec)
    rows = [{"check": r["params"]["check"], "exact": r["metrics"]["exact"], "answer": r["metrics"].get("answer"),
             "error": r["metrics"].get("error")} for r in recs]
    if as_json:
        print_json(rows)
    else:
        for row in rows:
            mark = "[green]exact[/]" if row["exact"] else "[red]differs[/]"
            console.print(f"{mark} {row['check']}: {row['error'] or row['answer']!r}", highlight=False)
    if not all(r["exact"] for r in rows):
        raise typer.Exit(1)


@app.command()
def sweep(
    spec: str = typer.Argument(..., help="sweep spec YAML, or a shipped one: tiny, minimax-m2.1"),
    out: Optional[str] = typer.Option(None, "--out", help="JSONL records file (default: sweep-NAME.jsonl)"),
    resume: bool = typer.Option(False, "--resume", help="skip combinations already recorded in --out"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="with --resume: run failed combinations again"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan of combinations and stop"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Serve parameters × bench parameters: one server per combination, every run recorded."""
    spec_obj = benchmod.load_sweep(spec)
    out = out or f"sweep-{spec_obj.name}.jsonl"
    summary = benchmod.sweep(spec_obj, out, resume=resume, dry_run=dry_run, retry_failed=retry_failed,
                             progress=not as_json)
    if as_json:
        print_json(summary)
        return

    table = Table(title=f"sweep {summary['sweep']} (profile {summary['profile']}) -> {summary['out']}")
    for col in ("#", "combination", "key", "status"):
        table.add_column(col)
    failed = {f["combination_key"]: f for f in summary["failed"]}
    for i, item in enumerate(summary["plan"], 1):
        key = item["combination_key"]
        status = ("skip (recorded)" if item["skip"] else "planned" if dry_run
                  else f"FAILED: {failed[key]['diagnosis']}" if key in failed else "ok")
        combo = ", ".join(f"{k}={v}" for k, v in item["serve"].items()) or "defaults"
        if dry_run and item.get("command"):
            combo += f"\n[dim]{item['command']}[/]"
        table.add_row(str(i), combo, key, status)
    console.print(table)
    b = summary["bench"]
    console.print(f"bench: input lengths {b['input_lens']}, output {b['output_len']}, "
                  f"{b['repeats']} repeats after {b['warmup']} warm-up")


@app.command("tune")
def tune_cmd(
    profile: str = typer.Option(..., "--profile", help="An sglang-kt profile: minimax-m2.1, minimax-m2.1-synth, tiny-sglang, or a .yaml."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Fix a setting FLAG=VALUE, as `serve --set`; repeat it."),
    min_experts: Optional[int] = typer.Option(None, "--min", help="Fewest GPU experts per layer to try (default 0)."),
    max_experts: Optional[int] = typer.Option(None, "--max", help="Most GPU experts per layer to try (default: all of a layer's)."),
    no_chunk: bool = typer.Option(False, "--no-chunk", help="Keep the plan's --chunked-prefill-size; search the experts only."),
    context_tokens: Optional[int] = typer.Option(None, "--context-tokens", help="The context each probe's prompt fills (default: the profile's)."),
    fraction_for_boundary: Optional[int] = typer.Option(
        None, "--fraction-for-boundary",
        help="Demonstration aid: set --mem-fraction-static where the planner puts the boundary at this many experts "
             "(a GPU that holds every expert has no boundary to find)."),
    out: Optional[str] = typer.Option(None, "--out", help="JSONL records file (default: tune-PROFILE.jsonl)."),
    resume: bool = typer.Option(False, "--resume", help="Reuse the probes --out already holds for the same setup."),
    write_profile: Optional[str] = typer.Option(None, "--write-profile", help="Write the tuned profile to this .yaml."),
    ready_timeout: Optional[float] = typer.Option(None, "--ready-timeout", help="Seconds a probe's server may take to load."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the search plan and the first probe's command; start nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan (or the result) as JSON."),
) -> None:
    """Find the largest --kt-num-gpu-experts, then --chunked-prefill-size, that launches and serves a
    prompt of the planned context, by real launches (bisection); every probe is a record, failures
    with their diagnosis. Exits 1 when no expert count in the range passes."""
    tune_plan = tune.make_tune_plan(profile, sets, lo=min_experts, hi=max_experts, context_tokens=context_tokens,
                                    no_chunk=no_chunk, boundary_for_fraction=fraction_for_boundary)
    if dry_run:
        if json_out:
            print_json(tune_plan.as_dict())
        else:
            console.print(tune_plan, soft_wrap=True)
        return
    out = out or f"tune-{tune_plan.profile.name}.jsonl"

    def on_probe(settings, result, reused) -> None:
        if json_out:
            return
        what = ", ".join(f"{k} {v}" for k, v in settings.items())
        how = "recorded before" if reused else f"{result.wall_s:.0f} s"
        err_console.print(f"probe {what}: {result.outcome} ({how}){': ' + result.diagnosis[:240] if result.diagnosis else ''}",
                          highlight=False, soft_wrap=True)

    run = tune.run_tune(tune_plan, out=out, resume=resume, ready_timeout_s=ready_timeout, on_probe=on_probe)
    written = tune.write_profile(run, write_profile) if write_profile and run.boundary is not None else None
    if json_out:
        print_json({**run.as_dict(), "profile_written": str(written) if written else None})
    else:
        console.print(run)
        console.print(f"records: {out}" + (f"; tuned profile: {written}" if written else ""), highlight=False)
    if run.boundary is None:
        raise typer.Exit(1)


@app.command()
def report(
    records: list[str] = typer.Argument(..., help="records files (JSONL) or folders of them"),
    out: str = typer.Option(..., "--out", help="folder for report.md, summary.json and the PNGs"),
    published: bool = typer.Option(True, "--published/--no-published", help="show the published figures, labelled"),
    plan_profile: Optional[str] = typer.Option(None, "--plan-profile", help="chart the planner's memory breakdown for this profile"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Tables (the published table's format) and charts from records."""
    memory, title = (None, "")
    if plan_profile:
        memory, title = reportmod.planned_memory(plan_profile)
    files = reportmod.write_report(records, out, published=published, memory=memory, memory_title=title)
    if as_json:
        print_json({"files": [str(f) for f in files]})
        return
    for f in files:
        console.print(str(f))


@app.command("kernel-bench")
def kernel_bench_cmd(
    out: str = typer.Option(..., "--out", help="JSONL file the records are appended to."),
    threads: Optional[str] = typer.Option(
        None, "--threads", help="CPU thread counts, one child process each (default 4,8,12,16; --hybrid: one count, default cores - 2)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Layers held in RAM, so no cache holds a token's experts (default 4 at m2.1 shape)."),
    prefill_tokens: Optional[str] = typer.Option(None, "--prefill-tokens", help="Prefill chunk sizes to time (default 128,512,1024,2048,4096 at m2.1 shape)."),
    shape: str = typer.Option("m2.1", "--shape", help="m2.1 (256 experts, 3072 x 1536, top 8) or tiny (a seconds-long check)."),
    llamacpp: bool = typer.Option(False, "--llamacpp", help="The same layer in llama.cpp: a random Q8_0 GGUF, CPU only."),
    hybrid: bool = typer.Option(
        False, "--hybrid",
        help="One layer split: N experts on the GPU (SGLang's fused FP8 MoE, or torch's grouped GEMM), the rest on kt-kernel, at once."),
    gpu_experts: Optional[str] = typer.Option(
        None, "--gpu-experts", help="--hybrid: experts on the GPU, per point (default 0,8,16,32,64,128,256; --gpu-probe 8 and all)."),
    routing: str = typer.Option("random,skewed", "--routing", help="--hybrid: random and/or skewed (zipf-like) routing."),
    gpu_kernel: str = typer.Option(
        "auto", "--gpu-kernel",
        help="--hybrid: auto (SGLang's fused FP8 MoE where sglang imports on CUDA, else torch's grouped GEMM), fused, or grouped."),
    cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph", help="--hybrid: replay the 1-token GPU half from a CUDA graph (eager is timed too)."),
    gpu_probe: bool = typer.Option(
        False, "--gpu-probe", help="Only the GPU half, a few N, no kt-kernel: which kernel runs here, its error, time and roofline (a minute)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed decode calls per point (default 200; llama.cpp 2 requests; hybrid 50)."),
    prefill_repeats: Optional[int] = typer.Option(None, "--prefill-repeats", help="Timed prefill calls per chunk (default 2; hybrid 3)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Kernel microbenchmark at MiniMax-M2.1 layer shape: kt-kernel's FP8 MoE on the CPU (default),
    the same layer in llama.cpp (--llamacpp), or the hybrid GPU/CPU split (--hybrid). Writes records."""
    if llamacpp and (hybrid or gpu_probe):
        raise UserError("pass one of --llamacpp or --hybrid (or neither, for kt-kernel)")

    def progress(msg: str) -> None:
        err_console.print(f"[dim]{msg}[/]", highlight=False)

    if gpu_probe:
        probe = kb.probe_gpu_half(
            out,
            shape=shape, gpu_kernel=gpu_kernel, gpu_experts=kb.parse_int_list(gpu_experts, "--gpu-experts") if gpu_experts else None,
            progress=progress,
        )
        if json_out:
            print_json(probe)
            return
        c = probe["ceilings"]
        console.print(
            f"{probe['device']}: {probe['gpu_kernel']} ({probe['gpu_kernel_reason']}); copy {c['copy_gb_s']:.0f} GB/s, "
            f"bf16 {c['bf16_tflop_s']:.0f} TFLOP/s, fp8 {c['fp8_tflop_s'] or 0:.0f} TFLOP/s{' (' + c['fp8_error'] + ')' if c['fp8_error'] else ''}",
            highlight=False,
        )
        rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in probe["rows"]]
    elif hybrid:
        counts = kb.parse_int_list(threads, "--threads") if threads else [max(1, (os.cpu_count() or 2) - 2)]
        if len(counts) != 1:
            raise UserError(f"--hybrid runs one CPU thread count, got --threads {threads}: pass one, e.g. --threads 14")
        recs = kb.run_hybrid(
            out,
            counts[0],
            shape=shape,
            gpu_experts=kb.parse_int_list(gpu_experts, "--gpu-experts") if gpu_experts else None,
            routings=[r.strip() for r in routing.split(",") if r.strip()],
            decode_calls=repeats or 50,
            prefill_calls=prefill_repeats or 3,
            gpu_kernel=gpu_kernel,
            cuda_graph=cuda_graph,
            progress=progress,
        )
        rows = [
            {k: r["params"][k] for k in ("routing", "n_gpu_experts", "tokens", "cuda_graph")}
            | {k: None if r["metrics"][k] is None else round(r["metrics"][k], 3)
               for k in ("latency_ms", "gpu_ms", "cpu_ms", "overlap_ratio", "gpu_over_roofline", "gpu_coverage", "rel_err")}
            for r in recs
            if r["kind"] == kb.KIND_HYBRID
        ]  # fmt: skip
        for r in recs:
            if r["kind"] == kb.KIND_HYBRID_SUMMARY:
                m = r["metrics"]
                breaks = ", ".join(f"{b['from_n']}->{b['to_n']}" for b in m["breaks"]) or "none"
                err_console.print(
                    f"{r['params']['routing']}, {r['params']['tokens']} token(s), {r['params']['gpu_kernel']}: "
                    f"monotone within spread: {m['monotone_within_spread']} (breaks: {breaks}); "
                    f"GPU half within 2x of roofline at {m['points_gpu_within_2x_roofline']}/{m['points_with_gpu_work']} points; "
                    f"overlap within 1.1x at {m['points_overlap_within_1_1']}/{m['n_points']}",
                    highlight=False,
                )
    elif llamacpp:
        counts = kb.parse_int_list(threads or "4,8,12,16", "--threads")
        recs = kb.run_llamacpp(counts, out, shape=shape, layers=layers, repeats=repeats or 2, progress=progress)
        rows = [
            {"phase": r["params"].get("phase"), "tokens": r["params"].get("tokens"), "threads": r["params"].get("threads")}
            | {k: round(r["metrics"][k], 3) for k in ("per_token_ms_per_layer", "tok_s_per_layer") if k in r["metrics"]}
            for r in recs
            if r["kind"] == kb.KIND_LLAMACPP
        ]
    else:
        counts = kb.parse_int_list(threads or "4,8,12,16", "--threads")
        summary = kb.run_kt_kernel(
            counts, out, shape=shape, layers=layers, decode_calls=repeats or 200, prefill_calls=prefill_repeats or 2, progress=progress,
            prefill_tokens=kb.parse_int_list(prefill_tokens, "--prefill-tokens") if prefill_tokens else None,
        )
        if json_out:
            print_json(summary)
            return
        d, p = summary["decode"], summary.get("prefill", {})
        console.print(
            f"best decode: {d['threads']} threads, {d['latency_ms']:.2f} ms/layer, {d['expert_gb_s']:.1f} GB/s of experts "
            f"({d['bandwidth_ratio']:.0%} of copy bandwidth), {d['ceiling_tok_s']:.1f} tok/s for {kb.layer_shape(shape).model_layers} layers",
            highlight=False,
        )
        if p:
            console.print(
                f"best prefill: {p['threads']} threads, {summary['prefill_tokens']}-token chunk, {p['tflop_s']:.2f} TFLOP/s, "
                f"{p['ceiling_tok_s']:.1f} tok/s for {kb.layer_shape(shape).model_layers} layers",
                highlight=False,
            )
        console.print(f"records appended to {out}", highlight=False)
        return
    if json_out:
        print_json(rows)
        return

    table = Table(*(rows[0].keys() if rows else ["(no results)"]))
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    console.print(f"records appended to {out}", highlight=False)


# ==== end section: measure ==================================================================

# ==== section: claude code (claude-code settings|check|run|proxy) ==========================
claude_app = typer.Typer(
    no_args_is_help=True,
    help="Claude Code on the local backend: settings, a smoke test of the API as Claude Code calls it, one real turn.",
)
app.add_typer(claude_app, name="claude-code")

_CC_BASE_URL = typer.Option(None, "--base-url", help="Backend root, e.g. http://127.0.0.1:8080 (default: the running server).")
_CC_MODEL = typer.Option(None, "--model", help="Served model name (default: the server's).")
_CC_VIA_PROXY = typer.Option(
    False, "--via-proxy",
    help="Through ktutorial's proxy, which folds Claude Code's role:system message into system (SGLang-kt 0.7.2 refuses it).")


@claude_app.command("settings")
def claude_settings_cmd(
    base_url: Optional[str] = _CC_BASE_URL,
    model: Optional[str] = _CC_MODEL,
    write: bool = typer.Option(False, "--write", help="Merge the env block into ./.claude/settings.local.json."),
    project_dir: str = typer.Option(".", "--project-dir", help="Project whose .claude/settings.local.json --write updates."),
    global_: bool = typer.Option(False, "--global", help="Write ~/.claude/settings.json instead (needs --force)."),
    force: bool = typer.Option(False, "--force", help="Allow --global; the old file is backed up first."),
    show_token: bool = typer.Option(False, "--show-token", help="Print the token itself, not where it comes from."),
    json_out: bool = typer.Option(False, "--json", help="Print the settings block as JSON."),
    via_proxy: bool = typer.Option(
        False, "--via-proxy",
        help="Point Claude Code at ktutorial's proxy in front of the backend, started (detached) if not running (for SGLang-kt)."),
    proxy_port: Optional[int] = typer.Option(None, "--proxy-port", help="Port of a proxy started here (default 3457; 0: a free one)."),
) -> None:
    """The environment Claude Code needs for this backend, as shell exports and a settings.json block."""
    base_url, model = cc.resolve_backend(base_url, model)
    token, source = cc.resolve_token()
    if via_proxy:
        proxy = cc.start_proxy(base_url, model, proxy_port)
        err_console.print(
            f"ktutorial's proxy at {proxy.base_url} (pid {proxy.pid}) -> {base_url}; `ktutorial stop --port {proxy.port}` "
            f"ends it; log: {proxy.log_path}", highlight=False, soft_wrap=True)
        base_url = proxy.base_url
    env = cc.claude_env(base_url, model, token)
    shown = env if show_token else cc.masked_env(env, source)
    written = None
    if write or global_:
        written = cc.write_settings(env, project_dir=project_dir, user=global_, force=force)
    if json_out:
        out = cc.settings_block(shown)
        if written:
            out["written"] = {"path": str(written.path), "backup": str(written.backup) if written.backup else None}
        print_json(out)
        return
    console.print(cc.shell_exports(env, show_token=show_token, token_source=source), highlight=False, soft_wrap=True)
    console.print(f"\n# settings.json:\n{json.dumps(cc.settings_block(shown), indent=2)}", highlight=False, soft_wrap=True)
    if written:
        note = f" (old file backed up to {written.backup})" if written.backup else ""
        console.print(f"\n[green]wrote[/] {written.path}{note}", highlight=False, soft_wrap=True)


@claude_app.command("check")
def claude_check_cmd(
    base_url: Optional[str] = _CC_BASE_URL,
    model: Optional[str] = _CC_MODEL,
    timeout_s: float = typer.Option(300.0, "--timeout-s", help="Limit for each request."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    via_proxy: bool = _CC_VIA_PROXY,
    out: Optional[str] = typer.Option(None, "--out", help="Append one claude_check record per item to this JSONL file."),
) -> None:
    """Call the backend the way Claude Code does; each part works or fails, with the fix (exit 1 if any fails)."""
    results = cc.check(base_url, model, timeout_s=timeout_s, via_proxy=via_proxy)
    if out and results[0].ok:  # a dead backend has no settings to stamp the records with
        for rec in cc.check_records(results, *cc.resolve_backend(base_url, model), via_proxy):
            records.append_record(out, rec)
    if json_out:
        print_json([asdict(r) for r in results])
    else:
        table = Table("", "item", "detail", "s", title="Claude Code smoke test")
        for r in results:
            table.add_row("[green]works[/]" if r.ok else "[red]fails[/]", r.name, r.detail, f"{r.elapsed_s:.1f}")
        console.print(table)
        for r in results:
            if not r.ok:
                console.print(f"[red]{r.name}[/]: {r.fix}", highlight=False, soft_wrap=True)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@claude_app.command("run")
def claude_run_cmd(
    prompt: str = typer.Argument(..., help="What to ask Claude Code."),
    base_url: Optional[str] = _CC_BASE_URL,
    model: Optional[str] = _CC_MODEL,
    timeout_s: float = typer.Option(120.0, "--timeout-s", help="Limit for the whole turn."),
    allow: Optional[list[str]] = typer.Option(None, "--allow", help="A tool Claude Code may use unasked, e.g. 'Bash(echo:*)'; repeat it."),
    cwd: Optional[str] = typer.Option(None, "--cwd", help="Run in this folder (default: a scratch folder, so no project settings are read)."),
    tools: Optional[str] = typer.Option(None, "--tools", help="Only these built-in tools, e.g. 'Bash' (a smaller first request for slow backends)."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="Replace Claude Code's long system prompt."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    via_proxy: bool = _CC_VIA_PROXY,
) -> None:
    """One real turn of the installed Claude Code CLI (`claude -p`) against the backend, retries off."""
    result = cc.run(
        prompt, base_url, model, timeout_s=timeout_s, allowed_tools=tuple(allow or ()), cwd=cwd,
        tools=[t.strip() for t in tools.split(",")] if tools is not None else None, system_prompt=system_prompt,
        via_proxy=via_proxy,
    )
    if json_out:
        print_json(result.to_dict())
        return

    for call in result.tool_calls:
        said = escape(f"ran {call['name']} {json.dumps(call['input'])} -> {str(call['output'])[:200]!r}")
        err_console.print(f"[dim]{said}[/]", highlight=False, soft_wrap=True)
    console.print(result.result, highlight=False, soft_wrap=True)
    err_console.print(
        f"[dim]claude {result.claude_version} -> {(result.via_proxy + ' -> ') if result.via_proxy else ''}"
        f"{result.base_url} ({result.model}): {result.num_turns} turn(s), "
        f"{result.wall_s:.1f} s[/]",
        highlight=False,
    )


@claude_app.command("proxy")
def claude_proxy_cmd(
    base_url: Optional[str] = _CC_BASE_URL,
    port: int = typer.Option(3457, "--port", help="Port on 127.0.0.1 (0: a free one)."),
    detach: bool = typer.Option(False, "--detach", help="Leave it running; `ktutorial stop --port PORT` ends it."),
    json_out: bool = typer.Option(False, "--json", help="Print its run-state entry as JSON."),
) -> None:
    """ktutorial's proxy for Claude Code in front of the backend: folds role:system messages into system."""
    base_url, model = cc.resolve_backend(base_url, None)
    proxy = ccproxy.serve(base_url, port or None, model=model, detach=detach)
    if json_out:
        print_json(proxy.state())
    else:
        console.print(f"ktutorial's proxy at {proxy.base_url} -> {base_url} ({model}), pid {proxy.pid}", highlight=False)
        console.print(f"  runs: {proxy.launch.shell()}\n  log: {proxy.log_path}", highlight=False, soft_wrap=True)
        console.print(f"  point Claude Code at it: ktutorial claude-code settings --base-url {proxy.base_url} --write",
                      highlight=False, soft_wrap=True)
    if detach:
        return
    err_console.print("in the foreground; Ctrl-C stops it", highlight=False)
    try:
        while proxy.is_alive():
            _time.sleep(0.5)
        err_console.print(f"[bold red]error:[/] the proxy exited (code {proxy.returncode()}); log: {proxy.log_path}",
                          highlight=False)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()


@claude_app.command("backends")
def claude_backends_cmd() -> None:
    """How to serve for Claude Code with SGLang-kt or llama.cpp, and a claude-code-router config."""
    sys.stdout.write(cc.backend_docs())


# ==== end section: claude code ==============================================================

# ==== section: inside kt (hybrid) ===========================================================
hybrid_app = typer.Typer(
    no_args_is_help=True,
    help="The GPU/CPU expert split of SGLang-KT, run on the tiny model (transformers + kt-kernel).",
)
app.add_typer(hybrid_app, name="hybrid")


@hybrid_app.command("agree")
def hybrid_agree(
    tokens: int = typer.Option(32, "--tokens", help="Greedy positions compared."),
    llamacpp: bool = typer.Option(True, "--llamacpp/--no-llamacpp", help="Also compare llama.cpp on the GGUF."),
    controls: bool = typer.Option(False, "--controls", help="Also run the negative controls (each must fail)."),
    strategy: str = typer.Option("uniform", "--strategy", help="Placement of the GPU experts."),
    seed: int = typer.Option(0, "--seed", help="Seed of the tiny model."),
    records: Optional[str] = typer.Option(None, "--records", help="Append one record per pair to this JSONL file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Three-way agreement: transformers, the hybrid split (0, some, all experts on the GPU), llama.cpp."""
    from ktutorial import hybrid  # torch and transformers: seconds at import, only for this command
    out = hybrid.run_agreement(
        seed=seed, n_tokens=tokens, llamacpp=llamacpp, controls=controls, strategy=strategy, records=records
    )
    if as_json:
        print_json(out)
    else:
        def fmt(v):
            return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

        table = Table(title=f"Agreement over {tokens} greedy tokens ({out['prompt_tokens']}-token prompt)")
        for col in ("a", "b", "tokens", "argmax", "max |Δlogit|", "MoE rel err", "max |Δlogprob|", "router flips", "ok"):
            table.add_column(col)
        for r in out["comparisons"] + out.get("negative_controls", []):
            table.add_row(
                r["a"], r["b"], f"{r['token_matches']}/{r['positions']}", f"{r['argmax_matches']}/{r['positions']}",
                fmt(r["max_abs_dlogit"]), fmt(r["moe_rel_err"]), fmt(r["max_abs_dlogprob"]), fmt(r["router_flips"]),
                "yes" if r["ok"] else "NO: " + ", ".join(r["failed_on"]),
            )
        console.print(table)
        limits = "; ".join(f"{k}: " + ", ".join(f"{m} ≤ {v:g}" for m, v in t.items()) for k, t in out["tolerances"].items())
        console.print(f"tolerances — {limits}")
        if out.get("negative_controls"):
            console.print("Negative controls (the last rows) must say NO: each is a deliberate bug.")
    if not out["ok"]:
        raise typer.Exit(1)


@hybrid_app.command("routing")
def hybrid_routing(
    out: str = typer.Option(..., "--out", help="Folder for routing.png, routing.jsonl, routing.json."),
    seed: int = typer.Option(0, "--seed", help="Seed of the tiny model."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Expert routing statistics and the GPU share of expert activations per placement strategy."""
    from ktutorial import hybrid  # torch and transformers: seconds at import, only for this command
    study = hybrid.run_routing(out, seed=seed)
    if as_json:
        print_json(study)
        return

    table = Table(title=f"Expert activations on the GPU ({study['num_experts']} experts/layer)")
    table.add_column("GPU experts/layer")
    for s in study["coverage"]:
        table.add_column(s)
    for i, n in enumerate(study["gpu_experts"]):
        table.add_row(str(n), *(f"{100 * study['coverage'][s][i]:.1f}%" for s in study["coverage"]))
    console.print(table)
    console.print(f"chart: {study['chart']}\nrecords: {study['records']}")


# ---- placement from recorded traffic (SGLang-KT's expert recorder) ----------------------------
placement_app = typer.Typer(
    no_args_is_help=True,
    help="Which experts live on the GPU: record SGLang-KT's expert traffic, place by it, score it on held-out prompts.",
)
app.add_typer(placement_app, name="placement")


@placement_app.command("record")
def placement_record(
    out: str = typer.Option(..., "--out", help="The placement file to write (.pt; a .json summary goes beside it)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="The SGLang-KT server (default: the one ktutorial started)."),
    dump_dir: Optional[str] = typer.Option(
        None, "--dump-dir", help="The folder the server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR names (sglang's default: /tmp)."),
    prompts: str = typer.Option("placement", "--prompts", help="A shipped prompt set or a .yaml with train: and heldout: lists."),
    part: str = typer.Option("train", "--part", help="train or heldout."),
    output_tokens: Optional[int] = typer.Option(None, "--output-tokens", help="Tokens generated per prompt (default: the prompt set's)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Record a prompt set's expert traffic on a running SGLang-KT server (launched with
    --expert-distribution-recorder-mode stat) and write the file that
    --kt-expert-placement-strategy frequency --init-expert-location reads back."""
    from ktutorial import placement  # torch and transformers: seconds at import, only for this command

    got = placement.record_placement(
        base_url or benchmod.default_base_url(), out, prompt_set=prompts, part=part, output_tokens=output_tokens,
        dump_dir=dump_dir or os.environ.get(placement.RECORDER_DIR_ENV) or placement.SGLANG_DEFAULT_RECORDER_DIR,
    )
    if as_json:
        print_json(got)
    else:
        console.print(f"{got['requests']} requests, {got['passes']} forward passes, {got['activations']} expert "
                      f"activations recorded\nplacement file: {got['placement_file']} (summary "
                      f"{got['summary_file']})\nread back with: --kt-expert-placement-strategy frequency "
                      f"--init-expert-location {got['placement_file']}", highlight=False, soft_wrap=True)


@placement_app.command("compare")
def placement_compare(
    profile: str = typer.Option(..., "--profile", help="An SGLang-KT profile: tiny-sglang, minimax-m2.1-synth, minimax-m2.1."),
    gpu_experts: Optional[int] = typer.Option(None, "--gpu-experts", help="GPU experts per layer (default: the profile's or the plan's)."),
    out: Optional[str] = typer.Option(None, "--out", help="Append the two placement_share records to this JSONL file."),
    prompts: str = typer.Option("placement", "--prompts", help="A shipped prompt set or a .yaml with train: and heldout: lists."),
    model_dir: Optional[str] = typer.Option(None, "--model-dir", help="Serve this checkpoint folder instead of the profile's."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Plan for a described GPU (NAME:GB), e.g. to --dry-run without one."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the two launch commands; start nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Uniform against recorded placement, through the engine: launch A (uniform) records the
    training and held-out prompts; launch B (frequency, from A's training traffic) serves the
    held-out prompts; the share of expert activations on GPU experts is measured for both."""
    from ktutorial import placement  # torch and transformers: seconds at import, only for this command

    info = placement.compare(profile, gpu_experts, out=out, prompt_set=prompts, model_dir=model_dir,
                             plan_options={"gpu": gpu} if gpu else None, dry_run=dry_run)
    shown = placement.comparison_json(info)
    if as_json:
        print_json(shown)
        return
    if dry_run:
        for strategy, command in shown["commands"].items():
            console.print(f"[bold]{strategy}[/]: {command}", highlight=False, soft_wrap=True)
        return
    console.print(placement.comparison_table(shown))
    if out:
        console.print(f"records: {out}", highlight=False)


# ==== end section: inside kt ================================================================

# ==== section: tutorial (tutorial, docs) ====================================================
@app.command("tutorial")
def tutorial_cmd(
    profile: str = typer.Option("tiny", "--profile", help="tiny (no GPU, the default) or minimax-m2.1 (a GPU workstation), or a profile .yaml."),
    out: str = typer.Option("build", "--out", help="Folder for the executed notebooks, records, figures and the site."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only this notebook (e.g. 02_launch); repeat it."),
    no_site: bool = typer.Option(False, "--no-site", help="Do not build the site afterwards."),
) -> None:
    """Run every notebook in order with papermill under a profile, then build the site. Stops the
    servers the notebooks started; a failed notebook stops the run, naming the cell and error."""
    start = time.perf_counter()
    console.print(f"ktutorial tutorial: profile {profile}, output in {out}/", highlight=False)
    result = tutorial.run_tutorial(profile, out, only=only or None, progress=tutorial.main_progress(console))
    for entry in result.stopped_servers:
        console.print(f"stopped the {entry['engine']} server the notebooks left running (pid {entry['pid']})",
                      highlight=False)
    site = None
    if not no_site:
        console.print("site: mkdocs build --strict ...", highlight=False)
        t0 = time.perf_counter()
        try:
            site = build_site(out, typer.main.get_command(app))
        except UserError as exc:
            if not only:
                raise
            console.print(f"site not built: {exc}", highlight=False, soft_wrap=True)  # a partial run
        else:
            console.print(f"site built in {time.perf_counter() - t0:.1f} s", highlight=False)
    total = time.perf_counter() - start
    o = Path(out)
    lines = [
        f"done in {total:.1f} s ({result.seconds:.1f} s in notebooks). Look at:",
        f"  {o / 'notebooks'}/  the executed notebooks",
        f"  {o / 'records'}/    the records they wrote (tables and charts: ktutorial report {o / 'records'} --out {o / 'report'})",
        f"  {o / 'figures'}/    the charts",
    ]
    if site is not None:
        lines.append(f"  {o / 'site'}/       the site: python -m http.server -d {o / 'site'} 8000, then http://127.0.0.1:8000")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


@app.command("docs")
def docs_cmd(
    out: str = typer.Option("build", "--out", help="The folder `ktutorial tutorial` wrote (its notebooks/ and records/)."),
) -> None:
    """Rebuild the site only (mkdocs build --strict) from the executed notebooks in OUT/notebooks,
    pages generated from the code, and the committed records."""
    build_site(out, typer.main.get_command(app))
    site = Path(out) / "site"
    console.print(f"site: {site}/ (serve it: python -m http.server -d {site} 8000)", highlight=False, soft_wrap=True)


@app.command("lab")
def lab_cmd(
    port: Optional[int] = typer.Option(None, "--port", help="Port on 127.0.0.1 (default: 8888 when free, else a free one)."),
    browser: bool = typer.Option(True, "--browser/--no-browser", help="Open the URL in this machine's browser."),
) -> None:
    """Open the tutorial in JupyterLab on 127.0.0.1 (notebooks/, their default parameters: the tiny
    profile) and print its URL with the token. Run each notebook by hand, top to bottom; Ctrl-C
    stops JupyterLab, its kernels and the model servers the notebooks started."""
    lab.run(port=port, open_browser=browser, say=lambda line: console.print(line, highlight=False, soft_wrap=True))


# ==== end section: tutorial =================================================================


@app.callback()
def _root() -> None:
    """Serve MiniMax-M2.1 with SGLang + KT-Kernel on one workstation, reproducibly."""


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI and return its exit status (callable in-process, as tests do)."""
    try:
        # Not standalone: return codes come back instead of sys.exit, so tests can call main().
        result = app(args=argv, prog_name="ktutorial", standalone_mode=False)
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        # click's usage errors (typer vendors click, so match by shape, not by class)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return exc.exit_code
        if type(exc).__name__ == "Abort":
            err_console.print("aborted")
            return 130
        raise
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
