"""A minimal Hugging Face Hub on loopback, enough for ``huggingface_hub`` to read a model's
file list and download a file: ``GET /api/models/{repo}`` and ``HEAD``/``GET
/{repo}/resolve/{revision}/{file}``. ``mode`` decides what the download sends: ``good``,
``corrupt`` (other bytes than the listed SHA-256) or ``interrupted`` (the connection drops
halfway through)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo: str, filename: str, data: bytes, mode: str = "good") -> None:
        self.repo, self.filename, self.data, self.mode = repo, filename, data, mode
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _json(self, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file_headers(self, length: int, status: int = 200) -> None:
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hub.sha256}"')
                self.send_header("X-Linked-Etag", f'"{hub.sha256}"')
                self.send_header("X-Linked-Size", str(len(hub.data)))
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def _route(self, head: bool) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                path = self.path.split("?")[0]
                if path.startswith(f"/api/models/{hub.repo}"):
                    return self._json({
                        "id": hub.repo, "modelId": hub.repo, "sha": COMMIT, "private": False,
                        "siblings": [
                            {"rfilename": "README.md", "size": 10},
                            {"rfilename": hub.filename, "size": len(hub.data), "blobId": "b" * 40,
                             "lfs": {"sha256": hub.sha256, "size": len(hub.data), "pointerSize": 134}},
                        ],
                    })
                if path.startswith(f"/{hub.repo}/resolve/") and path.endswith(hub.filename):
                    data = hub.data
                    if hub.mode == "corrupt":
                        data = data[:-64] + bytes(64)
                    start = 0
                    rng = self.headers.get("Range")
                    if rng and rng.startswith("bytes="):
                        start = int(rng[6:].split("-")[0] or 0)
                    body = data[start:]
                    self._file_headers(len(body), 206 if start else 200)
                    if head:
                        return None
                    if hub.mode == "interrupted":
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return None
                    self.wfile.write(body)
                    return None
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
