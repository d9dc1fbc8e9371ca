#!/usr/bin/env python3
"""Network test: warden as an east-west gateway across real (namespaced)
network hops. Three network namespaces made here and removed at the end —
client 10.77.1.2, gateway 10.77.1.1 / 10.77.2.1, service 10.77.2.2 with two
upstreams — joined by veth pairs. Checks that mTLS+JWT and SigV4 calls reach
the right upstream through the gateway, denied ones and unknown hosts do not,
and the upstream sees the client's real address in x-forwarded-for.

Needs root and `ip netns`; otherwise prints why and exits 0 without testing."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TAG = str(os.getpid() % 100000)
NS = {"client": f"wc{TAG}", "gateway": f"wg{TAG}", "service": f"ws{TAG}"}
CLIENT_IP, GW_CLIENT_IP, GW_SERVICE_IP, SERVICE_IP = "10.77.1.2", "10.77.1.1", "10.77.2.1", "10.77.2.2"
ACCESS_KEY, SECRET = "AKIDNETNSBETA0000001", "netns-secret-0123456789abcdef01234567"
ISSUER = "https://oidc.netns.test/id/X"


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def in_ns(ns, *args, **kw):
    return sh("ip", "netns", "exec", NS[ns], *args, **kw)


def skip(reason):
    print(f"network test skipped: {reason}")
    sys.exit(0)


def topology():
    for ns in NS.values():
        sh("ip", "netns", "add", ns)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    pairs = [("client", CLIENT_IP, "gateway", GW_CLIENT_IP, "a"), ("gateway", GW_SERVICE_IP, "service", SERVICE_IP, "b")]
    for left, lip, right, rip, n in pairs:
        l, r = f"v{TAG}{n}l", f"v{TAG}{n}r"
        sh("ip", "link", "add", l, "type", "veth", "peer", "name", r)
        sh("ip", "link", "set", l, "netns", NS[left])
        sh("ip", "link", "set", r, "netns", NS[right])
        in_ns(left, "ip", "addr", "add", f"{lip}/24", "dev", l)
        in_ns(right, "ip", "addr", "add", f"{rip}/24", "dev", r)
        in_ns(left, "ip", "link", "set", l, "up")
        in_ns(right, "ip", "link", "set", r, "up")


def teardown(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
    for ns in NS.values():
        sh("ip", "netns", "del", ns, check=False)


def pki(d):
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    sh("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=netns-ca",
       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    exts = {
        "server": f"subjectAltName=DNS:alpha.svc,DNS:beta.svc,DNS:gamma.svc,IP:{GW_CLIENT_IP}\nextendedKeyUsage=serverAuth\n",
        "client": "subjectAltName=URI:spiffe://example.org/ns/shop/sa/web\nextendedKeyUsage=clientAuth\n",
    }
    for name, ext in exts.items():
        (d / f"{name}.ext").write_text(ext + "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n")
        sh("openssl", "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        sh("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
           "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)


def token_tools(d):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    import base64
    import jwt

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    n = key.public_key().public_numbers()
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    (d / "jwks.json").write_text(json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256",
                                                       "n": b64(n.n.to_bytes(256, "big")), "e": b64(n.e.to_bytes(3, "big"))}]}))

    def mint(ns):
        now = int(time.time())
        return jwt.encode({"iss": ISSUER, "aud": "gateway", "sub": f"system:serviceaccount:{ns}:web", "exp": now + 300},
                          key, algorithm="RS256", headers={"kid": "k1"})
    return mint


def config(d):
    (d / "credentials.toml").write_text(
        f'[[credential]]\naccess_key_id = "{ACCESS_KEY}"\nsecret_access_key = "{SECRET}"\n'
        'principal = "arn:aws:iam::123456789012:role/billing"\n')
    (d / "policies").mkdir()
    shutil.copy(REPO / "policies/schema.cedarschema", d / "policies")
    (d / "policies/gateway.cedar").write_text('''
@id("alpha-shop")
permit (principal in K8s::Namespace::"shop", action, resource in Http::Service::"alpha")
when { context has tls && context.tls has peer_spiffe_id };
@id("beta-billing-role")
permit (principal == Aws::Role::"arn:aws:iam::123456789012:role/billing", action, resource in Http::Service::"beta");
''')
    (d / "warden.toml").write_text(f'''
[listener]
address = "{GW_CLIENT_IP}:15000"
[listener.tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"
client_auth = "optional"

[admin]
address = "127.0.0.1:15090"

[[route]]
host = "alpha.svc"
upstream = "{SERVICE_IP}:8081"
service = "alpha"

[[route]]
host = "beta.svc"
upstream = "{SERVICE_IP}:8082"
service = "beta"

[authn.sigv4]
credentials = "credentials.toml"

[[authn.jwt]]
issuer = "{ISSUER}"
audiences = ["gateway"]
jwks_file = "jwks.json"
principal = "k8s"

[authz]
policies = "policies"
''')


def wait_ready(ns, cmd, what):
    deadline = time.monotonic() + 30
    while in_ns(ns, *cmd, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def curl(d, host, path, *extra):
    out = in_ns("client", "curl", "-sS", "--max-time", "10", "--cacert", str(d / "ca.pem"),
                "--resolve", f"{host}:15000:{GW_CLIENT_IP}", "-o", "/dev/null", "-w", "%{http_code}",
                *extra, f"https://{host}:15000{path}", check=False)
    return out.stdout.strip()


def sigv4_call(d, host, path):
    script = f'''
import http.client, ssl
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
req = AWSRequest(method="POST", url="https://{host}:15000{path}", data=b"{{}}")
SigV4Auth(Credentials("{ACCESS_KEY}", "{SECRET}"), "vpc-lattice-svcs", "us-east-1").add_auth(req)
ctx = ssl.create_default_context(cafile="{d / 'ca.pem'}")
conn = http.client.HTTPSConnection("{GW_CLIENT_IP}", 15000, context=ctx, timeout=10)
conn.sock = ctx.wrap_socket(__import__("socket").create_connection(("{GW_CLIENT_IP}", 15000)), server_hostname="{host}")
conn.request("POST", "{path}", body=b"{{}}", headers={{**dict(req.headers.items()), "Host": "{host}:15000"}})
print(conn.getresponse().status)
'''
    return in_ns("client", PY, "-c", script, check=False).stdout.strip()


def log_of(path):
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def main():
    if os.geteuid() != 0:
        skip("not root")
    if shutil.which("ip") is None or sh("ip", "netns", "list", check=False).returncode != 0:
        skip("`ip netns` is not available")
    binary = os.environ.get("WARDEN_BIN", str(REPO / "target/debug/warden"))
    d = Path(tempfile.mkdtemp(prefix="warden-netns-"))
    procs = []
    checked = []
    try:
        topology()
        pki(d)
        mint = token_tools(d)
        config(d)
        logs = {8081: d / "alpha.log", 8082: d / "beta.log"}
        for port, log in logs.items():
            procs.append(subprocess.Popen(["ip", "netns", "exec", NS["service"], PY, str(Path(__file__).parent / "upstream.py"),
                                           SERVICE_IP, str(port), str(log)]))
        procs.append(subprocess.Popen(["ip", "netns", "exec", NS["gateway"], binary, "run", "--config", str(d / "warden.toml")],
                                      stdout=subprocess.DEVNULL, stderr=open(d / "warden.err", "w")))
        for port in logs:
            wait_ready("gateway", ["python3", "-c", f"import socket; socket.create_connection(('{SERVICE_IP}', {port}), 1)"],
                       f"upstream {port}")
        wait_ready("gateway", ["curl", "-sf", "http://127.0.0.1:15090/readyz"], "warden /readyz")
        cert = ["--cert", str(d / "client.pem"), "--key", str(d / "client.key")]

        def expect(what, got, want):
            assert got == want, f"{what}: got {got}, want {want}\n{(d / 'warden.err').read_text()[-2000:]}"
            checked.append(f"{what}: {got}")

        expect("mTLS + JWT (shop) -> alpha", curl(d, "alpha.svc", "/api/orders/1", *cert, "-H", f"Authorization: Bearer {mint('shop')}"), "200")
        alpha = log_of(logs[8081])
        expect("alpha upstream received the call", len(alpha), 1)
        expect("alpha saw the client's address in x-forwarded-for", alpha[0]["xff"], CLIENT_IP)
        expect("alpha saw the verified identity", alpha[0]["identity"], "Principal=shop/web; Type=K8S")
        expect("SigV4 (billing role) -> beta", sigv4_call(d, "beta.svc", "/api/charge"), "200")
        beta = log_of(logs[8082])
        expect("beta upstream received the call", [b["path"] for b in beta], ["/api/charge"])
        expect("beta saw the client's address in x-forwarded-for", beta[0]["xff"], CLIENT_IP)
        expect("JWT from another namespace -> alpha (denied)", curl(d, "alpha.svc", "/api/orders/1", *cert, "-H", f"Authorization: Bearer {mint('billing')}"), "403")
        expect("JWT without mTLS -> alpha (denied by policy)", curl(d, "alpha.svc", "/api/orders/1", "-H", f"Authorization: Bearer {mint('shop')}"), "403")
        expect("SigV4 (billing role) -> alpha (denied)", sigv4_call(d, "alpha.svc", "/api/x"), "403")
        expect("unknown host -> 404", curl(d, "gamma.svc", "/x", *cert), "404")
        expect("denied calls never reached an upstream", (len(log_of(logs[8081])), len(log_of(logs[8082]))), (1, 1))
        direct = in_ns("client", "curl", "-s", "--max-time", "2", f"http://{SERVICE_IP}:8081/", check=False)
        expect("the client cannot reach the service host directly", direct.returncode != 0, True)
    finally:
        teardown(procs)
        shutil.rmtree(d, ignore_errors=True)
    for line in checked:
        print(f"ok   {line}")
    print(f"{len(checked)} passed, 0 failed")


if __name__ == "__main__":
    main()
