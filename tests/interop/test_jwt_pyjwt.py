"""Tokens minted by PyJWT (RS256 and ES256) are accepted; expired,
wrong-audience and forged ones are refused with 401."""

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest

from conftest import ISSUER

SUB = "system:serviceaccount:shop:checkout"


def mint(env, alg, **overrides):
    key, kid = env.signing_keys[alg]
    claims = {"iss": ISSUER, "aud": "orders", "sub": SUB,
              "iat": int(time.time()), "exp": int(time.time()) + 300}
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def call(env, token, path="/api/catalog/items"):
    return env.send("GET", path, {"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_valid_tokens_are_accepted(env, alg):
    env.upstream.drain()
    status, body = call(env, mint(env, alg))
    assert status == 200, body
    (seen,) = env.upstream.drain()
    assert seen["headers"]["x-amzn-lattice-identity"] == "Principal=shop/checkout; Type=K8S"


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_expired_token_is_refused(env, alg):
    status, body = call(env, mint(env, alg, exp=int(time.time()) - 600))
    assert status == 401
    assert body["reason"] == "token expired"


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_wrong_audience_is_refused(env, alg):
    status, body = call(env, mint(env, alg, aud="payments"))
    assert status == 401
    assert body["reason"] == "audience mismatch"


def test_alg_mismatch_with_key_is_refused(env):
    # An RS256 token claiming the EC key's kid.
    key, _ = env.signing_keys["RS256"]
    token = jwt.encode({"iss": ISSUER, "aud": "orders", "sub": SUB, "exp": int(time.time()) + 300},
                       key, algorithm="RS256", headers={"kid": "ec1"})
    status, body = call(env, token)
    assert status == 401
    assert body["reason"] == "algorithm not allowed"


def test_hs256_with_public_jwks_as_secret_is_refused(env):
    # The classic key-confusion token, built by hand: PyJWT refuses to make it.
    def seg(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    signing_input = seg({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}) + "." + seg(
        {"iss": ISSUER, "aud": "orders", "sub": SUB, "exp": int(time.time()) + 300})
    secret = (env.dir / "jwks.json").read_bytes()
    sig = base64.urlsafe_b64encode(
        hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    status, body = call(env, f"{signing_input}.{sig}")
    assert status == 401
    assert body["reason"] == "algorithm not allowed"


def test_tampered_claims_are_refused(env):
    header, payload, sig = mint(env, "ES256").split(".")
    other = mint(env, "ES256", sub="system:serviceaccount:shop:admin").split(".")[1]
    status, body = call(env, f"{header}.{other}.{sig}")
    assert status == 401
    assert body["reason"] == "signature invalid"


def test_token_for_other_namespace_is_403(env):
    status, body = call(env, mint(env, "RS256", sub="system:serviceaccount:billing:worker"))
    assert status == 403, body
