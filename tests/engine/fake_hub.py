"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1 (``HF_ENDPOINT`` points the client at it).

It answers the calls an upload of small files makes (create the repository, check the model card's
metadata, ask how each file is uploaded, commit) the way the hub documents them, keeps what was committed in memory and
records every request's path and Authorization header. Nothing leaves this machine. Calls it
does not know get a 404, and are recorded, so a test sees them.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        """(method, path, Authorization header) of every request."""
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        """repo id -> {path in the repo: bytes} as committed."""
        self.unknown: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                return gzip.decompress(raw) if self.headers.get("Content-Encoding") == "gzip" else raw

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                hub.unknown.append("GET " + self.path)
                self._send(404, {"error": "not in the fake hub"})

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
                body = self._body()
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo = (
                        f"{req.get('organization') or 'user'}/{req['name']}" if "/" not in req["name"] else req["name"]
                    )
                    hub.repos[repo] = req
                    return self._send(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo, "id": repo})
                if parts == ["api", "validate-yaml"]:  # the client checks a model card's metadata first
                    return self._send(200, {"errors": [], "warnings": []})
                if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                    repo = f"{parts[2]}/{parts[3]}"
                    store = hub.files.setdefault(repo, {})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            store[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] not in ("header",):
                            hub.unknown.append(f"commit item {item['key']}")
                    url = f"http://{self.headers['Host']}/{repo}/commit/{'0' * 40}"
                    return self._send(200, {"commitUrl": url, "commitOid": "0" * 40, "success": True})
                hub.unknown.append("POST " + self.path)
                self._send(404, {"error": "not in the fake hub"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.server.shutdown()
        self.server.server_close()
