"""A service's credentials as the operator sees them: the user's API-key Secret and its own
internal Secret, turned into what the pods' rollout needs, never into copies of the keys.

The operator reads the user's Secret only to notice a change: `auth_hash` is an HMAC of the
key file keyed by the service's internal tokens, so the `kvflock.dev/auth-hash` annotation
that rolls the pods tells nobody who can read Pods anything about a key, not even a weak one
tried by brute force. The internal tokens are made once per service with `secrets`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvflock.operator.children import ADMIN_TOKEN_KEY, INTERNAL_TOKEN_KEY

_TOKEN_BYTES = 32


@dataclass(frozen=True)
class AuthState:
    """What the operator found of a service's Secrets: the hash that rolls the pods, or why
    it cannot tell (then nothing rolls and the service is Degraded)."""

    hash: str | None = None
    problem: str | None = None


def new_tokens() -> dict[str, str]:
    """Fresh internal and admin tokens (distinct, URL-safe, 256 bits each)."""
    return {INTERNAL_TOKEN_KEY: secrets.token_urlsafe(_TOKEN_BYTES),
            ADMIN_TOKEN_KEY: secrets.token_urlsafe(_TOKEN_BYTES)}


def secret_data(secret: Mapping[str, Any]) -> dict[str, bytes]:
    """A Secret's values, decoded (`data` is base64; `stringData` only where a server kept it)."""
    decoded = {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}
    decoded.update({key: str(value).encode() for key, value in (secret.get("stringData") or {}).items()})
    return decoded


def auth_state(namespace: str, secret_name: str, key: str, user_secret: Mapping[str, Any] | None,
               internal: Mapping[str, bytes]) -> AuthState:
    """The hash of the user's keys and the internal tokens, or the problem naming the Secret."""
    if user_secret is None:
        return AuthState(problem=f"spec.auth.apiKeySecretRef: Secret {namespace}/{secret_name} not found; "
                                 "create it with the API keys, one per line")
    data = secret_data(user_secret)
    if key not in data:
        keys = ", ".join(sorted(data)) or "none"
        return AuthState(problem=f"spec.auth.apiKeySecretRef: Secret {namespace}/{secret_name} has no key "
                                 f"{key!r} (its keys: {keys})")
    if not data[key].strip():
        return AuthState(problem=f"spec.auth.apiKeySecretRef: key {key!r} of Secret {namespace}/{secret_name} "
                                 "is empty; write at least one API key")
    return AuthState(hash=auth_hash(data[key], internal))


def auth_hash(api_keys: bytes, internal: Mapping[str, bytes]) -> str:
    """A short HMAC of the API-key file, keyed by the internal tokens (so it changes with them too)."""
    secret_key = b"\0".join(internal[name] for name in sorted(internal))
    return hmac.new(secret_key, api_keys, hashlib.sha256).hexdigest()[:16]


def admin_token(internal: Mapping[str, bytes]) -> bytes | None:
    return internal.get(ADMIN_TOKEN_KEY) or None
