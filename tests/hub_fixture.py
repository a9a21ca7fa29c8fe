"""A Hugging Face Hub endpoint on 127.0.0.1 for tests: serves local directories as hub repositories.

`huggingface_hub` (snapshot_download, hf_hub_download, HfApi.repo_info/model_info/dataset_info,
list_repo_tree, get_paths_info, HfFileSystem) and `datasets.load_dataset(repo_id)` accept it
through `HF_ENDPOINT` (or an explicit `endpoint=`). Only the routes those clients use are
implemented, with the headers they check (read from huggingface_hub 2.x: `X-Repo-Commit` and an
`ETag` on every /resolve answer, `X-Linked-Etag`/`X-Linked-Size` for LFS files, `X-Error-Code`
on errors so the client raises RepositoryNotFoundError / RevisionNotFoundError /
EntryNotFoundError / GatedRepoError). Anything else answers 404 and is recorded in
`HubServer.unhandled`, so a client that needs a new route shows up in a test.

Every repository keeps all the revisions it was given (`publish` again to move `main`), each
with a stable fake commit sha: the sha1 of its file listing. `stop()` closes the port, so
"the hub is down" is a refused connection, exactly as on a cluster node without internet.

Fixtures (import them into tests/conftest.py, see `hub_repos` / `hub_server` below):
    from hub_fixture import hub_repos, hub_server  # noqa: E402,F401
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

# What the hub's default .gitattributes sends to LFS; those files get `lfs` metadata and X-Linked-* headers.
LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".onnx", ".h5", ".msgpack", ".pt", ".ckpt", ".arrow")
FAKE_DATE = "2024-01-01T00:00:00.000Z"


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _File:
    data: bytes
    oid: str  # git blob id (of the LFS pointer for LFS files), as the hub's tree listing reports it
    sha256: str | None  # LFS files only

    @classmethod
    def of(cls, path: str, data: bytes) -> "_File":
        if path.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
            return cls(data, _git_blob_oid(pointer.encode()), sha256)
        return cls(data, _git_blob_oid(data), None)

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "oid": self.oid, "size": len(self.data), "path": path}
        if self.sha256:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return entry


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    revisions: dict[str, dict[str, _File]] = field(default_factory=dict)
    main: str = ""
    gated: bool = False

    def files(self, revision: str) -> dict[str, _File] | None:
        sha = self.main if revision == "main" else revision
        return self.revisions.get(sha)

    def sha(self, revision: str) -> str:
        return self.main if revision == "main" else revision


def _read_tree(directory: Path) -> dict[str, _File]:
    files = {}
    for path in sorted(Path(directory).rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and not rel.startswith(".git/") and "/.cache/" not in f"/{rel}":
            files[rel] = _File.of(rel, path.read_bytes())
    if not files:
        raise ValueError(f"{directory}: no files to serve")
    return files


def _listing_sha(files: dict[str, _File]) -> str:
    """A stable fake commit sha: the same files give the same sha, any change gives a new one."""
    listing = "".join(f"{path}\0{f.oid}\n" for path, f in sorted(files.items()))
    return hashlib.sha1(listing.encode()).hexdigest()


class HubServer:
    """`with HubServer() as hub: hub.publish("model", "org/name", directory); ... hub.endpoint`."""

    def __init__(self):
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.unhandled: list[tuple[str, str]] = []  # requests no route matched: a client needs a new route
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # repositories
    def publish(self, repo_type: str, repo_id: str, directory: str | Path) -> str:
        """Serve `directory` as the new `main` of `repo_id` (earlier revisions stay servable); returns its sha."""
        if repo_type not in ("model", "dataset"):
            raise ValueError(f"repo_type {repo_type!r}: use 'model' or 'dataset'")
        files = _read_tree(Path(directory))
        sha = _listing_sha(files)
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), _Repo(repo_type, repo_id))
            repo.revisions[sha] = files
            repo.main = sha
        return sha

    def gate(self, repo_type: str, repo_id: str) -> None:
        """Answer this repository like a gated one the caller has not been granted (GatedRepoError)."""
        self._repos[(repo_type, repo_id)].gated = True

    def sha(self, repo_type: str, repo_id: str) -> str:
        return self._repos[(repo_type, repo_id)].main

    def repo(self, repo_type: str, repo_id: str) -> _Repo | None:
        with self._lock:
            return self._repos.get((repo_type, repo_id))

    # lifecycle
    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("HubServer is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> "HubServer":
        """Serve on a free port; after stop(), on the same port again (the hub is back, same endpoint)."""
        if self._httpd is not None:
            return self
        handler = type("Handler", (_Handler,), {"hub": self})
        # port 0: a free port, chosen by the OS (HTTPServer sets SO_REUSEADDR, so a restart can rebind)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port or 0), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        # a short poll interval: stop() returns within 50 ms instead of serve_forever's default 0.5 s
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-fixture", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port: later requests get 'connection refused' (the endpoint stays known for messages)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.unhandled.clear()


API_ROUTE = re.compile(r"^/api/(?P<kind>models|datasets)/(?P<rest>.+)$")


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so a stopped server cannot keep answering on a
    # connection the client pooled earlier.
    protocol_version = "HTTP/1.0"
    hub: HubServer

    def log_message(self, format, *args):  # noqa: A002 - quiet test output
        pass

    # dispatch
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        with self.hub._lock:
            self.hub.requests.append((method, path))
        try:
            match = API_ROUTE.match(path)
            if match:
                repo_type = match["kind"][:-1]
                rest = match["rest"]
                for marker, route in (("/revision/", self._info), ("/tree/", self._tree),
                                      ("/paths-info/", self._paths_info)):
                    if marker in rest:
                        repo_id, tail = rest.split(marker, 1)
                        return route(method, repo_type, unquote(repo_id), tail, query)
                if method == "GET" and rest.count("/") <= 1:
                    return self._info(method, repo_type, unquote(rest), "main", query)
            elif "/resolve/" in path and method in ("GET", "HEAD"):
                repo_part, tail = path.split("/resolve/", 1)
                repo_type, repo_id = ("dataset", repo_part[len("/datasets/"):]) if repo_part.startswith("/datasets/") \
                    else ("model", repo_part[1:])
                return self._resolve(method, repo_type, unquote(repo_id), tail)
            with self.hub._lock:
                self.hub.unhandled.append((method, self.path))
            self._error(404, "NotFound", f"fixture hub has no route for {method} {path}")
        except BrokenPipeError:
            pass

    # responses
    def _send(self, status: int, body: bytes, headers: dict[str, str], method: str = "GET") -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _json(self, method: str, data, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}, method)

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps({"error": message}).encode(),
                   {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message,
                    **(headers or {})}, self.command)

    def _lookup(self, repo_type: str, repo_id: str, revision: str):
        """(repo, files at revision) or None after answering the hub's error for it."""
        repo = self.hub.repo(repo_type, repo_id)
        if repo is None:
            # The hub answers the same for a missing and a private repo (401 without a token).
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.gated:
            self._error(403, "GatedRepo", f"Access to {repo_type} {repo_id} is restricted. You must have access "
                                          "to it and be authenticated to access it. Please log in.")
            return None
        files = repo.files(unquote(revision))
        if files is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
            return None
        return repo, files

    # routes
    def _info(self, method: str, repo_type: str, repo_id: str, revision: str, query: dict) -> None:
        found = self._lookup(repo_type, repo_id, revision)
        if found is None:
            return
        repo, files = found
        sha = repo.sha(unquote(revision))
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, f in files.items():
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=len(f.data), blobId=f.oid)
                if f.sha256:
                    sibling["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
            siblings.append(sibling)
        info = {"_id": sha[:24], "id": repo_id, "sha": sha,
                "author": repo_id.split("/")[0] if "/" in repo_id else None, "private": False, "gated": False,
                "disabled": False, "lastModified": FAKE_DATE, "createdAt": FAKE_DATE, "downloads": 0, "likes": 0,
                "tags": [], "siblings": siblings}
        if repo_type == "model":
            info.update(modelId=repo_id, library_name="transformers")
        self._json(method, info)

    def _tree(self, method: str, repo_type: str, repo_id: str, tail: str, query: dict) -> None:
        revision, _, prefix = tail.partition("/")
        found = self._lookup(repo_type, repo_id, revision)
        if found is None:
            return
        _, files = found
        prefix = unquote(prefix).strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = _tree_entries(files, prefix, recursive)
        if entries is None:
            self._error(404, "EntryNotFound", f"{prefix} does not exist on {revision}")
            return
        self._json(method, entries)

    def _paths_info(self, method: str, repo_type: str, repo_id: str, revision: str, query: dict) -> None:
        found = self._lookup(repo_type, repo_id, revision)
        if found is None:
            return
        _, files = found
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        if "json" in (self.headers.get("Content-Type") or ""):
            paths = json.loads(body or "{}").get("paths", [])
        else:
            paths = parse_qs(body).get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        dirs = _directories(files)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(files[p].tree_entry(p))
            elif p in dirs:
                out.append(_dir_entry(p, files))
        self._json(method, out)

    def _resolve(self, method: str, repo_type: str, repo_id: str, tail: str) -> None:
        revision, _, filename = tail.partition("/")
        found = self._lookup(repo_type, repo_id, revision)
        if found is None:
            return
        repo, files = found
        commit = repo.sha(unquote(revision))
        filename = unquote(filename)
        f = files.get(filename)
        if f is None:
            # X-Repo-Commit lets the client cache the absence (.no_exist) like the real hub
            self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}",
                        headers={"X-Repo-Commit": commit})
            return
        etag = f.sha256 or f.oid
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f.sha256:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data))})
        body, status = f.data, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if match and (match[1] or match[2]):  # HfFileSystem reads byte ranges
            size = len(f.data)
            if match[1]:
                start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
            else:
                start, end = max(size - int(match[2]), 0), size - 1
            if start >= size:
                self._send(416, b"", {"Content-Range": f"bytes */{size}", **headers}, method)
                return
            body, status = f.data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, body, headers, method)


def _directories(files: dict[str, _File]) -> set[str]:
    dirs = set()
    for path in files:
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return dirs


def _dir_entry(path: str, files: dict[str, _File]) -> dict:
    inside = "".join(f"{p}\0{f.oid}\n" for p, f in sorted(files.items()) if p.startswith(path + "/"))
    return {"type": "directory", "oid": hashlib.sha1(inside.encode()).hexdigest(), "size": 0, "path": path}


def _tree_entries(files: dict[str, _File], prefix: str, recursive: bool) -> list[dict] | None:
    dirs = _directories(files)
    if prefix and prefix not in dirs:
        return None
    base = prefix + "/" if prefix else ""
    entries = []
    for d in sorted(dirs):
        if d.startswith(base) and (recursive or "/" not in d[len(base):]):
            entries.append(_dir_entry(d, files))
    for path, f in files.items():
        if path.startswith(base) and (recursive or "/" not in path[len(base):]):
            entries.append(f.tree_entry(path))
    return entries


# ---------------------------------------------------------------------------------------------- pytest fixtures

@dataclass
class HubRepos:
    """The built test repositories: (repo_type, repo_id) -> local directory."""
    model_id: str
    classifier_id: str
    dataset_id: str
    dirs: dict[tuple[str, str], Path]

    def serve(self, server: HubServer) -> HubServer:
        for (repo_type, repo_id), directory in self.dirs.items():
            server.publish(repo_type, repo_id, directory)
        return server


@pytest.fixture(scope="session")
def hub_repos(tmp_path_factory) -> HubRepos:
    """The tiny GPT-2, sentiment classifier and IMDb-shaped dataset, built once per session (~5 s)."""
    from hub_fixture_data import build_all

    return build_all(tmp_path_factory.mktemp("hub_repos"))


@pytest.fixture
def hub_server(hub_repos, monkeypatch) -> HubServer:
    """A fresh hub on a free 127.0.0.1 port serving `hub_repos`, with HF_ENDPOINT pointing at it.

    Function scope: a test may `stop()` it (hub down) or `publish` a new revision without
    affecting others. HF_ENDPOINT is read at call time by pipeline.data.hub; huggingface_hub itself
    reads it at import, so in-process calls into the library pass `endpoint=hub_server.endpoint`.
    """
    server = hub_repos.serve(HubServer()).start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield server
    server.stop()


def main() -> None:
    """Serve the test repositories (those of the tiny-chat preset included) until interrupted:
    python tests/hub_fixture.py [--port 8765] [--root DIR]; then export HF_ENDPOINT=<the printed URL>."""
    import argparse
    import sys
    import tempfile
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: pipeline.* builds the models
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hub_fixture_data import build_all

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--root", default=None, help="where the repositories are built (default: a temp dir)")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="slurm-dpo-hub-"))
    server = build_all(root).serve(HubServer())
    server.port = args.port or None
    server.start()
    print(f"serving {len(server._repos)} repositories from {root}\nexport HF_ENDPOINT={server.endpoint}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
