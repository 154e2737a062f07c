"""A small server on 127.0.0.1 that speaks the part of the Hugging Face Hub's HTTP API that
huggingface_hub 0.36 uses to create a repo, validate a model card's YAML, pre-upload, upload LFS objects (basic transfer, so
no Xet), commit (ndjson), list the tree, read model info and download files (``resolve``), with
the Hub's headers: X-Repo-Commit, ETag, X-Linked-Etag / X-Linked-Size for LFS files, and
X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) on errors.

Writes need ``Authorization: Bearer <token>``; reads of a private repo too. Repos live in memory.
``HubServer.corrupt(repo, path)`` changes a stored file behind the client's back (same size, same
ETag), as bad storage would. Run it alone for the bench: ``python tests/hub_server.py --port 8765``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 1024  # files from this size on go through LFS, like the Hub's binary files


@dataclass
class Repo:
    private: bool = False
    head: str = ""
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> path -> content
    lfs: dict[str, str] = field(default_factory=dict)  # path -> sha256 of the LFS file committed there


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    def __init__(self, token: str | None = None, port: int = 0):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS store: sha256 -> content
        self.requests: list[str] = []
        self.delays: dict[str, float] = {}  # file name -> seconds a download of it stalls first
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.head if revision == "main" else revision]

    def corrupt(self, repo_id: str, path: str) -> None:
        """Flip a byte of a stored file in the head commit; its recorded ETag stays as it was."""
        files = self.files(repo_id)
        data = bytearray(files[path])
        data[len(data) // 2] ^= 0xFF
        files[path] = bytes(data)


_API_REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: tests read the client's output
        pass

    # -- plumbing -----------------------------------------------------------------------------

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self.reply(status, {"error": message}, headers)

    def authorized(self) -> bool:
        return self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def repo(self, repo_id: str, write: bool = False) -> Repo | None:
        """The repo, or None after answering like the Hub (401 without a valid token, else 404)."""
        repo = self.hub.repos.get(repo_id)
        if write and not self.authorized():
            self.error(401, None, "Invalid credentials in Authorization header")
            return None
        if repo is None or (repo.private and not self.authorized()):
            self.error(404 if self.authorized() else 401, "RepoNotFound", "Repository not found")
            return None
        return repo

    def commit_of(self, repo: Repo, revision: str) -> str | None:
        revision = unquote(revision)
        sha = repo.head if revision == "main" else revision
        if sha not in repo.commits:
            self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return sha

    def dispatch(self) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append(f"{self.command} {url.path}")
        path, query = url.path, parse_qs(url.query)
        if self.command == "GET" and "/resolve/" in path and (stall := self.hub.delays.get(path.rsplit("/", 1)[-1])):
            time.sleep(stall)  # a slow download, for tests that interrupt one
        routes = [
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", _API_REPO + r"/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", _API_REPO + r"/commit/(?P<rev>[^/]+)", self.commit),
            ("GET", _API_REPO + r"/tree/(?P<rev>[^/]+)(?P<sub>/.*)?", self.tree),
            ("GET", _API_REPO + r"(?:/revision/(?P<rev>[^/]+))?", self.model_info),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                with self.hub.lock:
                    return handler(query=query, **{k: v for k, v in match.groupdict().items()})
        self.body()
        self.error(404, None, f"no route for {self.command} {path}")

    do_GET = do_POST = do_PUT = do_HEAD = dispatch

    # -- endpoints ----------------------------------------------------------------------------

    def create_repo(self, query) -> None:
        payload = json.loads(self.body() or b"{}")
        if not self.authorized():
            return self.error(401, None, "Invalid credentials in Authorization header")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}" if "/" not in payload["name"] else payload["name"]
        if repo_id in self.hub.repos:  # the Hub names the existing repo's url in its 409
            return self.reply(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"},
                              {"X-Error-Message": "You already created this model repo"})
        sha = secrets.token_hex(20)
        self.hub.repos[repo_id] = Repo(private=bool(payload.get("private")), head=sha, commits={sha: {}})
        self.reply(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, query) -> None:  # called before committing a README.md with front matter
        json.loads(self.body())
        self.reply(200, {"errors": [], "warnings": []})

    def model_info(self, query, repo, rev=None) -> None:
        if (found := self.repo(repo)) is None or (sha := self.commit_of(found, rev or "main")) is None:
            return
        files = found.commits[sha]
        self.reply(200, {"id": repo, "modelId": repo, "sha": sha, "private": found.private,
                         "siblings": [{"rfilename": name} for name in sorted(files)]})

    def tree(self, query, repo, rev, sub=None) -> None:
        if (found := self.repo(repo)) is None or (sha := self.commit_of(found, rev)) is None:
            return
        prefix = (sub or "").strip("/")
        entries = []
        for name, data in sorted(found.commits[sha].items()):
            if prefix and not name.startswith(prefix + "/"):
                continue
            entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha(data)}
            if name in found.lfs:
                entry["lfs"] = {"oid": found.lfs[name], "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self.reply(200, entries)

    def preupload(self, query, repo, rev) -> None:
        payload = json.loads(self.body())
        if (found := self.repo(repo, write=True)) is None or self.commit_of(found, rev) is None:
            return
        self.reply(200, {"files": [{"path": item["path"], "shouldIgnore": False,
                                    "uploadMode": "lfs" if item["size"] >= LFS_THRESHOLD else "regular"}
                                   for item in payload["files"]]})

    def lfs_batch(self, query, repo) -> None:
        payload = json.loads(self.body())
        if self.repo(repo, write=True) is None:
            return
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.hub.objects:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{item['oid']}"}}
            objects.append(entry)
        self.reply(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, query, oid) -> None:
        data = self.body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self.error(400, None, "sha256 of the uploaded content differs from the oid")
        self.hub.objects[oid] = data
        self.reply(200, raw=b"")

    def commit(self, query, repo, rev) -> None:
        lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        if (found := self.repo(repo, write=True)) is None or (parent := self.commit_of(found, rev)) is None:
            return
        files, lfs = dict(found.commits[parent]), dict(found.lfs)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.pop(value["path"], None)
            elif key == "lfsFile":
                if value["oid"] not in self.hub.objects:
                    return self.error(400, None, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = self.hub.objects[value["oid"]]
                lfs[value["path"]] = value["oid"]
            elif key == "deletedFile":
                lfs.pop(value["path"], None)
                if files.pop(value["path"], None) is None:
                    return self.error(404, "EntryNotFound", "A file with this name doesn't exist")
            elif key == "deletedFolder":
                files = {name: data for name, data in files.items() if not name.startswith(value["path"].rstrip("/") + "/")}
        sha = secrets.token_hex(20)
        found.commits[sha], found.head, found.lfs = files, sha, lfs
        self.reply(200, {"commitUrl": f"{self.hub.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def resolve(self, query, repo, rev, file) -> None:
        if (found := self.repo(repo)) is None or (sha := self.commit_of(found, rev)) is None:
            return
        name = unquote(file)
        data = found.commits[sha].get(name)
        if data is None:
            return self.error(404, "EntryNotFound", f"{name} does not exist on {rev}")
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if name in found.lfs:  # the ETag of what was committed, even when storage changed it since
            oid = found.lfs[name]
            headers.update({"ETag": f'"{oid}"', "X-Linked-Etag": f'"{oid}"', "X-Linked-Size": len(data)})
        else:
            headers["ETag"] = f'"{git_blob_sha(data)}"'
        self.reply(200, headers=headers, raw=data)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=None)
    options = parser.parse_args()
    with HubServer(token=options.token, port=options.port) as server:
        print(server.url, flush=True)
        while True:
            time.sleep(3600)
