"""A small async client for OpenAI-compatible /chat/completions (OpenRouter, vLLM, llama.cpp server...).

Retries connection errors, 408, 409, 429 and 5xx with exponential backoff and jitter, honouring
Retry-After. Never retries 400/401/403/404: those need the user, and the message says what to fix.
The key is read from the environment only and is never logged.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from dataclasses import dataclass, field

import httpx

from .errors import UserError

RETRY_STATUS = {408, 409, 429} | set(range(500, 600))
MAX_RETRY_AFTER = 60.0


class ApiError(UserError):
    """The API refused the request in a way retrying will not fix."""


class ApiUnavailable(UserError):
    """The API stayed unreachable or overloaded through every retry."""


def redact_url(url: str) -> str:
    """Drops user:password@ and the query string, where keys are sometimes pasted."""
    from urllib.parse import urlsplit, urlunsplit

    if not url:
        return url
    u = urlsplit(url)
    host = (u.hostname or "") + (f":{u.port}" if u.port else "")
    return urlunsplit((u.scheme, host, u.path, "", ""))


def api_key_for(base_url: str) -> str:
    key = os.environ.get("OPENAI_API_KEY", "")
    if not key and "openrouter.ai" in base_url:
        key = os.environ.get("OPENROUTER_API_KEY", "")
    return key


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
        self.endpoint = base_url.rstrip("/") + "/chat/completions"
        self.url = redact_url(self.endpoint)  # for messages
        self.model = model
        key = api_key if api_key is not None else api_key_for(base_url)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(headers=headers, timeout=timeout, transport=transport)
        self.limit = asyncio.Semaphore(concurrency)
        self.max_retries, self.backoff_base, self.backoff_cap = max_retries, backoff_base, backoff_cap
        self.stats = Stats()

    async def aclose(self) -> None:
        await self.http.aclose()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return min(self.backoff_cap, self.backoff_base * 2 ** attempt) * random.uniform(0.5, 1.0)

    def _fatal(self, r: httpx.Response) -> ApiError:
        try:
            detail = r.json().get("error", r.text)
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except ValueError:
            detail = r.text
        detail = str(detail)[:300]
        if r.status_code == 401:
            return ApiError(f"401 Unauthorized from {self.url}: check OPENAI_API_KEY in .env ({detail})")
        if r.status_code == 403:
            return ApiError(f"403 Forbidden from {self.url}: the key lacks access to model {self.model!r} ({detail})")
        if r.status_code == 404:
            return ApiError(f"404 from {self.url}: check api_base_url (it should end in /v1) and api_model ({detail})")
        return ApiError(f"{r.status_code} from {self.url}: the request was refused, retrying won't help ({detail})")

    async def chat(self, messages: list[dict], *, temperature: float = 0.7, max_tokens: int = 256,
                   top_p: float = 1.0) -> Completion:
        body = {"model": self.model, "messages": messages, "temperature": temperature,
                "max_tokens": max_tokens, "top_p": top_p}
        async with self.limit:
            for attempt in range(self.max_retries + 1):
                self.stats.requests += 1
                retry_after = None
                try:
                    r = await self.http.post(self.endpoint, json=body)
                except httpx.TransportError as e:
                    reason = type(e).__name__
                else:
                    if r.status_code == 200:
                        try:
                            choice = r.json()["choices"][0]
                            return Completion(choice["message"].get("content") or "",
                                              choice.get("finish_reason") or "stop")
                        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                            reason = "malformed JSON"
                    elif r.status_code in RETRY_STATUS:
                        reason = f"HTTP {r.status_code}"
                        retry_after = parse_retry_after(r.headers.get("retry-after"))
                    else:
                        self.stats.errors += 1
                        raise self._fatal(r)
                self.stats.count(reason)
                if attempt == self.max_retries:
                    self.stats.errors += 1
                    raise ApiUnavailable(f"{self.url} failed {attempt + 1} times (last: {reason}); rows written so "
                                         f"far are kept: rerun the same command to resume")
                self.stats.retries += 1
                await asyncio.sleep(self._backoff(attempt, retry_after))
        raise AssertionError("unreachable")
