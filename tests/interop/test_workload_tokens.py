"""Workload tokens minted by PyJWT and jwcrypto (RS256, PS256, ES256, EdDSA),
shaped like a real EKS projected service-account token and a SPIFFE JWT-SVID,
verified against key sets warden fetches over HTTPS."""

import json
import time
import uuid

import jwt as pyjwt
import pytest
from jwcrypto import jwt as jcjwt

from conftest import EKS_ISSUER, SPIRE_ISSUER

ALGS = ["RS256", "PS256", "ES256", "EdDSA"]
LIBS = ["pyjwt", "jwcrypto"]


def eks_claims():
    now = int(time.time())
    return {
        "aud": ["sts.amazonaws.com"], "exp": now + 86400 // 24, "iat": now, "nbf": now,
        "iss": EKS_ISSUER,
        "kubernetes.io": {
            "namespace": "shop",
            "pod": {"name": "checkout-7d4b9c-x2x9z", "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": "checkout", "uid": str(uuid.uuid4())},
        },
        "sub": "system:serviceaccount:shop:checkout",
    }


def svid_claims():
    now = int(time.time())
    return {"aud": ["orders"], "exp": now + 300, "iat": now,
            "iss": SPIRE_ISSUER, "sub": "spiffe://example.org/ns/shop/sa/web"}


def mint(env, lib, alg, claims, typ="JWT"):
    entry = env.workload_keys[(lib, alg)]
    kid = entry["public"]["kid"]
    if lib == "pyjwt":
        return pyjwt.encode(claims, entry["key"], algorithm=alg, headers={"kid": kid, "typ": typ})
    token = jcjwt.JWT(header={"alg": alg, "kid": kid, "typ": typ}, claims=json.dumps(claims))
    token.make_signed_token(entry["key"])
    return token.serialize()


def call(env, token, path):
    return env.send("GET", path, {"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("lib", LIBS)
def test_eks_service_account_token(env, lib, alg):
    env.upstream.drain()
    status, body = call(env, mint(env, lib, alg, eks_claims()), "/api/catalog/items")
    assert status == 200, body
    (seen,) = env.upstream.drain()
    assert seen["headers"]["x-amzn-lattice-identity"] == "Principal=shop/checkout; Type=K8S"


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("lib", LIBS)
def test_spiffe_jwt_svid(env, lib, alg):
    env.upstream.drain()
    status, body = call(env, mint(env, lib, alg, svid_claims()), "/api/orders/42")
    assert status == 200, body
    (seen,) = env.upstream.drain()
    assert seen["headers"]["x-amzn-lattice-identity"] == \
        "Principal=spiffe://example.org/ns/shop/sa/web; Type=SPIFFE"


@pytest.mark.parametrize("lib", LIBS)
def test_svid_from_another_trust_domain_is_refused(env, lib):
    claims = {**svid_claims(), "sub": "spiffe://evil.org/ns/shop/sa/web"}
    status, body = call(env, mint(env, lib, "ES256", claims), "/api/orders/42")
    assert status == 401
    assert "trust domain" in body["reason"]


def test_key_sets_were_fetched_once_each_over_https(env):
    # Two issuers, one fetch each at start; every token above reused them.
    metrics = env.warden.metrics()
    assert f'warden_jwks_refresh_total{{issuer="{EKS_ISSUER}",result="ok"}} 1' in metrics
    assert f'warden_jwks_refresh_total{{issuer="{SPIRE_ISSUER}",result="ok"}} 1' in metrics
