"""Interop fixtures: certificates made by openssl, keys by cryptography, an
upstream in Python, and the real warden binary (WARDEN_BIN) in front of it."""

import base64
import http.client
import json
import os
import queue
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

REPO = Path(__file__).resolve().parents[2]
ACCESS_KEY = "AKIDINTEROPORDERS001"
SECRET = "interop-secret-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
ISSUER = "https://oidc.interop.example/id/CLUSTER"
EKS_ISSUER = "https://oidc.eks.us-east-1.amazonaws.com/id/INTEROP"
SPIRE_ISSUER = "https://spire.interop.example"
SPIFFE_ID = "spiffe://example.org/ns/shop/sa/web"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path):
    """A CA, a server cert for localhost and a SPIFFE client cert, all by openssl."""
    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec_key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=interop-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n")
    (d / "client.ext").write_text(
        f"subjectAltName=URI:{SPIFFE_ID}\nextendedKeyUsage=clientAuth\n"
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n")
    for name in ("server", "client"):
        openssl("req", *ec_key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                "-extfile", f"{name}.ext", cwd=d)


def openssl_client_cert(d: Path, name: str, ext: str):
    """A client certificate signed by the openssl CA with extensions `ext`
    (openssl x509 -extfile syntax)."""
    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    (d / f"{name}.ext").write_text(ext)
    openssl("req", *ec_key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", f"{name}.ext", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def make_keys(d: Path):
    """An RSA and an EC signing key (cryptography) and their JWKS."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rn = rsa_key.public_key().public_numbers()
    en = ec_key.public_key().public_numbers()
    jwks = {"keys": [
        {"kty": "RSA", "kid": "rsa1", "alg": "RS256", "use": "sig",
         "n": b64url(rn.n.to_bytes((rn.n.bit_length() + 7) // 8, "big")),
         "e": b64url(rn.e.to_bytes(3, "big"))},
        {"kty": "EC", "kid": "ec1", "alg": "ES256", "use": "sig", "crv": "P-256",
         "x": b64url(en.x.to_bytes(32, "big")), "y": b64url(en.y.to_bytes(32, "big"))},
    ]}
    (d / "jwks.json").write_text(json.dumps(jwks))
    pem = lambda k: k.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return {"RS256": (pem(rsa_key), "rsa1"), "ES256": (pem(ec_key), "ec1")}


def make_workload_keys():
    """Keys for workload tokens: some made by jwcrypto, some by cryptography
    (for PyJWT), each published with its alg."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from jwcrypto import jwk

    out = {}
    for alg, kw in (("RS256", {"kty": "RSA", "size": 2048}), ("PS256", {"kty": "RSA", "size": 2048}),
                    ("ES256", {"kty": "EC", "crv": "P-256"}), ("EdDSA", {"kty": "OKP", "crv": "Ed25519"})):
        key = jwk.JWK.generate(kid=f"jwcrypto-{alg}", alg=alg, use="sig", **kw)
        out[("jwcrypto", alg)] = {"key": key, "public": key.export_public(as_dict=True)}
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    for alg, priv in (("RS256", rsa_key), ("PS256", rsa_key), ("ES256", ec_key), ("EdDSA", ed_key)):
        public = jwk.JWK.from_pyca(priv.public_key()).export_public(as_dict=True)
        public.update({"kid": f"pyjwt-{alg}", "alg": alg, "use": "sig"})
        out[("pyjwt", alg)] = {"key": priv, "public": public}
    return out


class Upstream:
    """Records what reaches it and answers 200."""

    def __init__(self):
        self.seen = queue.Queue()
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                seen.put({"method": self.command, "path": self.path,
                          "headers": {k.lower(): v for k, v in self.headers.items()},
                          "body": body})
                out = b'{"ok":true}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def drain(self):
        out = []
        while not self.seen.empty():
            out.append(self.seen.get_nowait())
        return out


class KeyServer:
    """Serves JWKS documents over HTTPS (the openssl server certificate)."""

    def __init__(self, d: Path, documents: dict):
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                doc = documents.get(self.path)
                if doc is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                outer.fetches += 1
                out = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("cache-control", "max-age=300")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(d / "server.pem"), str(d / "server.key"))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


# What STS answers a presigned GetCallerIdentity whose signature does not match.
REFUSAL = b"""<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error>
    <Type>Sender</Type>
    <Code>SignatureDoesNotMatch</Code>
    <Message>The request signature we calculated does not match the signature you provided.</Message>
  </Error>
  <RequestId>0b8f3e9a-6d1c-4c57-9d5e-2f0e7a1b3c4d</RequestId>
</ErrorResponse>
"""


class MotoSts:
    """moto's STS backend on a loopback port. moto reads the caller's access
    key only from an Authorization header, so presigned GETs get one made
    from their X-Amz-Credential. Counts requests; can be switched off (503),
    made to refuse every token as STS refuses a bad signature (403), or held
    (`gate` cleared) so that calls stay under way until it is set."""

    def __init__(self):
        import urllib.parse
        from moto.moto_server.werkzeug_app import create_backend_app
        from werkzeug.serving import make_server

        app = create_backend_app("sts")
        self.requests = 0
        self.up = True
        self.refusing = False
        self.gate = threading.Event()
        self.gate.set()
        self.counted = threading.Condition()
        outer = self

        def wrapped(environ, start_response):
            qs = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            cred = qs.get("X-Amz-Credential", [None])[0]
            if environ["REQUEST_METHOD"] == "GET":
                with outer.counted:
                    outer.requests += 1
                    outer.counted.notify_all()
                outer.last_audience = environ.get("HTTP_X_K8S_AWS_ID")
                outer.gate.wait(timeout=30)
                if not outer.up:
                    start_response("503 Service Unavailable", [("content-length", "0")])
                    return [b""]
                if outer.refusing:
                    start_response("403 Forbidden", [("content-type", "text/xml")])
                    return [REFUSAL]
            if cred and "HTTP_AUTHORIZATION" not in environ:
                environ["HTTP_AUTHORIZATION"] = (
                    f"AWS4-HMAC-SHA256 Credential={cred}, SignedHeaders=host, Signature=0")
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, wrapped, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for_requests(self, n):
        with self.counted:
            assert self.counted.wait_for(lambda: self.requests >= n, timeout=30), (
                f"STS got {self.requests} requests, not {n}")


class Warden:
    def __init__(self, d: Path, upstream_port: int, keys_port: int, sts_port: int,
                 client_auth: str = "optional", name: str = "", tls_extra: str = "",
                 protocol: str = "http1", policies: Path = REPO / "policies",
                 extra: str = "", cert: str = "server.pem",
                 key: str = "server.key"):
        cfg = d / f"warden-{client_auth}{name}.toml"
        cfg.write_text(f"""
[listener]
address = "127.0.0.1:0"
[listener.tls]
cert = "{cert}"
key = "{key}"
client_ca = "ca.pem"
client_auth = "{client_auth}"
{tls_extra}

[upstream]
address = "127.0.0.1:{upstream_port}"
protocol = "{protocol}"

[admin]
address = "127.0.0.1:0"

[service]
name = "orders"

[authn.sigv4]
region = "us-east-1"
service = "vpc-lattice-svcs"
credentials = "credentials.toml"

[authn.aws]
accounts = {{ "123456789012" = "o-exampleorgid" }}

[authn.sts]
endpoint = "http://127.0.0.1:{sts_port}"
cache_ttl = "5m"
max_concurrent = 2

[[authn.jwt]]
issuer = "{ISSUER}"
audiences = ["orders"]
jwks_file = "jwks.json"
algorithms = ["RS256", "ES256"]
principal = "k8s"
cluster = "interop"

[[authn.jwt]]
issuer = "{EKS_ISSUER}"
audiences = ["orders", "sts.amazonaws.com"]
jwks_uri = "https://localhost:{keys_port}/eks/keys"
ca_file = "ca.pem"
algorithms = ["RS256", "PS256", "ES256", "EdDSA"]
principal = "k8s"
cluster = "interop-eks"

[[authn.jwt]]
issuer = "{SPIRE_ISSUER}"
audiences = ["orders"]
jwks_uri = "https://localhost:{keys_port}/spire/keys"
ca_file = "ca.pem"
algorithms = ["RS256", "PS256", "ES256", "EdDSA"]
principal = "spiffe"
trust_domains = ["example.org"]

[authz]
policies = "{policies}"

{extra}
""")
        (d / "credentials.toml").write_text(f"""
[[credential]]
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET}"
principal = "arn:aws:iam::123456789012:role/order-service-role"
""")
        binary = os.environ.get("WARDEN_BIN", str(REPO / "target/debug/warden"))
        self.proc = subprocess.Popen([binary, "run", "--config", str(cfg)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.decisions = queue.Queue()
        self.stderr = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.decisions), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True).start()
        while True:
            line = self.stderr.get(timeout=60)
            if line is None:
                raise RuntimeError("warden exited before listening")
            event = json.loads(line)
            if event.get("fields", {}).get("message") == "warden listening":
                self.port = int(event["fields"]["proxy"].rsplit(":", 1)[1])
                self.admin_port = int(event["fields"]["admin"].rsplit(":", 1)[1])
                break
        # Remote key sets load in the background: wait for /readyz.
        deadline = time.monotonic() + 30
        while self.readyz()[0] != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"warden never became ready: {self.readyz()}")
            time.sleep(0.05)

    def readyz(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        conn.request("GET", "/readyz")
        rsp = conn.getresponse()
        return rsp.status, rsp.read().decode()

    @staticmethod
    def _pump(stream, q):
        for line in stream:
            q.put(line)
        q.put(None)

    def metrics(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()

    def metric(self, prefix):
        """The value of the first series starting with `prefix`; 0 if none."""
        for line in self.metrics().splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self):
        self.proc.terminate()
        return self.proc.wait(timeout=30)


class Env:
    def __init__(self, d: Path):
        self.dir = d
        make_pki(d)
        self.signing_keys = make_keys(d)
        self.upstream = Upstream()
        self.workload_keys = make_workload_keys()
        jwks = {"keys": [k["public"] for k in self.workload_keys.values()]}
        self.key_server = KeyServer(d, {"/eks/keys": jwks, "/spire/keys": jwks})
        self.sts = MotoSts()
        # One worker: the suite runs on the current-thread runtime; the other
        # wardens it starts use the default, one worker per core.
        self.warden = Warden(d, self.upstream.port, self.key_server.port, self.sts.port,
                             extra="[runtime]\nworkers = 1\n")
        self.host = f"localhost:{self.warden.port}"

    def tls(self):
        ctx = ssl.create_default_context(cafile=str(self.dir / "ca.pem"))
        ctx.load_cert_chain(str(self.dir / "client.pem"), str(self.dir / "client.key"))
        return ctx

    def send(self, method, path, headers=None, body=b""):
        """One request over a new mTLS connection; returns (status, json body)."""
        conn = http.client.HTTPSConnection("localhost", self.warden.port, context=self.tls(), timeout=10)
        conn.request(method, path, body=body, headers=headers or {})
        rsp = conn.getresponse()
        data = rsp.read()
        conn.close()
        try:
            return rsp.status, json.loads(data)
        except ValueError:
            return rsp.status, data


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """warden with optional mTLS: SigV4 and token callers need no client cert."""
    e = Env(tmp_path_factory.mktemp("interop"))
    yield e
    assert e.warden.stop() == 0, "warden did not exit 0 on SIGTERM"


@pytest.fixture(scope="session")
def strict(env):
    """A second warden over the same files, with client certificates required."""
    w = Warden(env.dir, env.upstream.port, env.key_server.port, env.sts.port, client_auth="required")
    yield w
    assert w.stop() == 0
