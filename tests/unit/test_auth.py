"""Tokens: HS256 only, exp enforced, user from userId else sub."""

import base64
import json
import time

import jwt
import pytest

from pushsvc.auth import mint_token, verify_token
from pushsvc.errors import AuthError

SECRET = "unit-test-secret-" + "0" * 56  # 72 bytes: long enough for HS512 too


def _b64(data: dict) -> str:
    raw = json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_user_id_comes_from_userId_then_sub():
    token = jwt.encode({"userId": "u-1", "sub": "s-1"}, SECRET, algorithm="HS256")
    assert verify_token(token, SECRET).user_id == "u-1"
    token = jwt.encode({"sub": "s-1"}, SECRET, algorithm="HS256")
    assert verify_token(token, SECRET).user_id == "s-1"


def test_minted_token_round_trips_with_expiry():
    identity = verify_token(mint_token("trader", SECRET, ttl_s=60), SECRET)
    assert identity.user_id == "trader"
    assert identity.expires_at is not None
    assert identity.expires_at > time.time()


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing token"),
        ("", "missing token"),
        ("not-a-jwt", "malformed token"),
        (
            jwt.encode({"sub": "u"}, "another-secret-that-is-long-enough-00", "HS256"),
            "invalid signature",
        ),
        (jwt.encode({"sub": "u", "exp": 1}, SECRET, algorithm="HS256"), "token expired"),
        (jwt.encode({"role": "x"}, SECRET, algorithm="HS256"), "no userId or sub"),
        (_b64({"alg": "none", "typ": "JWT"}) + "." + _b64({"sub": "u"}) + ".", "algorithm"),
        (jwt.encode({"sub": "u"}, SECRET, algorithm="HS512"), "algorithm"),
    ],
    ids=["none", "empty", "malformed", "bad-signature", "expired", "no-user",
         "alg-none", "alg-hs512"],
)
def test_bad_tokens_are_refused_with_a_reason(token, reason):
    with pytest.raises(AuthError, match=reason):
        verify_token(token, SECRET)


def test_reason_never_echoes_the_token():
    token = "abc.def.ghi"
    with pytest.raises(AuthError) as info:
        verify_token(token, SECRET)
    assert token not in info.value.reason
