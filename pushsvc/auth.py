"""Client authentication: HS256 JWTs, verified before any WebSocket upgrade.

The algorithm is pinned to HS256, so ``alg=none`` and public-key confusion
tokens are refused by PyJWT before the signature is even looked at. Reasons in
:class:`~pushsvc.errors.AuthError` are short and never echo the token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

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


def verify_token(token: str | None, secret: str) -> Identity:
    """Check ``token`` and return its :class:`Identity`.

    :raises AuthError: with a reason fit for the client (missing, malformed,
        bad signature, wrong algorithm, expired, no user id).
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
