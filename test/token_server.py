"""A small token server for the Docker/OCI bearer-token flow, for tests.

It issues real JWTs that Debian's docker-registry (distribution 2.8) accepts:
RS256, signed by a key whose self-signed certificate is the registry's
`rootcertbundle`, with the certificate in the `x5c` header (2.8 takes the
signing key from `x5c`, `jwk` or a libtrust `kid`; `x5c` needs no fingerprint
code). Anonymous requests get pull; the one user gets whatever it asks for.
"""

import base64
import datetime
import http.server
import json
import threading
import time
import urllib.parse
import uuid

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

ISSUER = "k8svent-test-issuer"
SERVICE = "k8svent-test-registry"
PUSH_USER = "pusher"
PUSH_PASSWORD = "push-password"


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _parse_scope(scope):
    """Split 'repository:NAME:a,b' into (type, name, [actions])."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return kind, name, [a for a in actions.split(",") if a]


class TokenServer:
    """Serves GET /token on 127.0.0.1, port 0, in a thread of the test process."""

    def __init__(self, expires_in=300):
        self.expires_in = expires_in
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k8svent test token signer")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.requests = []
        self.issued = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def realm(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def cert_pem(self):
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def start(self):
        self._thread.start()
        return self

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def make_token(self, subject, access):
        """Return a signed JWT granting access (a list of resource-actions dicts)."""
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def _user(self, authorization):
        """Return the basic-auth user if its password is right, '' if anonymous, else None."""
        if not authorization:
            return ""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        user, _, password = base64.b64decode(value).decode().partition(":")
        return user if (user, password) == (PUSH_USER, PUSH_PASSWORD) else None

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                user = server._user(self.headers.get("Authorization"))
                server.requests.append({"path": url.path, "query": query, "user": user})
                if url.path != "/token" or user is None:
                    self.send_error(401 if user is None else 404)
                    return
                access = []
                for scope in query.get("scope", []):
                    kind, name, actions = _parse_scope(scope)
                    granted = actions if user else [a for a in actions if a == "pull"]
                    access.append({"type": kind, "name": name, "actions": granted})
                token = server.make_token(user or "anonymous", access)
                server.issued.append(token)
                body = json.dumps({"token": token, "expires_in": server.expires_in}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler
