"""Secrets inside URLs (a `user:token@` part, a presigned query string) never printed or saved."""

from __future__ import annotations

import re

# scheme://user:password@host -> scheme://***@host
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")
# The query parameters that carry a credential or a signature: AWS SigV2/V4 presigned URLs, Azure
# SAS, Google signed URLs, and plain tokens.
_QUERY = re.compile(r"(?P<key>[?&](?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId|"
                    r"GoogleAccessId|X-Goog-(?:Signature|Credential)|sig|token|access_token)=)[^&#\s'\"]+",
                    re.IGNORECASE)
MASK = "***"


def redact(text: str) -> str:
    """text with every URL credential replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def redact_tree(value):
    """A JSON-like value (dicts, lists, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_tree(v) for v in value)
    return value
