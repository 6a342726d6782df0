import asyncio
import email.utils
import time

import httpx
import orjson
import pytest

from promptbake import api_client
from promptbake.api_client import ApiError, ApiUnavailable, ChatClient, parse_retry_after, redact

OK = {"choices": [{"message": {"role": "assistant", "content": "Arr!"}, "finish_reason": "stop"}]}


@pytest.fixture
def sleeps(monkeypatch):
    waits = []

    async def fake_sleep(s):
        waits.append(s)

    monkeypatch.setattr(api_client.asyncio, "sleep", fake_sleep)
    return waits


def run(responses, base_url="http://test/v1", **kw):
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
        client = ChatClient(base_url, "m", api_key="sk-test", transport=httpx.MockTransport(handler), **kw)
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


ENV_KEY, ROUTER_KEY = "sk-env-0123456789abcdefXYZ", "sk-or-v1-feedface0123456789"
ECHO = (f"Incorrect API key provided: sk-test; env {ENV_KEY} router {ROUTER_KEY}; header Bearer abc.def-ghi; "
        "other sk-proj-ABCDEFGHIJKLMNOPQRSTUV; see https://bob:hunter2@proxy.example/v1?api_key=qwerty&x=1")
LEAKS = ["sk-test", ENV_KEY, ROUTER_KEY, "abc.def-ghi", "sk-proj-ABCDEFGHIJKLMNOPQRSTUV", "hunter2", "qwerty"]


@pytest.fixture
def keys_in_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("OPENROUTER_API_KEY", ROUTER_KEY)


def test_redact_hides_known_and_key_looking_tokens(keys_in_env):
    text = redact(ECHO, secrets=["sk-test"])
    assert not [s for s in LEAKS if s in text], text
    assert "Bearer ***" in text and "https://***@proxy.example/v1?***" in text
    plain = "no secrets here: http://127.0.0.1:8080/v1, 12 tokens, key provided"
    assert redact(plain) == plain


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_refusal_bodies_are_redacted(sleeps, keys_in_env, status):
    with pytest.raises(ApiError) as e:
        run([(status, {}, {"error": {"message": ECHO}})])
    assert f"{status}" in str(e.value) and "***" in str(e.value)
    assert not [s for s in LEAKS if s in str(e.value)], str(e.value)


def test_given_up_message_is_redacted(sleeps, keys_in_env):
    with pytest.raises(ApiUnavailable) as e:
        run([(200, {}, {"error": {"message": ECHO}})], max_retries=1)  # a 200 without choices: retried, then given up
    assert "malformed JSON" in str(e.value) and "rerun the same command to resume" in str(e.value)
    assert not [s for s in LEAKS if s in str(e.value)], str(e.value)


def test_openrouter_key_by_host_only(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-x")
    assert api_client.api_key_for("https://api.openrouter.ai/v1") == "sk-or-x"
    assert api_client.api_key_for("HTTPS://OpenRouter.AI/api/v1") == "sk-or-x"
    for url in ("http://127.0.0.1:8080/openrouter.ai/v1", "https://openrouter.ai.evil.example/v1",
                "https://notopenrouter.ai/v1", "http://x/v1?to=openrouter.ai"):
        assert api_client.api_key_for(url) == "", url


HTML = (200, {"content-type": "text/html; charset=utf-8"}, b"<!DOCTYPE html><html><body>llama.cpp web UI</body></html>")
HINT = r"the server answered HTML, not JSON: is the base URL right \(it should end in /v1\)\?"


def test_html_on_200_is_a_wrong_url_not_retried(sleeps):
    with pytest.raises(ApiError, match="200 from http://test/chat/completions: " + HINT):
        run([HTML, 200], base_url="http://test")
    assert sleeps == []


def test_html_on_404_says_so_with_redacted_url(sleeps):
    with pytest.raises(ApiError, match="404 from http://test/api/chat/completions: .*" + HINT) as e:
        run([(404, {"content-type": "text/html"}, b"<html><h1>Not Found</h1></html>")],
            base_url="http://bob:hunter2@test/api?key=qwerty")
    assert "hunter2" not in str(e.value) and "qwerty" not in str(e.value) and "<h1>" not in str(e.value)


def test_plain_text_on_200_retried_then_reported(sleeps):
    with pytest.raises(ApiUnavailable, match="failed 2 times.*the server answered text/plain, not JSON: is the base"):
        run([(200, {"content-type": "text/plain"}, b"OK")], max_retries=1)
    assert len(sleeps) == 1


def test_query_string_stays_at_the_end_of_the_endpoint(sleeps):
    _, calls, _ = run([200], base_url="http://test/v1/?api-version=2024")
    assert str(calls[0].url) == "http://test/v1/chat/completions?api-version=2024"


def test_min_p_is_sent_only_when_set(sleeps):
    """Hot samples (T=2.0) need the min_p guard on an API too; a server that lacks it never sees the field at 0."""
    def body_of(**kw):
        calls = []

        def handler(request):
            calls.append(orjson.loads(request.content))
            return httpx.Response(200, json=OK)

        async def go():
            client = ChatClient("http://test/v1", "m", transport=httpx.MockTransport(handler))
            try:
                await client.chat([{"role": "user", "content": "hi"}], temperature=2.0, **kw)
            finally:
                await client.aclose()

        asyncio.run(go())
        return calls[0]

    assert body_of(min_p=0.1)["min_p"] == 0.1 and body_of(min_p=0.1)["temperature"] == 2.0
    assert "min_p" not in body_of()


async def slow_server(delay: float, state: dict):
    """A keep-alive HTTP/1.1 server on loopback that answers every POST after `delay` seconds, counting the
    requests in flight at once and the connections opened. (Its listen backlog is larger than asyncio's default of
    100, which would itself hold connections back.)"""

    async def serve(reader, writer):
        state["connections"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
                await asyncio.sleep(delay)
                state["now"] -= 1
                body = orjson.dumps(OK)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024)


@pytest.mark.parametrize("concurrency", [4, 150])
def test_nothing_serialises_requests_up_to_concurrency(concurrency):
    """A slow server (as a busy vLLM is) sees exactly `concurrency` requests at once, over a real socket: not
    fewer (httpx's default pool stopped at 100 connections: this failed with 100 == 150), not more (the semaphore)."""
    state = {"now": 0, "max": 0, "connections": 0}
    n, delay = 2 * concurrency, 0.4

    async def go():
        server = await slow_server(delay, state)
        port = server.sockets[0].getsockname()[1]
        client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", api_key="", concurrency=concurrency, max_retries=0)
        t0 = time.perf_counter()
        try:
            out = await asyncio.gather(*[client.chat([{"role": "user", "content": "hi"}]) for _ in range(n)])
        finally:
            await client.aclose()
            server.close()
        return out, time.perf_counter() - t0

    out, took = asyncio.run(go())
    assert [c.content for c in out] == ["Arr!"] * n
    assert state["max"] == concurrency, state
    print(f"concurrency {concurrency}: {n} requests of {delay}s in {took:.1f}s, {state['connections']} connections")
