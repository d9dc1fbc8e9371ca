"""curl with a client certificate made by openssl passes mTLS and is
authorized as its SPIFFE ID; with `client_auth = "required"`, curl without one
is refused at the handshake."""

import json
import subprocess


def curl(env, path, *extra, port=None):
    host = f"localhost:{port}" if port else env.host
    args = ["curl", "-sS", "--max-time", "10", "--cacert", str(env.dir / "ca.pem"),
            "-o", "-", "-w", "\n%{http_code}", *extra, f"https://{host}{path}"]
    return subprocess.run(args, capture_output=True, text=True)


def with_cert(env):
    return ["--cert", str(env.dir / "client.pem"), "--key", str(env.dir / "client.key")]


def test_curl_with_client_cert_is_authorized_as_its_spiffe_id(env):
    env.upstream.drain()
    out = curl(env, "/api/orders/42", *with_cert(env))
    assert out.returncode == 0, out.stderr
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "200", out.stdout
    (seen,) = env.upstream.drain()
    assert seen["headers"]["x-amzn-lattice-identity"] == \
        "Principal=spiffe://example.org/ns/shop/sa/web; Type=SPIFFE"
    assert seen["headers"]["x-forwarded-proto"] == "https"


def test_curl_with_client_cert_over_http2(env):
    out = curl(env, "/api/orders/42", "--http2", *with_cert(env))
    assert out.returncode == 0, out.stderr
    assert out.stdout.rsplit("\n", 1)[1] == "200"


def test_curl_with_client_cert_denied_by_policy(env):
    out = curl(env, "/api/orders/", "-X", "DELETE", *with_cert(env))
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "403"
    assert json.loads(body)["error"] == "forbidden"


def test_curl_without_client_cert_is_refused_at_the_handshake(env, strict):
    env.upstream.drain()
    out = curl(env, "/public/status", port=strict.port)
    assert out.returncode != 0, out.stdout
    assert out.stdout.rsplit("\n", 1)[-1] == "000"
    assert env.upstream.drain() == []
    assert "warden_tls_handshake_errors_total 1" in strict.metrics()
    # With the certificate the same listener answers.
    out = curl(env, "/api/orders/42", *with_cert(env), port=strict.port)
    assert out.stdout.rsplit("\n", 1)[-1] == "200", out.stderr


def test_optional_mtls_without_cert_is_anonymous(env):
    out = curl(env, "/public/status")
    assert out.stdout.rsplit("\n", 1)[-1] == "200", out.stderr
    out = curl(env, "/api/orders/42")
    assert out.stdout.rsplit("\n", 1)[-1] == "403"
