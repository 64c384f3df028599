"""llama.cpp's HTTP server: the command line ktutorial runs (xllamacpp or `llama-server`), and its wire.

xllamacpp (a PyPI wheel holding llama.cpp's own server) runs in a child process started with
`python -m ktutorial.engines.llamacpp ...`, never inside the caller: a malformed GGUF makes
llama.cpp abort the whole process (GGML_ASSERT), and deleting the server object during a streamed
request can hang. The child takes the same flags as `llama-server`, so the command printed for
either engine reads the same.

The MoE settings for the comparison with KT: `--cpu-moe` keeps every expert tensor of every layer
in host memory, `--n-cpu-moe N` those of the first N layers; `--override-tensor PATTERN=CPU` is
the general form both expand to (`exps=CPU` is the common spelling for "all experts on the CPU").

`LlamaCppAPI` speaks the server's own routes (/props, /tokenize, /completion by token ids) for the
bench and the hybrid study; clients of the OpenAI and Anthropic APIs are in client.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Optional

from ktutorial.engines.http import EngineAPI, RequestTiming
from ktutorial.errors import MissingDependency, UserError

ENGINE = "llamacpp"

# llama.cpp's own regex for the routed-expert tensors (ffn_{gate,up,down}_exps), as its
# --cpu-moe / --n-cpu-moe expand it.
EXPERT_TENSOR_REGEX = r"\.ffn_(up|down|gate)_exps"
REASONING_FORMATS = ("none", "deepseek", "auto")


@dataclass
class LlamaCppConfig:
    """What a llama.cpp server is started with; renders one command line (`command()`)."""

    model_path: Path
    port: int
    host: str = "127.0.0.1"
    threads: int = 2
    ctx_size: int = 4096
    alias: Optional[str] = None  # the served model name clients send
    cpu_moe: bool = False  # every expert tensor in host memory
    n_cpu_moe: Optional[int] = None  # expert tensors of the first N layers in host memory
    override_tensor: list[str] = field(default_factory=list)  # "REGEX=BUFFER", e.g. "exps=CPU"
    n_gpu_layers: Optional[int] = None  # None: llama.cpp's default (all that fit)
    # Offload of host-resident weights' big matmuls (prefill) to the GPU: llama.cpp's default.
    # The published comparison ran both ways (FACTS: 884 vs 82 tok/s prefill, 0.9 vs 25.7 decode).
    op_offload: bool = True
    parallel: int = 1  # one slot: single-request measurements, like the published ones
    # One KV pool of ctx_size tokens shared by the slots, each slot up to all of it; without it
    # llama.cpp splits ctx_size evenly, so `parallel` slots would each hold ctx_size / parallel.
    kv_unified: bool = False
    # deepseek: <think> goes to reasoning_content; none: it stays inline in content.
    reasoning_format: str = "deepseek"
    binary: Optional[str] = None  # a llama-server the reader names; None: xllamacpp

    def validate(self) -> None:
        """Refuse values llama.cpp would take badly, before anything starts."""
        path = Path(self.model_path)
        if not path.is_file():
            raise UserError(
                f"GGUF model not found: {path}; pass the path of a .gguf file "
                "(`ktutorial serve --profile tiny` generates one)"
            )
        if self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if self.parallel < 1:
            raise UserError(f"--parallel (slots: requests served at once) must be at least 1, got {self.parallel}")
        if self.ctx_size < 16:
            raise UserError(f"--ctx-size must be at least 16 tokens, got {self.ctx_size}")
        if self.n_cpu_moe is not None and self.n_cpu_moe < 0:
            raise UserError(f"--n-cpu-moe must be 0 or more, got {self.n_cpu_moe}")
        if self.cpu_moe and self.n_cpu_moe is not None:
            raise UserError("give --cpu-moe (all layers) or --n-cpu-moe N (the first N), not both")
        for item in self.override_tensor:
            if "=" not in item:
                raise UserError(f"--override-tensor wants REGEX=BUFFER (e.g. exps=CPU), got {item!r}")
        if self.reasoning_format not in REASONING_FORMATS:
            raise UserError(
                f"--reasoning-format must be one of {', '.join(REASONING_FORMATS)}, got {self.reasoning_format!r}"
            )
        if self.alias and ":" in self.alias:
            raise UserError(f"served model name {self.alias!r} must not contain ':'")

    def tensor_overrides(self) -> list[str]:
        """The override-tensor list that --cpu-moe / --n-cpu-moe / --override-tensor amount to."""
        out = list(self.override_tensor)
        if self.cpu_moe:
            out.append(f"{EXPERT_TENSOR_REGEX}=CPU")
        if self.n_cpu_moe:
            out += [rf"blk\.{i}{EXPERT_TENSOR_REGEX}=CPU" for i in range(self.n_cpu_moe)]
        return out

    def flags(self) -> list[str]:
        """llama-server's flags (the xllamacpp child takes the same ones)."""
        args = [
            "--model", str(self.model_path),
            "--host", self.host,
            "--port", str(self.port),
            "--threads", str(self.threads),
            "--ctx-size", str(self.ctx_size),
            "--parallel", str(self.parallel),
            # the GGUF's own (MiniMax) template, so its reasoning and tool-call parsing are used
            "--jinja",
            "--reasoning-format", self.reasoning_format,
        ]  # fmt: skip
        if self.kv_unified:
            args.append("--kv-unified")
        if self.alias:
            args += ["--alias", self.alias]
        if self.n_gpu_layers is not None:
            args += ["--n-gpu-layers", str(self.n_gpu_layers)]
        if not self.op_offload:
            args.append("--no-op-offload")
        if self.cpu_moe:
            args.append("--cpu-moe")
        if self.n_cpu_moe is not None:
            args += ["--n-cpu-moe", str(self.n_cpu_moe)]
        for item in self.override_tensor:
            args += ["--override-tensor", item]
        return args

    def command(self) -> list[str]:
        if self.binary:
            return [self.binary, *self.flags()]
        return [sys.executable, "-m", "ktutorial.engines.llamacpp", *self.flags()]

    def environment(self) -> dict[str, str]:
        """Variables the child needs beyond the caller's environment."""
        # OpenMP threads beyond --threads would compete for the same cores.
        return {"OMP_NUM_THREADS": str(self.threads)}


def find_llama_server(name: str) -> str:
    """The path of a llama-server binary the reader named (a path or a name on PATH)."""
    found = shutil.which(name) if os.sep not in name else (name if os.access(name, os.X_OK) else None)
    if not found:
        raise UserError(
            f"llama-server binary {name!r} not found or not executable; build llama.cpp "
            "(cmake -B build && cmake --build build --target llama-server) and pass its path, "
            "or leave --llama-server out to use xllamacpp"
        )
    return found


def require_xllamacpp() -> None:
    try:
        import xllamacpp  # noqa: F401
    except ImportError as exc:
        raise MissingDependency("xllamacpp (llama.cpp's server from PyPI)", "pip install xllamacpp") from exc


def xllamacpp_version() -> Optional[str]:
    try:
        return version("xllamacpp")
    except Exception:
        return None


# ---- the wire: llama.cpp's own routes, for the bench and the hybrid study ----------------------


class LlamaCppAPI(EngineAPI):
    """llama.cpp's own server routes: /props, /tokenize and the native streamed /completion."""

    name = ENGINE
    route = "/completion"

    def __init__(self, base_url, client):
        super().__init__(base_url, client)
        self._props: Optional[dict] = None

    @staticmethod
    def serves(base_url: str, http) -> bool:
        """Whether `base_url` is a llama.cpp server: its /props carries the generation settings."""
        r = http.get(base_url.rstrip("/") + "/props", timeout=10)
        return r.status_code == 200 and "default_generation_settings" in r.json()

    def props(self) -> dict:
        if self._props is None:
            r = self.http.get(self.base_url + "/props", timeout=30)
            self._props = r.json() if r.status_code == 200 else {}
        return self._props

    def tokenize(self, text):
        # add_special false: the ids are sent as the prompt, and llama.cpp adds nothing to ids.
        return list(self._post("/tokenize", {"content": text, "add_special": False})["tokens"])

    def context_tokens(self):
        return (self.props().get("default_generation_settings") or {}).get("n_ctx")

    def describe(self):
        props = self.props()
        model = str(props.get("model_path") or "")
        return {
            "server_build": props.get("build_info"),
            "server_slots": props.get("total_slots"),
            "server_ctx_tokens": self.context_tokens(),
            "server_model_file": model.rsplit("/", 1)[-1] or None,  # the file name, not its path
        }

    def max_running_requests(self):
        return self.props().get("total_slots")

    def complete(self, body: dict, timeout_s: float = 60) -> dict:
        """One unstreamed /completion: `body` is llama.cpp's own (prompt, n_predict, n_probs, ...)."""
        return self._post("/completion", body, timeout=timeout_s)

    def stream(self, ids, output_len, timeout_s):
        body = {
            "prompt": ids,
            "n_predict": output_len,
            "ignore_eos": True,
            "cache_prompt": False,
            "temperature": 0,
            "stream": True,
            "return_tokens": True,
        }
        times, last, final = self._token_times("/completion", body, timeout_s, _tokens_after)
        final = final if final.get("stop") else {}  # the closing chunk carries the server's timings
        timings = final.get("timings") or {}
        server: dict[str, Any] = {
            "prompt_tokens": (timings.get("prompt_n") or 0) + (timings.get("cache_n") or 0) if timings else None,
            "cached_tokens": timings.get("cache_n"),
            "evaluated_tokens": timings.get("prompt_n"),
            "output_tokens": final.get("tokens_predicted"),
        }
        if timings:
            prompt_ms, predicted_ms, predicted_n = (
                timings.get("prompt_ms"), timings.get("predicted_ms"), timings.get("predicted_n")
            )
            server["prompt_ms"] = prompt_ms
            server["predicted_ms"] = predicted_ms
            # llama.cpp's own figures, as it prints them:
            server["prompt_per_second"] = timings.get("prompt_per_second")
            server["predicted_per_second"] = timings.get("predicted_per_second")
            # llama.cpp starts its generation clock when the first token is sampled but counts
            # that token in predicted_n: n / t overstates decode by n/(n-1). Ours is (n-1) / t,
            # the same definition as the client's.
            if predicted_ms and predicted_n and predicted_n > 1:
                server["decode_tok_s"] = (predicted_n - 1) / (predicted_ms / 1000)
            if prompt_ms:
                server["prefill_tok_s"] = timings.get("prompt_n", 0) / (prompt_ms / 1000)
        return RequestTiming(times[0], last, len(times), times, server)


def _tokens_after(chunk: dict, so_far: int) -> int:
    # tokens_predicted is cumulative; the per-chunk `tokens` list is not a count: llama.cpp holds
    # back a chunk that ends inside a UTF-8 character and sends it with the next.
    done = chunk.get("tokens_predicted")
    return so_far + len(chunk.get("tokens") or []) if done is None else int(done)


# ---- the child process: `python -m ktutorial.engines.llamacpp` ---------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ktutorial.engines.llamacpp",
        description="llama.cpp's HTTP server (xllamacpp), with llama-server's flags. Stops on SIGTERM/SIGINT.",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--kv-unified", action="store_true")
    p.add_argument("--jinja", action="store_true")
    p.add_argument("--reasoning-format", choices=REASONING_FORMATS, default="deepseek")
    p.add_argument("--alias")
    p.add_argument("--n-gpu-layers", type=int)
    p.add_argument("--no-op-offload", action="store_true")
    p.add_argument("--cpu-moe", action="store_true")
    p.add_argument("--n-cpu-moe", type=int)
    p.add_argument("--override-tensor", action="append", default=[])
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    config = LlamaCppConfig(
        model_path=Path(args.model),
        port=args.port,
        host=args.host,
        threads=args.threads,
        ctx_size=args.ctx_size,
        alias=args.alias,
        cpu_moe=args.cpu_moe,
        n_cpu_moe=args.n_cpu_moe,
        override_tensor=args.override_tensor,
        n_gpu_layers=args.n_gpu_layers,
        op_offload=not args.no_op_offload,
        parallel=args.parallel,
        kv_unified=args.kv_unified,
        reasoning_format=args.reasoning_format,
    )
    try:
        config.validate()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2

    # xllamacpp installs no signal handlers and its threads inherit this mask: block the stop
    # signals before the server starts, then wait for one here and leave at once (os._exit).
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(config.model_path)
    params.hostnames = [config.host]
    params.port = config.port
    params.cpuparams.n_threads = config.threads
    params.cpuparams_batch.n_threads = config.threads
    params.n_ctx = config.ctx_size
    params.n_parallel = config.parallel
    params.kv_unified = config.kv_unified
    params.use_jinja = bool(args.jinja)
    formats = xllamacpp.common_reasoning_format
    params.reasoning_format = {
        "none": formats.COMMON_REASONING_FORMAT_NONE,
        "deepseek": formats.COMMON_REASONING_FORMAT_DEEPSEEK,
        "auto": formats.COMMON_REASONING_FORMAT_AUTO,
    }[config.reasoning_format]
    if config.alias:
        params.model_alias = {config.alias}
    if config.n_gpu_layers is not None:
        params.n_gpu_layers = config.n_gpu_layers
    params.no_op_offload = not config.op_offload
    overrides = config.tensor_overrides()
    if overrides:
        try:
            params.tensor_buft_overrides = ",".join(overrides)
        except ValueError as exc:
            print(f"error: --override-tensor {overrides}: {exc}", file=sys.stderr, flush=True)
            return 2
    try:
        server = xllamacpp.Server(params)
    except Exception as exc:  # llama.cpp's load errors come back as C++ exceptions
        print(f"error: llama.cpp server failed to start: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"ktutorial: llama.cpp server listening on {server.listening_address}", flush=True)
    signal.sigwait(stop_signals)
    # A normal interpreter exit would destroy the server object, which can hang mid-request.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
