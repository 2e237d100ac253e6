"""Tokens: HS256 only, exp enforced, user from userId else sub."""

import base64
import json
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushsvc.auth import TokenVerifier, mint_token, verify_token
from pushsvc.errors import AuthError

SECRET = "unit-test-secret-" + "0" * 56  # 72 bytes: long enough for HS512 too


@pytest.fixture(params=["fast", "pyjwt"])
def verify(request):
    """Both verifiers must keep the same contract; the server uses "fast"."""
    if request.param == "fast":
        return TokenVerifier(SECRET).verify
    return lambda token: verify_token(token, SECRET)


def _b64(data: dict) -> str:
    raw = json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_user_id_comes_from_userId_then_sub(verify):
    token = jwt.encode({"userId": "u-1", "sub": "s-1"}, SECRET, algorithm="HS256")
    assert verify(token).user_id == "u-1"
    token = jwt.encode({"sub": "s-1"}, SECRET, algorithm="HS256")
    assert verify(token).user_id == "s-1"


def test_minted_token_round_trips_with_expiry(verify):
    identity = verify(mint_token("trader", SECRET, ttl_s=60))
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
        (
            jwt.encode({"sub": "u", "exp": 1}, SECRET, algorithm="HS256"),
            "token expired",
        ),
        (jwt.encode({"role": "x"}, SECRET, algorithm="HS256"), "no userId or sub"),
        (
            _b64({"alg": "none", "typ": "JWT"}) + "." + _b64({"sub": "u"}) + ".",
            "algorithm",
        ),
        (jwt.encode({"sub": "u"}, SECRET, algorithm="HS512"), "algorithm"),
        (
            jwt.encode({"sub": "u", "nbf": 4e9}, SECRET, algorithm="HS256"),
            "not yet valid",
        ),
        (
            jwt.encode({"sub": "u"}, SECRET, algorithm="HS256")[:-4] + "AAAA",
            "invalid signature",
        ),
        ("a.b", "malformed"),
        ("é.é.é", "malformed"),
    ],
    ids=[
        "none",
        "empty",
        "malformed",
        "bad-signature",
        "expired",
        "no-user",
        "alg-none",
        "alg-hs512",
        "nbf-future",
        "tampered-signature",
        "two-parts",
        "non-ascii",
    ],
)
def test_bad_tokens_are_refused_with_a_reason(verify, token, reason):
    with pytest.raises(AuthError, match=reason):
        verify(token)


def test_reason_never_echoes_the_token(verify):
    token = "abc.def.ghi"
    with pytest.raises(AuthError) as info:
        verify(token)
    assert token not in info.value.reason


_claims = st.dictionaries(
    st.sampled_from(["sub", "userId", "exp", "nbf", "iat", "role"]),
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        st.lists(st.integers(), max_size=2),
    ),
)


def _well_formed(claims: dict) -> bool:
    times_are_numbers = all(
        isinstance(claims[k], (int, float)) and not isinstance(claims[k], bool)
        for k in ("exp", "nbf", "iat")
        if k in claims
    )
    return times_are_numbers and isinstance(claims.get("sub", ""), str)


@settings(max_examples=300, deadline=None)
@given(claims=_claims, alg=st.sampled_from(["HS256", "HS384"]), tamper=st.booleans())
def test_fast_verifier_agrees_with_pyjwt(claims, alg, tamper):
    """Never more lenient than PyJWT; on well-formed claims, exactly as strict.

    (PyJWT coerces odd time claims such as ``"iat": "5"`` with ``int()``; the
    fast verifier refuses any time claim that is not a number.)
    """
    token = jwt.encode(claims, SECRET, algorithm=alg)
    if tamper:
        token = token[:-2] + ("AA" if not token.endswith("AA") else "BA")
    try:
        expected = verify_token(token, SECRET).user_id
    except AuthError:
        expected = None
    try:
        got = TokenVerifier(SECRET).verify(token).user_id
    except AuthError:
        got = None
    if got is not None:
        assert got == expected
    if _well_formed(claims):
        assert got == expected
