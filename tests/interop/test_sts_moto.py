"""STS-backed IAM identities end to end, with moto's STS as the endpoint:
tokens minted by botocore's presigner for credentials from moto's AssumeRole
become the role principal; malformed ones are refused before STS is asked;
STS down is 503."""

import base64
import concurrent.futures
import os
import subprocess
import time
from urllib.parse import urlsplit

import botocore.session
import pytest
from botocore.signers import RequestSigner

from conftest import REPO

ROLE = "arn:aws:iam::123456789012:role/order-service-role"


def assume(env, session_name):
    session = botocore.session.get_session()
    sts = session.create_client("sts", region_name="us-east-1", endpoint_url=env.sts.url,
                                aws_access_key_id="AKIAIOSFODNN7EXAMPLE", aws_secret_access_key="x")
    return sts.assume_role(RoleArn=ROLE, RoleSessionName=session_name)["Credentials"]


@pytest.fixture(scope="module")
def creds(env):
    return assume(env, "checkout-7d4b9c")


def mint(env, creds, audience="orders", headers=None, url=None, extra_query=""):
    """A token as `aws eks get-token` builds it, by botocore's presigner."""
    session = botocore.session.get_session()
    client = session.create_client(
        "sts", region_name="us-east-1", endpoint_url=env.sts.url,
        aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"])
    signer = RequestSigner(client.meta.service_model.service_id, "us-east-1", "sts", "v4",
                           client._request_signer._credentials, client.meta.events)
    hdrs = {"x-k8s-aws-id": audience} if headers is None else headers
    params = {"method": "GET", "url": (url or env.sts.url) + "/?Action=GetCallerIdentity&Version=2011-06-15" + extra_query,
              "body": {}, "headers": hdrs, "context": {}}
    url = signer.generate_presigned_url(params, region_name="us-east-1", expires_in=60, operation_name="")
    return "k8s-aws-v1." + base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")


def call(env, token, path="/api/orders/1"):
    return env.send("GET", path, {"Authorization": f"Bearer {token}"})


def calls(env, result):
    return env.warden.metric(f'warden_sts_calls_total{{result="{result}"}} ')


def test_every_sts_result_is_exported_from_start_up(strict):
    # A second warden, asked nothing yet: each result's series is there at 0.
    metrics = strict.metrics()
    for result in ["ok", "rejected", "unavailable", "busy"]:
        assert f'warden_sts_calls_total{{result="{result}"}} 0' in metrics, metrics


def test_assumed_role_token_becomes_the_role(env, creds):
    env.upstream.drain()
    before = env.sts.requests
    ok = calls(env, "ok")
    token = mint(env, creds)
    status, body = call(env, token)
    assert status == 200, body
    (seen,) = env.upstream.drain()
    assert seen["headers"]["x-amzn-lattice-identity"] == (
        f"Principal={ROLE}; PrincipalOrgID=o-exampleorgid; SessionName=checkout-7d4b9c; Type=AWS_IAM")
    assert env.sts.requests == before + 1
    assert calls(env, "ok") == ok + 1
    assert env.sts.last_audience == "orders", "warden sends its own audience to STS"
    # The verdict is cached: the same token again costs no STS call.
    status, _ = call(env, token)
    assert status == 200
    assert env.sts.requests == before + 1


def test_a_token_for_another_path_is_still_authorized_by_policy(env, creds):
    status, body = call(env, mint(env, creds), "/api/profile/me")
    assert status == 403, body


def rewrite(token, fn):
    url = base64.urlsafe_b64decode(token[len("k8s-aws-v1."):] + "==").decode()
    return "k8s-aws-v1." + base64.urlsafe_b64encode(fn(url).encode()).decode().rstrip("=")


def shift_date(url, seconds):
    q = dict(p.split("=", 1) for p in urlsplit(url).query.split("&"))
    t = time.strptime(q["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    new = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.mktime(t) - time.timezone + seconds))
    # The credential scope's day moves with it, so that a shift across midnight UTC is still
    # refused as expired rather than for its scope.
    day = lambda d: "%2F" + d[:8] + "%2F"
    assert day(q["X-Amz-Date"]) in url, url
    return url.replace(q["X-Amz-Date"], new).replace(day(q["X-Amz-Date"]), day(new), 1)


REFUSED = {
    "extra query parameter": (lambda e, c: mint(e, c, extra_query="&Foo=bar"), "unexpected query parameter"),
    "another action": (lambda e, c: rewrite(mint(e, c), lambda u: u.replace("GetCallerIdentity", "GetSessionToken")), "GetCallerIdentity"),
    "repeated parameter": (lambda e, c: rewrite(mint(e, c), lambda u: u + "&Action=GetCallerIdentity"), "repeated"),
    "non-STS host": (lambda e, c: rewrite(mint(e, c), lambda u: u.replace(e.sts.url, "https://sts.amazonaws.com.evil.example")), "not an STS host"),
    "other path": (lambda e, c: rewrite(mint(e, c), lambda u: u.replace("/?", "/x?")), "path must be /"),
    "expired": (lambda e, c: rewrite(mint(e, c), lambda u: shift_date(u, -20 * 60)), "expired"),
    "unsigned audience header": (lambda e, c: mint(e, c, headers={}), "audience header is not signed"),
    "not base64": (lambda e, c: "k8s-aws-v1.!!!", "invalid base64"),
    "too large": (lambda e, c: "k8s-aws-v1." + "A" * 5000, "too large"),
}


@pytest.mark.parametrize("what", sorted(REFUSED))
def test_refused_without_asking_sts(env, creds, what):
    make, reason = REFUSED[what]
    token = make(env, creds)
    before = env.sts.requests
    status, body = call(env, token)
    assert status == 401, (what, body)
    assert reason in body["reason"], (what, body)
    assert env.sts.requests == before, "STS was asked"


def test_sts_down_is_503(env):
    # Fresh credentials: a token identical to an earlier one would be cached.
    creds = assume(env, "outage")
    unavailable = calls(env, "unavailable")
    env.sts.up = False
    try:
        status, body = call(env, mint(env, creds))
        assert status == 503, body
        assert body["error"] == "unavailable"
        assert calls(env, "unavailable") == unavailable + 1
    finally:
        env.sts.up = True
    # A failure is not cached as a success, nor as a failure: the same kind of
    # token works once STS is back.
    status, body = call(env, mint(env, creds))
    assert status == 200, body


def test_a_token_sts_refuses_is_401_and_not_cached(env):
    token = mint(env, assume(env, "refused"))
    rejected = calls(env, "rejected")
    env.sts.refusing = True
    try:
        status, body = call(env, token)
        assert status == 401, body
        assert body["reason"] == "sts rejected the token", body
        assert calls(env, "rejected") == rejected + 1
    finally:
        env.sts.refusing = False
    # The refusal was not remembered: the same token is asked about again.
    before = env.sts.requests
    status, body = call(env, token)
    assert status == 200, body
    assert env.sts.requests == before + 1


def test_past_max_concurrent_sts_calls_a_new_token_is_503_at_once(env):
    # `max_concurrent = 2`: two calls held at STS fill it; a third token is
    # refused without being sent, and gets its call once the two are done.
    tokens = [mint(env, assume(env, f"burst-{i}")) for i in range(3)]
    before = env.sts.requests
    busy = calls(env, "busy")
    env.sts.gate.clear()
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            held = [pool.submit(call, env, t) for t in tokens[:2]]
            env.sts.wait_for_requests(before + 2)
            status, body = call(env, tokens[2])
            assert status == 503, body
            assert (body["error"], body["reason"]) == ("unavailable", "too many sts calls in progress")
            assert env.sts.requests == before + 2, "the third token was sent to STS"
            assert calls(env, "busy") == busy + 1
            env.sts.gate.set()
            assert [f.result()[0] for f in held] == [200, 200]
    finally:
        env.sts.gate.set()
    status, body = call(env, tokens[2])
    assert status == 200, body
    assert env.sts.requests == before + 3


def test_warden_token_sts_cli(env, creds):
    binary = os.environ.get("WARDEN_BIN", str(REPO / "target/debug/warden"))
    out = subprocess.run(
        [binary, "token", "sts", "--audience", "orders", "--endpoint", env.sts.url],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
             "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"], "AWS_SESSION_TOKEN": creds["SessionToken"]})
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("k8s-aws-v1.")
    status, body = call(env, token)
    assert status == 200, body


@pytest.mark.parametrize("session,expect", [("batch-nightly", 200), ("checkout-7d4b9c", 403)])
def test_session_name_condition(env, session, expect):
    # `orders-batch-sessions-post-reports`: only `batch-*` sessions may post reports.
    token = mint(env, assume(env, session))
    status, body = env.send("POST", "/api/reports/", {"Authorization": f"Bearer {token}"}, b"{}")
    assert status == expect, body
