"""A small in-process Hugging Face Hub speaking the HTTP API that huggingface_hub 2.4 calls.

    with FakeHub() as hub:               # 127.0.0.1, ephemeral port, one daemon thread
        hub.endpoint                     # point HF_ENDPOINT / constants.ENDPOINT here
        hub.repos["org/name"].files()    # what arrived: {path: bytes} at a branch head

Endpoints (found by reading huggingface_hub 2.4's source, hf_api.py / _commit_api.py / lfs.py /
_snapshot_download.py / file_download.py, and checked against the request log):

  upload    POST /api/repos/create                          create_repo (409 when it exists)
            GET  /api/models/{id}[/revision/{rev}]          repo_info / model_info (sha, private, siblings)
            POST /api/models/{id}/branch/{branch}           create_branch
            POST /api/validate-yaml                         README.md front matter check in create_commit
            POST /api/models/{id}/preupload/{rev}           uploadMode lfs|regular + remote oid per file
            POST /{id}.git/info/lfs/objects/batch           LFS batch API, "basic" transfer
            PUT  /lfs-upload/{id}/{sha256}                  the LFS object itself (href from the batch answer)
            POST /api/models/{id}/commit/{rev}              NDJSON: header, file (base64), lfsFile (oid)
  download  GET  /api/models/{id}/tree/{rev}?recursive=1    list_repo_tree (one page)
            HEAD/GET /{id}/resolve/{rev}/{path}             file metadata (X-Repo-Commit, ETag) and bytes

The xet upload path (hf_xet installed) needs a CAS server; tests set HF_HUB_DISABLE_XET so the
client takes the classic LFS path above. No X-Xet-Hash header is ever sent, so downloads stay on
plain HTTP too.

Faults: `hub.drop(method, path_substring, times)` closes the connection of the next matching
requests without an answer, after reading half of the body: what a network cut mid-upload does.
`hub.stall(method, path_substring, every=None, times, piece=1)` reads the next matching requests and then
never answers (every=None), or sends the right answer `piece` bytes every `every` seconds: a server that trickles.
A stalled request ends when the client hangs up, when the hub is closed, or after STALL_LIMIT seconds.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
STALL_LIMIT = 60.0  # seconds a stalled request is held at most: a test that fails never leaves a thread behind for long


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    files: dict[str, tuple[str, str | None]]  # path -> (blob key, lfs sha256 or None)


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes: git blobs and LFS objects of this repo

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev, rev)
        return self.commits.get(oid)

    def files(self, rev: str = "main") -> dict[str, bytes]:
        c = self.resolve(rev)
        return {p: self.blobs[k] for p, (k, _) in c.files.items()} if c else {}

    def history(self, rev: str = "main") -> list[Commit]:
        out, c = [], self.resolve(rev)
        while c is not None:
            out.append(c)
            c = self.commits.get(c.parent) if c.parent else None
        return out


class FakeHub:
    def __init__(self, tokens: tuple[str, ...] = ("hf_test_token",)):
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str]] = []  # (method, path?query)
        self.create_payloads: list[dict] = []
        self._drops: list[list] = []
        self._stalls: list[list] = []
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._n = 0
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    # --- test helpers -------------------------------------------------------------
    def drop(self, method: str, path_part: str, times: int = 1) -> None:
        self._drops.append([method, path_part, times])

    def stall(self, method: str, path_part: str, every: float | None = None, times: int = 1_000_000, piece: int = 1) -> None:
        self._stalls.append([method, path_part, times, every, piece])

    def seed(self, repo_id: str, files: dict[str, bytes], private: bool = False, message: str = "initial") -> str:
        """Create a repo holding `files` on main (the download side); returns the commit oid."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id, private))
        return self._commit(repo, "main", message, "", {p: (b, p.endswith(LFS_SUFFIXES)) for p, b in files.items()})

    def requests(self, method: str | None = None, part: str = "") -> list[str]:
        return [p for m, p in self.log if (method is None or m == method) and part in p]

    # --- state changes ------------------------------------------------------------
    def _commit(self, repo: Repo, branch: str, message: str, description: str, adds: dict[str, tuple[bytes, bool]]) -> str:
        with self._lock:
            parent = repo.branches.get(branch)
            files = dict(repo.commits[parent].files) if parent else {}
            for path, (data, lfs) in adds.items():
                key = hashlib.sha256(data).hexdigest()
                repo.blobs[key] = data
                files[path] = (key, key if lfs else None)
            self._n += 1
            oid = hashlib.sha1(f"{repo.repo_id}{self._n}{message}".encode()).hexdigest()
            repo.commits[oid] = Commit(oid, parent, message, description, files)
            repo.branches[branch] = oid
            return oid

    def _take_drop(self, method: str, path: str) -> bool:
        return self._take(self._drops, method, path) is not None

    def _take(self, faults: list[list], method: str, path: str) -> list | None:
        with self._lock:
            for d in faults:
                if d[0] == method and d[1] in path and d[2] > 0:
                    d[2] -= 1
                    return d
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # --- plumbing -----------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                n = int(self.rfile.readline().strip().split(b";")[0], 16)
                if n == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(n)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, code: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and self.command != "HEAD":  # a HEAD answer has headers only, errors included
            self.wfile.write(body)

    def _error(self, code: int, error_code: str, msg: str) -> None:
        self._send(code, {"error": msg}, {"X-Error-Code": error_code, "X-Error-Message": msg})

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[7:] in self.hub.tokens

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self.hub.log.append((method, self.path))
        if self.hub._take_drop(method, path):
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n // 2)  # a cut in the middle of the body
            self.close_connection = True
            self.connection.close()
            return
        body = self._body() if method in ("POST", "PUT") else b""
        stall = self.hub._take(self.hub._stalls, method, path)
        if stall is not None:
            return self._stalled(method, path, body, query, stall[3], stall[4])
        self._route(method, path, body, query)

    def _route(self, method: str, path: str, body: bytes, query: dict) -> None:
        for pattern, name in ROUTES:
            m = re.fullmatch(pattern, path)
            if m and name.startswith(method.lower() + "_"):
                return getattr(self, name)(*m.groups(), body=body, query=query)
        self._send(404, {"error": f"no route {method} {path}"})

    def _stalled(self, method: str, path: str, body: bytes, query: dict, every: float | None, piece: int) -> None:
        """No answer at all (every=None), or the right answer `piece` bytes every `every` seconds."""
        self.close_connection = True
        if every is None:
            self.hub._closing.wait(STALL_LIMIT)
            return
        real, self.wfile = self.wfile, io.BytesIO()
        try:
            self._route(method, path, body, query)
            answer = self.wfile.getvalue()
        finally:
            self.wfile = real
        end = time.monotonic() + STALL_LIMIT
        for i in range(0, len(answer), piece):
            if self.hub._closing.wait(every) or time.monotonic() > end:
                return
            try:
                real.write(answer[i : i + piece])
                real.flush()
            except OSError:  # the client hung up
                return

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or ((repo.private or write) and not self._authorized()):
            self._error(401 if not self._authorized() else 404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        return repo

    def _at(self, repo_id: str, rev: str, write: bool = False) -> tuple[Repo, object] | None:
        """The repo and the commit `rev` names, or None after answering the error (401/404)."""
        repo = self._repo(repo_id, write)
        if repo is None:
            return None
        c = repo.resolve(rev)
        if c is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, c

    # --- upload side --------------------------------------------------------------
    def post_create(self, body, query):
        if not self._authorized():
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        p = json.loads(body)
        self.hub.create_payloads.append(p)
        repo_id = f"{p['organization']}/{p['name']}" if p.get("organization") else p["name"]
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo", "url": f"{self.hub.endpoint}/{repo_id}"})
        repo = self.hub.repos[repo_id] = Repo(repo_id, p.get("visibility") == "private")
        self.hub._commit(repo, "main", "initial commit", "", {".gitattributes": (b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)})
        self._send(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})

    def get_info(self, repo_id, rev, body, query):
        found = self._at(repo_id, rev or "main")
        if found is None:
            return
        repo, c = found
        self._send(200, {"id": repo_id, "sha": c.oid, "private": repo.private, "siblings": [{"rfilename": p} for p in c.files]})

    def post_branch(self, repo_id, branch, body, query):
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if branch in repo.branches:
            return self._send(409, {"error": "Reference already exists"})
        repo.branches[branch] = repo.branches["main"]
        self._send(200, {})

    def post_validate_yaml(self, body, query):
        content = json.loads(body)["content"]
        ok = content.startswith("---\n") and "\n---\n" in content[4:]
        self._send(200 if ok else 400, {"errors": [] if ok else [{"message": "no YAML front matter"}], "warnings": []})

    def post_preupload(self, repo_id, rev, body, query):
        found = self._at(repo_id, rev, write=True)
        if found is None:
            return
        repo, c = found
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES)
            have = c.files.get(f["path"])
            oid = None
            if have is not None:
                oid = have[1] if have[1] else git_blob_sha1(repo.blobs[have[0]])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": files, "commitOid": c.oid})

    def post_lfs_batch(self, repo_id, body, query):
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        p = json.loads(body)
        objs = []
        for o in p["objects"]:
            obj = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in repo.blobs:  # LFS storage is per repo: an object elsewhere is sent again
                obj["actions"] = {"upload": {"href": f"{self.hub.endpoint}/lfs-upload/{repo_id}/{o['oid']}"}}
            objs.append(obj)
        self._send(200, {"transfer": "basic", "objects": objs}, {"Content-Type": "application/vnd.git-lfs+json"})

    def put_lfs_upload(self, repo_id, oid, body, query):
        if hashlib.sha256(body).hexdigest() != oid:
            return self._send(400, {"error": "sha256 mismatch"})
        if repo_id not in self.hub.repos:
            return self._send(404, {"error": f"no repo {repo_id}"})
        self.hub.repos[repo_id].blobs[oid] = body
        self._send(200, {})

    def post_commit(self, repo_id, rev, body, query):
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if rev not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        header = lines[0]["value"]
        adds: dict[str, tuple[bytes, bool]] = {}
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                adds[v["path"]] = (base64.b64decode(v["content"]), False)
            elif item["key"] == "lfsFile":
                if v["oid"] not in repo.blobs:
                    return self._send(400, {"error": f"LFS object {v['oid']} for {v['path']} was never uploaded"})
                adds[v["path"]] = (repo.blobs[v["oid"]], True)
        oid = self.hub._commit(repo, rev, header["summary"], header.get("description", ""), adds)
        self._send(200, {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True})

    # --- download side ------------------------------------------------------------
    def get_tree(self, repo_id, rev, body, query):
        found = self._at(repo_id, rev)
        if found is None:
            return
        repo, c = found
        out = []
        for path, (key, lfs) in sorted(c.files.items()):
            data = repo.blobs[key]
            e = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if lfs:
                e["lfs"] = {"oid": lfs, "size": len(data), "pointerSize": 134}
            out.append(e)
        self._send(200, out)

    def get_resolve(self, repo_id, rev, path, body, query, head=False):
        found = self._at(repo_id, rev)
        if found is None:
            return
        repo, c = found
        if path not in c.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        key, lfs = c.files[path]
        data = repo.blobs[key]
        etag = lfs or git_blob_sha1(data)
        self._send(200, data, {"X-Repo-Commit": c.oid, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}, head=head)

    def head_resolve(self, repo_id, rev, path, body, query):
        self.get_resolve(repo_id, rev, path, body, query, head=True)


ID = r"([\w.-]+/[\w.-]+)"
ROUTES = [
    (r"/api/repos/create", "post_create"),
    (r"/api/validate-yaml", "post_validate_yaml"),
    (rf"/api/models/{ID}/preupload/(.+)", "post_preupload"),
    (rf"/api/models/{ID}/commit/(.+)", "post_commit"),
    (rf"/api/models/{ID}/branch/(.+)", "post_branch"),
    (rf"/api/models/{ID}/tree/([^/]+)/?", "get_tree"),
    (rf"/api/models/{ID}(?:/revision/(.+))?", "get_info"),
    (rf"/{ID}\.git/info/lfs/objects/batch", "post_lfs_batch"),
    (rf"/lfs-upload/{ID}/([0-9a-f]{{64}})", "put_lfs_upload"),
    (rf"/{ID}/resolve/([^/]+)/(.+)", "get_resolve"),
    (rf"/{ID}/resolve/([^/]+)/(.+)", "head_resolve"),
]
