"""A small async client for OpenAI-compatible /chat/completions (OpenRouter, vLLM, llama.cpp server...).

Retries connection errors, 408, 409, 429 and 5xx with exponential backoff and jitter, honouring
Retry-After. Never retries 400/401/403/404: those need the user, and the message says what to fix.
The key is read from the environment only and is never logged: every message built from a server's
reply goes through redact(), because servers echo keys back ("Incorrect API key provided: sk-...").
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from .errors import UserError

# redaction lives in its own module (no httpx, so config imports it fast); these names stay importable from here
from .redact import KEY_ENV_VARS, redact, redact_url, url_secrets  # noqa: F401

RETRY_STATUS = {408, 409, 429} | set(range(500, 600))
MAX_RETRY_AFTER = 60.0
NOT_JSON_HINT = "is the base URL right (it should end in /v1)?"


class ApiError(UserError):
    """The API refused the request in a way retrying will not fix."""


class ApiUnavailable(UserError):
    """The API stayed unreachable or overloaded through every retry."""


def is_openrouter(base_url: str) -> bool:
    """True for openrouter.ai and its subdomains, judged by the host only (never by text in the path)."""
    try:
        host = (urlsplit(base_url).hostname or "").rstrip(".")
    except ValueError:  # e.g. a malformed port or IPv6 literal
        return False
    return host == "openrouter.ai" or host.endswith(".openrouter.ai")


def api_key_for(base_url: str) -> str:
    key = os.environ.get("OPENAI_API_KEY", "")
    if not key and is_openrouter(base_url):
        key = os.environ.get("OPENROUTER_API_KEY", "")
    return key


def non_json_note(r: httpx.Response) -> str | None:
    """None when the body parses as JSON; otherwise one line saying what came instead, and the likely fix."""
    try:
        orjson.loads(r.content)
        return None
    except orjson.JSONDecodeError:
        pass
    ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
    head = r.content[:512].lstrip().lower()
    if "html" in ctype or head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        kind = "HTML"
    elif not r.content.strip():
        kind = "an empty body"
    else:
        kind = ctype or "text"
    return f"the server answered {kind}, not JSON: {NOT_JSON_HINT}"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait, from `Retry-After: 3` or an HTTP date; capped, never negative."""
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return min(max(when - (now if now is not None else time.time()), 0.0), MAX_RETRY_AFTER)


@dataclass
class Stats:
    requests: int = 0
    retries: int = 0
    errors: int = 0
    by_reason: dict = field(default_factory=dict)

    def count(self, reason: str) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1


@dataclass
class Completion:
    content: str
    finish_reason: str


class ChatClient:
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 6, backoff_base: float = 1.0, backoff_cap: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        u = urlsplit(base_url)  # the path grows; a query string (e.g. ?api-version=) stays at the end
        self.endpoint = urlunsplit(u._replace(path=u.path.rstrip("/") + "/chat/completions"))
        self.url = redact_url(self.endpoint)  # for messages
        self.model = model
        key = api_key if api_key is not None else api_key_for(base_url)
        self.secrets = [key, *url_secrets(base_url)]  # what redact() must hide beyond the env keys
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # One connection per request in flight: httpx's default pool (100 connections, 20 kept alive) would queue
        # requests past 100 and reopen connections past 20, whatever --concurrency says.
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.http = httpx.AsyncClient(headers=headers, timeout=timeout, transport=transport, limits=limits)
        self.limit = asyncio.Semaphore(concurrency)
        self.max_retries, self.backoff_base, self.backoff_cap = max_retries, backoff_base, backoff_cap
        self.stats = Stats()

    async def aclose(self) -> None:
        await self.http.aclose()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return min(self.backoff_cap, self.backoff_base * 2 ** attempt) * random.uniform(0.5, 1.0)

    def _error(self, cls: type[UserError], message: str) -> UserError:
        """The one door for messages that carry server text: redacted, then raised by the caller."""
        return cls(redact(message, self.secrets))

    def _fatal(self, r: httpx.Response) -> UserError:
        detail = non_json_note(r)
        if detail is None:
            detail = r.json()
            detail = detail.get("error", detail) if isinstance(detail, dict) else detail
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
            detail = str(detail)[:300]
        if r.status_code == 401:
            msg = f"401 Unauthorized from {self.url}: check OPENAI_API_KEY in .env ({detail})"
        elif r.status_code == 403:
            msg = f"403 Forbidden from {self.url}: the key lacks access to model {self.model!r} ({detail})"
        elif r.status_code == 404:
            msg = f"404 from {self.url}: check api_base_url (it should end in /v1) and api_model ({detail})"
        else:
            msg = f"{r.status_code} from {self.url}: the request was refused, retrying won't help ({detail})"
        return self._error(ApiError, msg)

    def _completion(self, r: httpx.Response) -> tuple[Completion | None, str]:
        """A 200's completion, or (None, why not). An HTML page is a wrong URL, not a hiccup: raised at once."""
        note = non_json_note(r)
        if note is not None and "HTML" in note:
            raise self._error(ApiError, f"200 from {self.url}: {note}")
        if note is not None:
            return None, note
        body = r.json()
        try:
            choice = body["choices"][0]
            return Completion(choice["message"].get("content") or "", choice.get("finish_reason") or "stop"), ""
        except (KeyError, IndexError, TypeError, AttributeError):
            error = body.get("error") if isinstance(body, dict) else None
            return None, f"no choices in the reply: {str(error or body)[:200]}"

    async def chat(self, messages: list[dict], *, temperature: float = 0.7, max_tokens: int = 256,
                   top_p: float = 1.0, min_p: float = 0.0) -> Completion:
        body = {"model": self.model, "messages": messages, "temperature": temperature,
                "max_tokens": max_tokens, "top_p": top_p}
        if min_p > 0:  # vLLM, llama.cpp's server and OpenRouter take it; sent only when set, as some servers refuse it
            body["min_p"] = min_p
        async with self.limit:
            for attempt in range(self.max_retries + 1):
                self.stats.requests += 1
                retry_after = None
                try:
                    r = await self.http.post(self.endpoint, json=body)
                except httpx.TransportError as e:
                    reason = type(e).__name__
                    detail = f"{reason}: {str(e)[:200]}" if str(e) else reason
                else:
                    if r.status_code == 200:
                        try:
                            completion, detail = self._completion(r)
                        except ApiError:
                            self.stats.errors += 1
                            raise
                        if completion is not None:
                            return completion
                        reason = "malformed JSON"
                        detail = f"malformed JSON ({detail})"
                    elif r.status_code in RETRY_STATUS:
                        reason = detail = f"HTTP {r.status_code}"
                        retry_after = parse_retry_after(r.headers.get("retry-after"))
                    else:
                        self.stats.errors += 1
                        raise self._fatal(r)
                self.stats.count(reason)
                if attempt == self.max_retries:
                    self.stats.errors += 1
                    raise self._error(ApiUnavailable, f"{self.url} failed {attempt + 1} times (last: {detail}); "
                                                      f"rows written so far are kept: rerun the same command to resume")
                self.stats.retries += 1
                await asyncio.sleep(self._backoff(attempt, retry_after))
        raise AssertionError("unreachable")
