"""A Hugging Face hub's file endpoints on loopback, for pull tests with the real huggingface_hub.

Serves what `HfApi.model_info(files_metadata=True)` and `hf_hub_download` ask of the hub:
  GET  /api/models/OWNER/REPO[/revision/REV]   the repo's file list (size, LFS sha256)
  HEAD /OWNER/REPO/resolve/REV/FILE            X-Repo-Commit, ETag and X-Linked-Etag (the
                                               sha256), X-Linked-Size
  GET  same                                    the bytes, honouring Range (a resumed download)
and misbehaves on purpose, per file: `drop_after` closes the connection after that many
bytes of the first full GET (huggingface_hub must resume with Range), `corrupt` serves
bytes whose sha256 is not the advertised one, `listed_size` advertises a size other than
the real one (a file too large for the disk), `chunk_delay_s` makes a slow link (time
to cancel). Every request is recorded.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 1 << 20


@dataclass
class HubFile:
    data: bytes
    drop_after: int | None = None     # close the connection after this many bytes, once
    corrupt: bool = False             # flip one byte of what is served
    listed_size: int | None = None    # size the listing advertises instead of the real one
    chunk_delay_s: float = 0.0        # a slow link: this long between 1 MiB chunks
    sha256: str = ""

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    def served(self) -> bytes:
        if not self.corrupt:
            return self.data
        middle = len(self.data) // 2
        return self.data[:middle] + bytes([self.data[middle] ^ 0xFF]) + self.data[middle + 1:]


@dataclass
class Hub:
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range
    url: str = ""

    def gets(self, filename: str) -> list[str | None]:
        """The Range header of every GET of filename (None: a whole-file GET)."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith("/" + filename)]


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/?]+))?$")


class _Handler(BaseHTTPRequestHandler):
    hub: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet: the test output is the record
        pass

    def _record(self) -> str:
        path = self.path.split("?", 1)[0]
        self.hub.requests.append((self.command, path, self.headers.get("Range")))
        return path

    def _not_found(self, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, path: str) -> tuple[str, HubFile] | None:
        match = _RESOLVE.match(path)
        if not match or match["repo"] not in self.hub.repos:
            return None
        found = self.hub.repos[match["repo"]].get(match["file"])
        return (match["file"], found) if found else None

    def _file_headers(self, f: HubFile) -> None:
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{f.sha256}"')
        self.send_header("X-Linked-Etag", f'"{f.sha256}"')
        self.send_header("X-Linked-Size", str(f.listed_size or len(f.data)))
        self.send_header("Accept-Ranges", "bytes")

    def do_HEAD(self) -> None:
        found = self._file(self._record())
        if found is None:
            return self._not_found("EntryNotFound")
        self.send_response(200)
        self._file_headers(found[1])
        self.send_header("Content-Length", str(len(found[1].data)))
        self.end_headers()

    def do_GET(self) -> None:
        path = self._record()
        info = _INFO.match(path)
        if info:
            return self._info(info["repo"])
        found = self._file(path)
        if found is None:
            return self._not_found("EntryNotFound")
        self._send_bytes(found[1])

    def _info(self, repo: str) -> None:
        if repo not in self.hub.repos:
            return self._not_found("RepoNotFound")
        siblings = [{"rfilename": name, "size": f.listed_size or len(f.data), "blobId": f.sha256[:40],
                     "lfs": {"size": f.listed_size or len(f.data), "sha256": f.sha256, "pointerSize": 134}}
                    for name, f in self.hub.repos[repo].items()]
        body = json.dumps({"id": repo, "sha": COMMIT, "siblings": siblings}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_bytes(self, f: HubFile) -> None:
        data = f.served()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self._file_headers(f)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        stop = len(data)
        if f.drop_after is not None and not rng:
            stop, f.drop_after = f.drop_after, None  # once: the resumed GET gets the rest
        for offset in range(start, stop, CHUNK):
            try:
                self.wfile.write(data[offset:min(offset + CHUNK, stop)])
            except OSError:  # the client went away (a cancelled pull)
                return
            time.sleep(f.chunk_delay_s)
        if stop < len(data):
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the peer sees the body end early: a dropped connection


def start_hub(hub: Hub) -> tuple[ThreadingHTTPServer, Hub]:
    handler = type("HubHandler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True).start()
    return server, hub


BUNDLED_REPO, BUNDLED_FILE = "smol/SmolLM2-GGUF", "SmolLM2-135M-Instruct-Q4_1.gguf"


SLOW_REPO = "smol/Slow-GGUF"


def hub_for_daemons(monkeypatch, cache_dir) -> tuple[ThreadingHTTPServer, Hub]:
    """A hub serving the bundled SmolLM2 as BUNDLED_REPO (and over a slow link as SLOW_REPO), and
    the environment that points huggingface_hub at it (plain HTTP, cache_dir as the HF cache)
    for daemons started after."""
    from engines.registry.bundled import bundled_path

    data = bundled_path().read_bytes()
    server, hub = start_hub(Hub(repos={BUNDLED_REPO: {BUNDLED_FILE: HubFile(data)},
                                       SLOW_REPO: {BUNDLED_FILE: HubFile(data, chunk_delay_s=0.05)}}))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    return server, hub
