"""What every engine adapter shares: a streamed request's timing, JSON posts and the SSE reader.

An adapter speaks one engine's native routes (tokenize, generate by token ids, flush its cache,
describe itself); each lives in its engine's module (engines/llamacpp.py, engines/sglang_kt.py),
and engines/adapters.py picks the one a URL serves. This module knows no engine's dialect, only
HTTP: so the engine modules import it, and it imports none of them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import httpx

from ktutorial.errors import UserError


@dataclass
class RequestTiming:
    """What one streamed request showed the client, and what the server said about it."""

    ttft_s: float
    e2e_s: float
    output_tokens: int
    token_times_s: list[float]
    server: dict[str, Any] = field(default_factory=dict)


class EngineAPI:
    """One engine's native routes at `base_url`, over a caller's httpx client."""

    name = "?"
    route = "?"

    def __init__(self, base_url: str, client: httpx.Client):
        self.base_url = base_url.rstrip("/")
        self.http = client

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def context_tokens(self) -> Optional[int]:
        return None

    def before_request(self) -> None:
        """Defeat the prefix cache where the server needs telling."""

    def stream(self, ids: list[int], output_len: int, timeout_s: float) -> RequestTiming:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}

    def max_running_requests(self) -> Optional[int]:
        """How many requests the server runs at once (more wait in its queue), if it says."""
        return None

    def _post(self, path: str, body: dict, timeout: float = 60) -> dict:
        for attempt in range(2):
            try:
                r = self.http.post(self.base_url + path, json=body, timeout=timeout)
                break
            except httpx.RemoteProtocolError:
                # llama.cpp may close a kept-alive connection after a stream; the pool finds
                # out only on reuse. These routes are idempotent: once more, on a new connection.
                if attempt:
                    raise UserError(f"the server at {self.base_url} dropped {path} twice") from None
            except httpx.HTTPError as exc:
                raise UserError(f"the server at {self.base_url} did not answer {path}: {exc}") from exc
        if r.status_code != 200:
            raise UserError(f"{path} on {self.base_url} answered HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def _token_times(self, path: str, body: dict, timeout_s: float,
                     tokens_after: Callable[[dict, int], int]) -> tuple[list[float], float, dict]:
        """Stream `path` and give each output token the time its chunk arrived: (token times, time
        of the last chunk, the last chunk). `tokens_after(chunk, so_far)` is the engine's count of
        output tokens once the chunk has arrived (a chunk may carry several tokens, or none)."""
        times: list[float] = []
        last_s, last = None, {}
        for t, chunk in self._sse(path, body, timeout_s):
            last_s, last = t, chunk
            times.extend([t] * max(0, int(tokens_after(chunk, len(times))) - len(times)))
        if not times or last_s is None:
            raise UserError(f"{self.base_url}{path} streamed no tokens")
        return times, last_s, last

    def _sse(self, path: str, body: dict, timeout_s: float) -> Iterator[tuple[float, dict]]:
        """(seconds since the request was sent, chunk) for each `data:` line of an SSE reply."""
        t0 = time.perf_counter()
        timeout = httpx.Timeout(timeout_s, connect=10)
        try:
            # A connection of its own, closed after: no stale kept-alive socket, nothing queued.
            headers = {"Connection": "close"}
            with self.http.stream("POST", self.base_url + path, json=body, timeout=timeout, headers=headers) as r:
                if r.status_code != 200:
                    r.read()
                    raise UserError(f"{path} on {self.base_url} answered HTTP {r.status_code}: {r.text[:300]}")
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if isinstance(chunk, dict) and chunk.get("error"):
                        raise UserError(f"the server failed the request: {chunk['error']}")
                    yield time.perf_counter() - t0, chunk
        except httpx.TimeoutException as exc:
            raise TimeoutError(f"no reply from {self.base_url}{path} within {timeout_s:.0f} s") from exc
        except httpx.HTTPError as exc:
            raise UserError(f"the request to {self.base_url}{path} failed: {exc}") from exc


def served_model(base_url: str, client: httpx.Client) -> Optional[str]:
    """The first model id the server lists at /v1/models (both engines serve it), or None."""
    try:
        data = client.get(base_url.rstrip("/") + "/v1/models", timeout=10).json().get("data") or []
        return data[0].get("id") if data else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
