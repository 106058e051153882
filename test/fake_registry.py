"""A small fake OCI registry for tests: tags/list with paging, errors and tokens.

Debian's registry 2.8 ignores `n` on tags/list, so paging is tested here.
Attributes may be changed while it runs; every request is recorded.
"""

import http.server
import json
import threading
import urllib.parse

REPOSITORY = "atomist/k8svent"
TAGS_PATH = f"/v2/{REPOSITORY}/tags/list"
MANIFESTS_PATH = f"/v2/{REPOSITORY}/manifests/"


class FakeRegistry:
    """Serves GET /v2/atomist/k8svent/tags/list (and /token) on 127.0.0.1, port 0.

    mode: "ok"; "status" (answer `status` with `headers`); "garbage" (200, not
    JSON); "no-tags" (200, empty list); "null-tags" (200, tags null).
    auth: answer 401 with a Bearer challenge until a token from /token is sent.
    HEAD /v2/atomist/k8svent/manifests/TAG answers Docker-Content-Digest from
    `digests` (404 for a tag not in it). Hostile answers: "huge" (200, a body of
    `huge_bytes`), "redirect" (307 to `location`); `body` is what "status"
    answers, `realm` the token realm, `link_origin` the origin of next links.
    """

    def __init__(
        self,
        tags=(),
        page_size=None,
        mode="ok",
        status=500,
        headers=None,
        auth=False,
        token_field="token",
        expires_in=None,
        absolute_links=False,
    ):
        self.digests = {}
        self.body = b'{"errors":[{"code":"BROKEN"}]}'
        self.realm = None
        self.link_origin = None
        self.location = None
        self.huge_bytes = 2 << 20
        self.tags = list(tags)
        self.page_size = page_size
        self.mode = mode
        self.status = status
        self.headers = dict(headers or {})
        self.auth = auth
        self.token_field = token_field
        self.expires_in = expires_in
        self.absolute_links = absolute_links
        self.requests = []
        self.tokens = []
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def address(self):
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def image(self):
        return f"{self.address}/{REPOSITORY}"

    def manifest_requests(self):
        return [r for r in self.requests if r["path"].startswith(MANIFESTS_PATH)]

    def tag_requests(self):
        return [r for r in self.requests if r["path"] == TAGS_PATH]

    def token_requests(self):
        return [r for r in self.requests if r["path"] == "/token"]

    def start(self):
        self._thread.start()
        return self

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _new_token(self):
        with self._lock:
            token = f"fake-secret-token-{len(self.tokens) + 1}"
            self.tokens.append(token)
        return token

    def _handler(self):
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def send(self, status, body=b"", headers=None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def send_json(self, value, headers=None):
                headers = {"Content-Type": "application/json", **(headers or {})}
                self.send(200, json.dumps(value).encode(), headers)

            def unauthorized(self):
                """Answer 401 (True) unless the request carries a token we issued."""
                if (
                    not registry.auth
                    or self.headers.get("Authorization", "").removeprefix("Bearer ")
                    in registry.tokens
                ):
                    return False
                realm = registry.realm or f"http://{registry.address}/token"
                challenge = (
                    f'Bearer realm="{realm}",service="fake-registry",'
                    f'scope="repository:{REPOSITORY}:pull"'
                )
                self.send(
                    401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge}
                )
                return True

            def do_HEAD(self):
                url = urllib.parse.urlsplit(self.path)
                registry.requests.append(
                    {"path": url.path, "method": "HEAD", "query": {}, "headers": dict(self.headers)}
                )
                tag = url.path.removeprefix(MANIFESTS_PATH)
                if not url.path.startswith(MANIFESTS_PATH):
                    self.send(404)
                elif self.unauthorized():
                    pass
                elif registry.mode == "status":
                    self.send(registry.status, b"", registry.headers)
                elif tag in registry.digests:
                    self.send_response(200)
                    self.send_header("Docker-Content-Digest", registry.digests[tag])
                    self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
                    self.send_header("Content-Length", "1234")
                    self.end_headers()
                else:
                    self.send(404)

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                registry.requests.append(
                    {"path": url.path, "query": query, "headers": dict(self.headers)}
                )
                if url.path == "/token":
                    body = {registry.token_field: registry._new_token()}
                    if registry.expires_in is not None:
                        body["expires_in"] = registry.expires_in
                    self.send_json(body)
                elif url.path != TAGS_PATH:
                    self.send(404)
                elif self.unauthorized():
                    pass
                elif registry.mode == "status":
                    self.send(registry.status, registry.body, registry.headers)
                elif registry.mode == "huge":
                    self.send(
                        200,
                        b'{"tags": [' + b" " * registry.huge_bytes + b"]}",
                        {"Content-Type": "application/json"},
                    )
                elif registry.mode == "redirect":
                    self.send(307, b"", {"Location": registry.location})
                elif registry.mode == "garbage":
                    self.send(200, b"<html>not json</html>", {"Content-Type": "text/html"})
                elif registry.mode == "no-tags":
                    self.send_json({"name": REPOSITORY, "tags": []})
                elif registry.mode == "null-tags":
                    self.send_json({"name": REPOSITORY, "tags": None})
                else:
                    self.send_page(query)

            def send_page(self, query):
                tags = sorted(registry.tags)
                last = query.get("last", [None])[0]
                if last is not None:
                    tags = [t for t in tags if t > last]
                size = int(query.get("n", [registry.page_size or 0])[0]) or len(tags)
                page, rest = tags[:size], tags[size:]
                headers = {}
                if rest:
                    link = f"{TAGS_PATH}?n={size}&last={urllib.parse.quote(page[-1])}"
                    if registry.link_origin:
                        link = registry.link_origin + link
                    elif registry.absolute_links:
                        link = f"http://{registry.address}{link}"
                    headers["Link"] = f'<{link}>; rel="next"'
                self.send_json({"name": REPOSITORY, "tags": page}, headers)

            def log_message(self, *args):
                pass

        return Handler
