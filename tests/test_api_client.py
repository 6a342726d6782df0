import asyncio
import email.utils
import time

import httpx
import pytest

from promptbake import api_client
from promptbake.api_client import ApiError, ApiUnavailable, ChatClient, parse_retry_after

OK = {"choices": [{"message": {"role": "assistant", "content": "Arr!"}, "finish_reason": "stop"}]}


@pytest.fixture
def sleeps(monkeypatch):
    waits = []

    async def fake_sleep(s):
        waits.append(s)

    monkeypatch.setattr(api_client.asyncio, "sleep", fake_sleep)
    return waits


def run(responses, **kw):
    """Serves `responses` in order (a status, a (status, headers, body), or an exception); returns (result, calls)."""
    calls = []

    def handler(request):
        calls.append(request)
        r = responses[min(len(calls) - 1, len(responses) - 1)]
        if isinstance(r, Exception):
            raise r
        status, headers, body = r if isinstance(r, tuple) else (r, {}, OK if r == 200 else {"error": {"message": "x"}})
        return httpx.Response(status, headers=headers, json=body) if not isinstance(body, bytes) else \
            httpx.Response(status, headers=headers, content=body)

    async def go():
        client = ChatClient("http://test/v1", "m", api_key="sk-test", transport=httpx.MockTransport(handler), **kw)
        try:
            return await client.chat([{"role": "user", "content": "hi"}]), client.stats
        finally:
            await client.aclose()

    result, stats = asyncio.run(go())
    return result, calls, stats


def test_429_honours_retry_after(sleeps):
    result, calls, stats = run([(429, {"Retry-After": "7"}, {}), 200])
    assert result.content == "Arr!" and len(calls) == 2
    assert sleeps == [7.0] and stats.retries == 1


def test_500_then_200_backs_off(sleeps):
    result, calls, _ = run([500, 502, 200], backoff_base=1.0)
    assert result.content == "Arr!" and len(calls) == 3
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0  # exponential with jitter


def test_401_not_retried_and_says_what_to_fix(sleeps):
    with pytest.raises(ApiError, match="401 Unauthorized.*check OPENAI_API_KEY in .env"):
        run([401, 200])
    assert sleeps == []


def test_400_not_retried(sleeps):
    with pytest.raises(ApiError, match="400 from http://test/v1/chat/completions"):
        run([400, 200])
    assert sleeps == []


def test_timeout_then_success(sleeps):
    result, calls, stats = run([httpx.ReadTimeout("slow"), httpx.ConnectError("refused"), 200])
    assert result.content == "Arr!" and len(calls) == 3
    assert stats.by_reason == {"ReadTimeout": 1, "ConnectError": 1}


def test_malformed_json_retried(sleeps):
    result, calls, stats = run([(200, {}, b"{not json"), (200, {}, {"choices": []}), 200])
    assert result.content == "Arr!" and stats.by_reason == {"malformed JSON": 2}


def test_gives_up_with_resumable_message(sleeps):
    with pytest.raises(ApiUnavailable, match="failed 3 times.*rerun the same command to resume"):
        run([httpx.ConnectError("down")], max_retries=2)


def test_key_sent_as_bearer_and_fallback(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-x")
    assert api_client.api_key_for("https://openrouter.ai/api/v1") == "sk-or-x"
    assert api_client.api_key_for("http://127.0.0.1:8080/v1") == ""
    _, calls, _ = run([200])
    assert calls[0].headers["authorization"] == "Bearer sk-test"


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("100000") == api_client.MAX_RETRY_AFTER
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 10, usegmt=True)
    assert 8.0 <= parse_retry_after(date, now=now) <= 11.0
