"""Client authentication: HS256 JWTs, verified before any WebSocket upgrade.

The algorithm is pinned to HS256, so ``alg=none`` and public-key confusion
tokens are refused before the signature is even looked at. Reasons in
:class:`~pushsvc.errors.AuthError` are short and never echo the token.
The server uses :class:`TokenVerifier`; :func:`verify_token` (PyJWT) is the
reference it is tested against.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from .errors import AuthError

ALGORITHM = "HS256"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for.

    :param user_id: claim ``userId``, else ``sub``, as a string.
    :param expires_at: the ``exp`` claim in epoch seconds, or None.
    :param claims: every claim of the token.
    """

    user_id: str
    expires_at: float | None
    claims: dict[str, Any]


class TokenVerifier:
    """Verify HS256 tokens for one secret, on the connection hot path.

    PyJWT's ``decode`` costs about 30 microseconds a token, most of it
    generic machinery; during a reconnect storm that is the largest share of a
    handshake. HS256 verification itself is small: this does the same checks
    PyJWT does for our options (algorithm pinned, signature, ``exp``, ``nbf``,
    ``iat`` type) with a precomputed HMAC key, in a few microseconds. PyJWT
    remains the reference: the tests compare both on the same tokens.

    :param secret: the HS256 secret (``JWT_SECRET``).
    """

    __slots__ = ("_mac",)

    def __init__(self, secret: str) -> None:
        self._mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)

    def verify(self, token: str | None, *, now: float | None = None) -> Identity:
        """Check ``token`` and return its :class:`Identity`.

        :param now: the current time in epoch seconds (default: the clock).
        :raises AuthError: with a reason fit for the client (missing,
            malformed, bad signature, wrong algorithm, expired, no user id).
        """
        if not token:
            raise AuthError("missing token")
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            raise AuthError("malformed token") from None
        parts = raw.split(b".")
        if len(parts) != 3:
            raise AuthError("malformed token")
        header = _json_segment(parts[0])
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise AuthError("unsupported algorithm, expected HS256")
        try:
            signature = base64.urlsafe_b64decode(parts[2] + b"=" * (-len(parts[2]) % 4))
        except (binascii.Error, ValueError):
            raise AuthError("malformed token") from None
        mac = self._mac.copy()
        mac.update(raw[: len(parts[0]) + 1 + len(parts[1])])
        if not hmac.compare_digest(mac.digest(), signature):
            raise AuthError("invalid signature")
        claims = _json_segment(parts[1])
        clock = time.time() if now is None else now
        for name in ("exp", "nbf", "iat"):
            if name in claims and not _is_number(claims[name]):
                raise AuthError(f"malformed token ({name} is not a number)")
        # Whole seconds, compared as PyJWT compares them.
        if "exp" in claims and int(claims["exp"]) <= clock:
            raise AuthError("token expired")
        if "nbf" in claims and int(claims["nbf"]) > clock:
            raise AuthError("token not yet valid")
        if "iat" in claims and int(claims["iat"]) > clock:
            raise AuthError("token not yet valid (issued in the future)")
        for name in ("sub", "jti"):
            if name in claims and not isinstance(claims[name], str):
                raise AuthError(f"malformed token ({name} is not a string)")
        return _identity(claims)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_segment(segment: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(
            base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
        )
    except (binascii.Error, ValueError):
        raise AuthError("malformed token") from None
    if not isinstance(data, dict):
        raise AuthError("malformed token")
    return data


def _identity(claims: dict[str, Any]) -> Identity:
    user = claims.get("userId")
    if user is None or user == "":
        user = claims.get("sub")
    if user is None or user == "" or isinstance(user, (dict, list, bool)):
        raise AuthError("token has no userId or sub claim")
    exp = claims.get("exp")
    return Identity(
        user_id=str(user),
        expires_at=float(exp) if isinstance(exp, (int, float)) else None,
        claims=claims,
    )


def verify_token(token: str | None, secret: str) -> Identity:
    """Check ``token`` against ``secret`` with PyJWT (the reference verifier).

    :raises AuthError: with a reason fit for the client.
    """
    if not token:
        raise AuthError("missing token")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"verify_aud": False, "verify_iss": False},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("invalid signature") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError("unsupported algorithm, expected HS256") from None
    except jwt.ImmatureSignatureError:
        raise AuthError("token not yet valid") from None
    except jwt.DecodeError:
        raise AuthError("malformed token") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token ({type(exc).__name__})") from None
    return _identity(claims)


def mint_token(
    user_id: str, secret: str, *, ttl_s: float | None = 3600.0, **claims: Any
) -> str:
    """Sign a development token for ``user_id`` (claims ``sub`` and ``userId``).

    :param ttl_s: lifetime in seconds (default one hour); None for no ``exp``.
    :param claims: extra claims, e.g. ``assessments=["a-1"]``.
    """
    now = int(time.time())
    payload: dict[str, Any] = {"sub": user_id, "userId": user_id, "iat": now}
    if ttl_s is not None:
        payload["exp"] = now + int(ttl_s)
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm=ALGORITHM)
