"""Which engine serves a URL, and the adapter (its module's wire class) that speaks to it.

Kept apart from engines/http.py, which the engine modules import: knowing every engine here and
being imported by them there would close a cycle.
"""

from __future__ import annotations

from typing import Optional

import httpx

from ktutorial.engines.http import EngineAPI
from ktutorial.engines.llamacpp import LlamaCppAPI
from ktutorial.engines.sglang_kt import SGLangAPI
from ktutorial.errors import UserError

ADAPTERS = {"llamacpp": LlamaCppAPI, "sglang-kt": SGLangAPI, "sglang": SGLangAPI}


def detect_engine(base_url: str, client: Optional[httpx.Client] = None) -> str:
    """"llamacpp" or "sglang-kt", from the routes the server answers."""
    http = client or httpx.Client()
    try:
        for adapter in (LlamaCppAPI, SGLangAPI):
            if adapter.serves(base_url, http):
                return adapter.name
    except (httpx.HTTPError, ValueError) as exc:
        raise UserError(f"no server answers at {base_url} ({exc}); start one with `ktutorial serve`") from exc
    finally:
        if client is None:
            http.close()
    raise UserError(f"{base_url} is neither a llama.cpp nor an SGLang server (no /props, no /get_model_info)")


def adapter_for(base_url: str, engine: Optional[str] = None, client: Optional[httpx.Client] = None,
                tokenizer_path: Optional[str] = None) -> EngineAPI:
    """The adapter for the engine at `base_url` (`engine` names it, or it is detected), over
    `client` (the caller closes it) or a client of its own."""
    http = client or httpx.Client()
    try:
        name = engine or detect_engine(base_url, http)
        if name not in ADAPTERS:
            raise UserError(f"unknown engine {name!r}: use llamacpp or sglang-kt")
    except BaseException:
        if client is None:
            http.close()
        raise
    if ADAPTERS[name] is SGLangAPI:
        return SGLangAPI(base_url, http, tokenizer_path=tokenizer_path)
    return ADAPTERS[name](base_url, http)
