#!/usr/bin/env python3
"""A minimal Docker registry token issuer, for tests only.

GET /token?service=S&scope=repository:NAME:ACTIONS[&scope=...] answers {"token", "access_token",
"expires_in", "issued_at"}. With HTTP basic credentials matching --user/--password every requested
action is granted; anonymous requests get a token with no access (so the registry refuses them).
POST /token (OAuth2, form-encoded, as docker sends an identity token): grant_type=refresh_token with
refresh_token matching --refresh-token is granted every requested action; any other is refused (401).
Tokens are RS256 JWTs carrying the signing certificate in the x5c header, which distribution
verifies against its rootcertbundle. Signing uses the openssl command line.
"""
import argparse, base64, json, os, subprocess, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", default="127.0.0.1:15003")
    ap.add_argument("--key", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--issuer", default="hb-test-issuer")
    ap.add_argument("--user", default="hb")
    ap.add_argument("--password", default="hb-secret")
    ap.add_argument("--ttl", type=int, default=300)
    ap.add_argument("--refresh-token", default="hb-refresh-token")
    args = ap.parse_args()
    der = subprocess.run(["openssl", "x509", "-in", args.cert, "-outform", "DER"], check=True, capture_output=True).stdout
    want = "Basic " + base64.b64encode(f"{args.user}:{args.password}".encode()).decode()

    def sign(claims):
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        body = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", args.key], input=body.encode(),
                             check=True, capture_output=True).stdout
        return body + "." + b64url(sig)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if urlparse(self.path).path != "/token":
                self.send_error(404)
                return
            form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode())
            ok = form.get("grant_type") == ["refresh_token"] and form.get("refresh_token") == [args.refresh_token]
            if not ok:
                self.send_response(401)
                self.end_headers()
                return
            self.grant(form, True)

        def do_GET(self):
            url = urlparse(self.path)
            if url.path != "/token":
                self.send_error(404)
                return
            q = parse_qs(url.query)
            authed = self.headers.get("Authorization") == want
            if self.headers.get("Authorization") and not authed:
                self.send_response(401)
                self.end_headers()
                return
            self.grant(q, authed)

        def grant(self, q, authed):
            access = []
            for scope in q.get("scope", []):
                parts = scope.split(":")
                if len(parts) >= 3 and authed:
                    access.append({"type": parts[0], "name": ":".join(parts[1:-1]), "actions": parts[-1].split(",")})
            now = int(time.time())
            claims = {"iss": args.issuer, "sub": args.user if authed else "", "aud": q.get("service", [""])[0],
                      "exp": now + args.ttl, "nbf": now - 10, "iat": now, "jti": b64url(os.urandom(12)),
                      "access": access}
            token = sign(claims)
            body = json.dumps({"token": token, "access_token": token, "expires_in": args.ttl,
                               "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *a):
            pass

    host, port = args.addr.rsplit(":", 1)
    ThreadingHTTPServer((host, int(port)), Handler).serve_forever()


if __name__ == "__main__":
    main()
