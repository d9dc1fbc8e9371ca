"""A recording upstream for the network test: answers 200 and appends what it
received (path, x-forwarded-for, identity) as a JSON line to a log file."""

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

host, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]


class Handler(BaseHTTPRequestHandler):
    def _handle(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        with open(log, "a") as f:
            f.write(json.dumps({
                "path": self.path,
                "xff": self.headers.get("x-forwarded-for"),
                "identity": self.headers.get("x-amzn-lattice-identity"),
            }) + "\n")
        body = f'{{"upstream":{port}}}'.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _handle

    def log_message(self, *args):
        pass


HTTPServer((host, port), Handler).serve_forever()
