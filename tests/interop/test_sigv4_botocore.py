"""Requests signed by botocore's SigV4Auth (service vpc-lattice-svcs) are
accepted; a one-byte change to any signed part is refused with 401."""

import hashlib
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from conftest import ACCESS_KEY, SECRET

BODY = b'{"order":"book","qty":1}'
IDENTITY = ("Principal=arn:aws:iam::123456789012:role/order-service-role; "
            "PrincipalOrgID=o-exampleorgid; Type=AWS_IAM")


def sign(env, method, path, body=b"", headers=None, payload="signed", secret=SECRET):
    """Returns (headers, path) as botocore signed them."""
    headers = dict(headers or {})
    if payload == "unsigned":
        headers["X-Amz-Content-SHA256"] = "UNSIGNED-PAYLOAD"
    elif payload == "header":
        headers["X-Amz-Content-SHA256"] = hashlib.sha256(body).hexdigest()
    req = AWSRequest(method=method, url=f"https://{env.host}{path}", data=body, headers=headers)
    if payload == "unsigned":
        req.context["payload_signing_enabled"] = False
    SigV4Auth(Credentials(ACCESS_KEY, secret), "vpc-lattice-svcs", "us-east-1").add_auth(req)
    url = urlsplit(req.url)
    target = url.path + (f"?{url.query}" if url.query else "")
    return dict(req.headers.items()), target


@pytest.mark.parametrize("payload", ["signed", "header", "unsigned"])
def test_botocore_signed_requests_are_accepted(env, payload):
    env.upstream.drain()
    headers, target = sign(env, "POST", "/api/orders/?ref=a%20b&x=1", BODY, payload=payload)
    status, body = env.send("POST", target, headers, BODY)
    assert status == 200, body
    (seen,) = env.upstream.drain()
    assert seen["body"] == BODY
    assert seen["headers"]["x-amzn-lattice-identity"] == IDENTITY


def test_botocore_get_without_body(env):
    headers, target = sign(env, "GET", "/api/catalog/items?page=2")
    status, body = env.send("GET", target, headers)
    assert status == 200, body


def flip(s: str) -> str:
    """Changes the last character by one byte."""
    last = s[-1]
    return s[:-1] + ("1" if last == "0" else "0" if last.isdigit() else chr(ord(last) ^ 1))


TAMPERS = {
    "method": lambda h, t, b: (h, t, b, "PUT"),
    "path": lambda h, t, b: (h, t.replace("/api/orders/7", "/api/orders/8"), b, None),
    "query": lambda h, t, b: (h, t.replace("x=1", "x=2"), b, None),
    "signed-header": lambda h, t, b: ({**h, "X-Tenant": flip(h["X-Tenant"])}, t, b, None),
    "date": lambda h, t, b: ({**h, "X-Amz-Date": flip(h["X-Amz-Date"][:-1]) + "Z"}, t, b, None),
    "body": lambda h, t, b: (h, t, b[:-2] + b"2}", None),
    "signature": lambda h, t, b: ({**h, "Authorization": flip(h["Authorization"])}, t, b, None),
    "access-key": lambda h, t, b: ({**h, "Authorization": h["Authorization"].replace(ACCESS_KEY, flip(ACCESS_KEY))}, t, b, None),
}


@pytest.mark.parametrize("payload", ["signed", "header"])
@pytest.mark.parametrize("part", sorted(TAMPERS))
def test_one_byte_change_of_any_signed_part_is_refused(env, part, payload):
    env.upstream.drain()
    headers, target = sign(env, "POST", "/api/orders/7?x=1", BODY, headers={"X-Tenant": "acme"}, payload=payload)
    # Control: the untouched request is accepted.
    status, body = env.send("POST", target, headers, BODY)
    assert status == 200, body
    h, t, b, method = TAMPERS[part](headers, target, BODY)
    status, body = env.send(method or "POST", t, h, b)
    assert status == 401, (part, body)
    assert body["error"] == "unauthenticated"
    assert len(env.upstream.drain()) == 1, "a tampered request reached the upstream"


def test_wrong_secret_is_refused(env):
    headers, target = sign(env, "GET", "/api/orders/1", secret="not-the-secret")
    status, body = env.send("GET", target, headers)
    assert status == 401
    assert body["reason"] == "signature mismatch"


def test_signed_but_not_permitted_is_403(env):
    headers, target = sign(env, "GET", "/api/profile/me")
    status, body = env.send("GET", target, headers)
    assert status == 403, body
