"""Keys kept out of messages, logs and files: known secrets and key-looking text replaced with '***'.

A module of its own, with nothing but the standard library, so that promptbake.config (which redacts the API
base URL it prints) imports in milliseconds; api_client re-exports these names.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlsplit, urlunsplit

KEY_ENV_VARS = ("OPENAI_API_KEY", "OPENROUTER_API_KEY")

# Key-looking text a server may echo back, whether or not we know the key.
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")
_SK_TOKEN = re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@?#]+@")
_URL_QUERY = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s?#\"'<>]*)\?[^\s#\"'<>]*")
_KEY_PARAM = re.compile(r"(?i)\b((?:api[_-]?key|access[_-]?token|auth[_-]?token|secret|password)[\"']?\s*[:=]\s*[\"']?)"
                        r"[^\s\"'&,;}]+")
MIN_SECRET_LEN = 4  # shorter "secrets" would garble every message and are no real key


def redact(text: str, secrets=()) -> str:
    """Replaces known keys (the env keys and `secrets`) and key-looking tokens in `text` with '***'."""
    text = str(text)
    known = {s for s in (*secrets, *(os.environ.get(v, "") for v in KEY_ENV_VARS)) if s and len(s) >= MIN_SECRET_LEN}
    for secret in sorted(known, key=len, reverse=True):  # longest first: one key may contain another
        text = text.replace(secret, "***")
    text = _BEARER.sub(r"\1***", text)
    text = _SK_TOKEN.sub("***", text)
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _URL_QUERY.sub(r"\1?***", text)
    return _KEY_PARAM.sub(r"\1***", text)


def url_secrets(url: str) -> list[str]:
    """The password and query values of a URL: the places keys get pasted into a base URL."""
    u = urlsplit(url or "")
    return [s for s in (u.password, *(v for _, v in parse_qsl(u.query))) if s]


def redact_url(url: str) -> str:
    """Drops user:password@ and the query string, where keys are sometimes pasted."""
    if not url:
        return url
    u = urlsplit(url)
    host = (u.hostname or "") + (f":{u.port}" if u.port else "")
    return urlunsplit((u.scheme, host, u.path, "", ""))
