"""Requests signed by botocore's SigV4Auth (service vpc-lattice-svcs) are
accepted; a one-byte change to any signed part is refused with 401."""

import calendar
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
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
    """Changes the last character by one byte (a hex digit stays a hex digit)."""
    last = s[-1]
    if last in "0123456789abcdef":
        return s[:-1] + ("1" if last == "0" else "0")
    return s[:-1] + chr(ord(last) ^ 1)


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


REASONS = {
    "unknown access key": (lambda h: {**h, "Authorization": h["Authorization"].replace(ACCESS_KEY, "AKIDNOTAKEY000000000")}, "unknown access key"),
    "region": (lambda h: {**h, "Authorization": h["Authorization"].replace("/us-east-1/", "/eu-west-1/")}, "credential scope does not match: region"),
    "service": (lambda h: {**h, "Authorization": h["Authorization"].replace("/vpc-lattice-svcs/", "/execute-api/")}, "credential scope does not match: service"),
    "scope date": (lambda h: {**h, "Authorization": h["Authorization"].replace("Credential=" + ACCESS_KEY + "/2", "Credential=" + ACCESS_KEY + "/1")}, "date does not match"),
    "host unsigned": (lambda h: {**h, "Authorization": h["Authorization"].replace("SignedHeaders=host;", "SignedHeaders=")}, "`host` must be signed"),
    "missing signed header": (lambda h: {**h, "Authorization": h["Authorization"].replace(";x-amz-date", ";x-amz-date;x-missing")}, "signed header `x-missing` is missing"),
    "expired": (lambda h: shifted(h, -600), "request expired"),
    "not yet valid": (lambda h: shifted(h, 600), "request not yet valid"),
    "no date": (lambda h: {k: v for k, v in h.items() if k != "X-Amz-Date"}, "missing x-amz-date"),
    "algorithm": (lambda h: {**h, "Authorization": h["Authorization"].replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1")}, "unsupported authorization scheme"),
    "signature not hex": (lambda h: {**h, "Authorization": h["Authorization"][:-1] + "z"}, "signature must be 64 hex digits"),
    "signature": (lambda h: {**h, "Authorization": flip(h["Authorization"])}, "signature mismatch"),
}


def shift(amz_date, seconds):
    t = time.strptime(amz_date, "%Y%m%dT%H%M%SZ")
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(calendar.timegm(t) + seconds))


def shifted(h, seconds):
    """`h` with its date moved by `seconds` and the credential scope's date moved with it:
    near midnight UTC the shift changes the day, and the scope would then be refused first."""
    old = h["X-Amz-Date"]
    new = shift(old, seconds)
    auth = h["Authorization"].replace("/" + old[:8] + "/", "/" + new[:8] + "/", 1)
    return {**h, "X-Amz-Date": new, "Authorization": auth}


@pytest.mark.parametrize("what", sorted(REASONS))
def test_each_tampering_gets_its_reason(env, what):
    headers, target = sign(env, "POST", "/api/orders/", BODY)
    mutate, reason = REASONS[what]
    status, body = env.send("POST", target, mutate(headers), BODY)
    assert status == 401, (what, body)
    assert reason in body["reason"], (what, body)


def test_streaming_payload_is_a_clear_400(env):
    headers, target = sign(env, "POST", "/api/orders/", BODY,
                           headers={"X-Amz-Content-SHA256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"})
    status, body = env.send("POST", target, headers, BODY)
    assert status == 400
    assert "streaming" in body["reason"]


def presign(env, method, path, expires=60, token=None):
    req = AWSRequest(method=method, url=f"https://{env.host}{path}")
    SigV4QueryAuth(Credentials(ACCESS_KEY, SECRET, token), "vpc-lattice-svcs", "us-east-1",
                   expires=expires).add_auth(req)
    url = urlsplit(req.url)
    return url.path + "?" + url.query


@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEXAMPLE//session+token=="])
def test_botocore_presigned_urls(env, token):
    env.upstream.drain()
    target = presign(env, "GET", "/api/downloads/9?view=full", token=token)
    if token:
        assert "X-Amz-Security-Token" in target
    status, body = env.send("GET", target)
    assert status == 200, body
    assert env.upstream.drain()[0]["headers"]["x-amzn-lattice-identity"] == IDENTITY
    for tampered, reason in (
        (target.replace("view=full", "view=fuli"), "signature mismatch"),
        (target.replace("X-Amz-Expires=60", "X-Amz-Expires=61"), "signature mismatch"),
        (target.replace("X-Amz-Expires=60", "X-Amz-Expires=604801"), "X-Amz-Expires"),
        (target + "&X-Amz-Date=20200101T000000Z", "repeated"),
    ):
        status, body = env.send("GET", tampered)
        assert status == 401, (tampered, body)
        assert reason in body["reason"], (tampered, body)
    assert env.upstream.drain() == []


def test_botocore_header_auth_with_session_token(env):
    req = AWSRequest(method="POST", url=f"https://{env.host}/api/orders/", data=BODY)
    SigV4Auth(Credentials(ACCESS_KEY, SECRET, "FwoGZXIvYXdzEXAMPLEsessiontoken"),
              "vpc-lattice-svcs", "us-east-1").add_auth(req)
    assert "X-Amz-Security-Token" in req.headers
    headers = dict(req.headers.items())
    status, body = env.send("POST", "/api/orders/", headers, BODY)
    assert status == 200, body
    # The token is signed: changing it breaks the signature.
    headers["X-Amz-Security-Token"] = flip(headers["X-Amz-Security-Token"])
    status, body = env.send("POST", "/api/orders/", headers, BODY)
    assert status == 401


# awscurl encodes the query string it is given once more (`%20` becomes
# `%2520` in its canonical request), which AWS itself refuses too; so its
# query holds no escapes here.
@pytest.mark.parametrize("method,path,data,expect", [
    ("GET", "/api/orders/5?x=1&a=b&a=c", None, '{"ok":true}'),
    ("POST", "/api/orders/", '{"item":"pen"}', '{"ok":true}'),
    ("GET", "/api/profile/me", None, '"error":"forbidden"'),
])
def test_awscurl(env, method, path, data, expect):
    args = [str(Path(sys.executable).parent / "awscurl"), "--service", "vpc-lattice-svcs",
            "--region", "us-east-1", "--access_key", ACCESS_KEY, "--secret_key", SECRET,
            "-X", method, "-i"]
    if data:
        args += ["-d", data]
    out = subprocess.run(args + [f"https://{env.host}{path}"], capture_output=True, text=True,
                         env={**os.environ, "REQUESTS_CA_BUNDLE": str(env.dir / "ca.pem")}, timeout=60)
    assert expect in out.stdout, (out.stdout, out.stderr)


def crt_auth():
    """botocore's SigV4A signer, when awscrt is installed (it is listed in
    requirements.txt; a platform without a wheel skips these tests)."""
    try:
        import botocore.auth  # noqa: F401  (imports botocore.crt.auth in the right order)
        from botocore.crt.auth import CrtSigV4AsymAuth
    except ImportError:
        pytest.skip("awscrt is not installed: botocore has no SigV4A signer")
    return CrtSigV4AsymAuth


@pytest.mark.parametrize("region_set", ["us-east-1", "*", "us-*"])
def test_botocore_sigv4a(env, region_set):
    auth = crt_auth()
    env.upstream.drain()
    req = AWSRequest(method="POST", url=f"https://{env.host}/api/orders/", data=BODY)
    auth(Credentials(ACCESS_KEY, SECRET), "vpc-lattice-svcs", region_set).add_auth(req)
    headers = dict(req.headers.items())
    assert headers["Authorization"].startswith("AWS4-ECDSA-P256-SHA256 ")
    status, body = env.send("POST", "/api/orders/", headers, BODY)
    assert status == 200, body
    assert env.upstream.drain()[0]["headers"]["x-amzn-lattice-identity"] == IDENTITY
    # Tampered body, or a region set that leaves out warden's region.
    status, body = env.send("POST", "/api/orders/", headers, BODY + b" ")
    assert status == 401 and body["reason"] == "signature mismatch", body
    req = AWSRequest(method="POST", url=f"https://{env.host}/api/orders/", data=BODY)
    auth(Credentials(ACCESS_KEY, SECRET), "vpc-lattice-svcs", "eu-west-1").add_auth(req)
    status, body = env.send("POST", "/api/orders/", dict(req.headers.items()), BODY)
    assert status == 401 and "region set" in body["reason"], body


@pytest.mark.parametrize("args,secret,expect", [
    (["-d", '{"item":"pen"}'], SECRET, "200"),
    (["-X", "GET", "-H", "X-Tenant: acme"], SECRET, "200"),
    (["-X", "DELETE"], SECRET, "200"),
    (["-X", "GET"], "not-the-secret", "401"),
])
def test_warden_sign_runs_a_signed_curl(env, args, secret, expect):
    binary = os.environ.get("WARDEN_BIN", str(Path(__file__).resolve().parents[2] / "target/debug/warden"))
    cmd = [binary, "sign", "--", "curl", "-sS", "--cacert", str(env.dir / "ca.pem"),
           "-o", "/dev/null", "-w", "%{http_code}", *args, f"https://{env.host}/api/orders/7?view=full"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret})
    assert out.stdout.strip() == expect, (out.stdout, out.stderr)
