"""A loopback, Hub-compatible HTTP server for testing pushes and downloads without a network.

It implements the endpoints huggingface_hub 2.4 calls for create-repo, model-card validation, upload (preupload
answers "regular" for every file, so contents arrive base64-encoded in the NDJSON commit: the LFS/xet upload paths
are NOT exercised), download (resolve GET/HEAD with X-Repo-Commit / ETag and the EntryNotFound / RepoNotFound
error codes), repo info and tree listing. Repositories are plain folders under `root/<namespace>/<name>`; there is
one branch per repository and revisions are ignored.

The Hub client reads `HF_ENDPOINT` when it is imported, so client code runs in a subprocess started with
`hub_env(...)` (see `run_hub_script`), while the server runs in the pytest process, where a test can inspect the
stored repositories and switch failures on (`fail`, `drop`).

Only 127.0.0.1 is bound; the server thread is a daemon and every request body is bounded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the checkout whose neuclip_hf the subprocesses must import
MAX_BODY = 256 * 1024 * 1024  # refuse absurd request bodies (the test models are a few MB)
# Environment variables that make the Hub client refuse or redirect network access; removed for Hub subprocesses.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")


class FakeHub:
    """The server: start it with `start()`, stop it with `stop()`; `url` is the value for `HF_ENDPOINT`.

    Attributes:
        root: Folder holding one sub-folder per repository.
        requests: `(method, kind, repo_id)` of every request, in arrival order (`kind` names the endpoint, e.g.
            `commit`, `resolve`, `create`).
        failures: endpoint kind -> queue of `[status or "drop", remaining count or None for always]`.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: list[tuple[str, str, str | None]] = []
        self.failures: dict[str, list[list]] = {}
        self.commits: dict[str, list[str]] = {}  # repo id -> commit shas, oldest first
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: any free port
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def fail(self, status: int | str, kinds: tuple[str, ...] = ("commit",), times: int | None = None) -> None:
        """Answer `status` (an HTTP code, or "drop" to close the connection without an answer) to `times` requests
        (None: all of them) of the endpoint kinds `kinds`, after the failures already queued for them."""
        with self.lock:
            for kind in kinds:
                self.failures.setdefault(kind, []).append([status, times])

    def heal(self) -> None:
        """Stop failing."""
        with self.lock:
            self.failures.clear()

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def files(self, repo_id: str) -> dict[str, bytes]:
        """Every stored file of a repository: path in repo -> content."""
        base = self.repo_dir(repo_id)
        return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}

    def count(self, kind: str, repo_id: str | None = None) -> int:
        """How many requests of `kind` (for `repo_id`, if given) arrived."""
        return sum(1 for _, k, r in self.requests if k == kind and (repo_id is None or r == repo_id))

    # -- used by the handler ------------------------------------------------------------------------------------
    def _take_failure(self, kind: str):
        with self.lock:
            queue = self.failures.get(kind) or []
            while queue and queue[0][1] == 0:  # exhausted entries make way for the next queued failure
                queue.pop(0)
            if not queue:
                return None
            entry = queue[0]
            if entry[1] is not None:
                entry[1] -= 1
            return entry[0]

    def _head_sha(self, repo_id: str) -> str:
        return self.commits.get(repo_id, ["0" * 40])[-1]

    def _commit(self, repo_id: str, lines: list[dict]) -> str:
        base = self.repo_dir(repo_id)
        with self.lock:
            for line in lines:
                value = line.get("value", {})
                if line.get("key") == "file":
                    target = _inside(base, value["path"])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    content = value["content"]
                    target.write_bytes(base64.b64decode(content) if value.get("encoding") == "base64" else
                                       content.encode("utf-8"))
                elif line.get("key") == "deletedFile":
                    _inside(base, value["path"]).unlink(missing_ok=True)
            history = self.commits.setdefault(repo_id, [])
            sha = hashlib.sha1(f"{repo_id}:{len(history)}:{json.dumps(lines)[:4096]}".encode()).hexdigest()
            history.append(sha)
            return sha


def _inside(base: Path, relative: str) -> Path:
    """`base / relative`, refusing paths that escape `base`."""
    target = (base / relative).resolve()
    if base.resolve() not in target.parents:
        raise ValueError(f"path {relative!r} escapes the repository")
    return target


class _Handler(BaseHTTPRequestHandler):
    """Routes one request. HTTP/1.0: one request per connection, which keeps `drop` failures simple."""

    fake_hub: FakeHub

    def log_message(self, format, *args):  # silence the default stderr access log
        pass

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError(f"request body of {length} bytes is too large")
        return self.rfile.read(length)

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json", headers=None,
              head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers=None, head: bool = False) -> None:
        self._send(status, json.dumps(payload).encode(), headers=headers, head=head)

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        self._json(status, {"error": message}, headers={"X-Error-Code": code, "X-Error-Message": message}, head=head)

    # -- routing --------------------------------------------------------------------------------------------------
    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str) -> None:
        hub = self.fake_hub
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        kind, repo_id, rest = _classify(parts)
        hub.requests.append((method, kind, repo_id))
        body = self._body() if method == "POST" else b""
        failure = hub._take_failure(kind)
        if failure == "drop":
            self.close_connection = True
            self.connection.shutdown(2)  # a network error for the client: no response at all
            return
        if failure is not None:
            self._error(int(failure), "FakeHubFailure", f"fake hub answers {failure} to {kind}", head=method == "HEAD")
            return
        handler = getattr(self, f"_do_{kind}", None)
        if handler is None:
            self._error(404, "NotFound", f"fake hub has no endpoint {method} {url.path}", head=method == "HEAD")
            return
        handler(method, repo_id, rest, body, parse_qs(url.query))

    def _known(self, repo_id: str, head: bool = False) -> bool:
        if self.fake_hub.repo_dir(repo_id).is_dir():
            return True
        self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
        return False

    # -- endpoints ------------------------------------------------------------------------------------------------
    def _do_create(self, method, repo_id, rest, body, query):
        request = json.loads(body or b"{}")
        repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
        prefix = "" if request.get("type", "model") == "model" else f"{request['type']}s/"
        url = f"{self.fake_hub.url}/{prefix}{repo_id}"
        target = self.fake_hub.repo_dir(repo_id)
        if target.is_dir():
            self._json(409, {"error": "You already created this repo", "url": url})
            return
        target.mkdir(parents=True)
        self._json(200, {"url": url, "name": repo_id})

    def _do_validate_yaml(self, method, repo_id, rest, body, query):
        self._json(200, {"errors": [], "warnings": []})

    def _do_preupload(self, method, repo_id, rest, body, query):
        if not self._known(repo_id):
            return
        files = json.loads(body)["files"]
        self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]})

    def _do_commit(self, method, repo_id, rest, body, query):
        if not self._known(repo_id):
            return
        lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        sha = self.fake_hub._commit(repo_id, lines)
        self._json(200, {"commitUrl": f"{self.fake_hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None})

    def _do_info(self, method, repo_id, rest, body, query):
        if not self._known(repo_id, head=method == "HEAD"):
            return
        siblings = [{"rfilename": name} for name in self.fake_hub.files(repo_id)]
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": self.fake_hub._head_sha(repo_id),
                         "private": False, "siblings": siblings, "tags": []}, head=method == "HEAD")

    def _do_tree(self, method, repo_id, rest, body, query):
        if not self._known(repo_id):
            return
        base = self.fake_hub.repo_dir(repo_id)
        folder = _inside(base, "/".join(rest[1:])) if len(rest) > 1 else base
        if not folder.is_dir():
            self._error(404, "EntryNotFound", f"{'/'.join(rest[1:])} does not exist in {repo_id}")
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = []
        for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
            relative = path.relative_to(base).as_posix()
            if path.is_dir():
                entries.append({"type": "directory", "path": relative, "oid": "0" * 40})
            else:
                data = path.read_bytes()
                entries.append({"type": "file", "path": relative, "size": len(data),
                                "oid": hashlib.sha1(data).hexdigest()})
        self._json(200, entries)

    def _do_paths_info(self, method, repo_id, rest, body, query):
        if not self._known(repo_id):
            return
        text = body.decode("utf-8")
        try:  # the client sends a form or JSON body with the wanted paths
            paths = json.loads(text)["paths"]
        except ValueError:
            paths = parse_qs(text).get("paths", [])
        base = self.fake_hub.repo_dir(repo_id)
        entries = []
        for relative in paths:
            path = _inside(base, relative)
            if path.is_file():
                data = path.read_bytes()
                entries.append({"type": "file", "path": relative, "size": len(data),
                                "oid": hashlib.sha1(data).hexdigest()})
            elif path.is_dir():
                entries.append({"type": "directory", "path": relative, "oid": "0" * 40})
        self._json(200, entries)

    def _do_resolve(self, method, repo_id, rest, body, query):
        head = method == "HEAD"
        if not self._known(repo_id, head=head):
            return
        path = _inside(self.fake_hub.repo_dir(repo_id), "/".join(rest[1:]))
        if not path.is_file():
            self._error(404, "EntryNotFound", f"{'/'.join(rest[1:])} does not exist in {repo_id}", head=head)
            return
        data = path.read_bytes()
        headers = {"X-Repo-Commit": self.fake_hub._head_sha(repo_id), "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        self._send(200, data, content_type="application/octet-stream", headers=headers, head=head)


def _classify(parts: list[str]) -> tuple[str, str | None, list[str]]:
    """(endpoint kind, repo id, remaining path segments) of a request path split on '/'."""
    if parts[:3] == ["api", "repos", "create"]:
        return "create", None, []
    if parts[:2] == ["api", "validate-yaml"]:
        return "validate_yaml", None, []
    if parts[:2] == ["api", "models"] and len(parts) >= 4:
        repo_id, rest = "/".join(parts[2:4]), parts[4:]
        if not rest or rest[0] == "revision":
            return "info", repo_id, rest
        if rest[0] in ("preupload", "commit", "tree"):
            return rest[0], repo_id, rest[1:]
        if rest[0] == "paths-info":
            return "paths_info", repo_id, rest[1:]
        return "unknown", repo_id, rest
    if len(parts) >= 5 and parts[2] == "resolve":
        return "resolve", "/".join(parts[:2]), parts[3:]
    return "unknown", None, parts


# -- pytest side ------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(tmp_path):
    """A running `FakeHub` with its repositories under `tmp_path / "hub"`; stopped after the test."""
    hub = FakeHub(tmp_path / "hub").start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def module_hub(tmp_path_factory):
    """One `FakeHub` shared by a test module (for tests that read what one expensive push uploaded)."""
    hub = FakeHub(tmp_path_factory.mktemp("hub")).start()
    yield hub
    hub.stop()


def hub_env(hub: FakeHub, hf_home: Path, token: str | None = None, with_package: bool = True) -> dict[str, str]:
    """Environment of a subprocess that talks to `hub`: online, `HF_ENDPOINT` set before anything is imported.

    Args:
        hub: The running server.
        hf_home: A fresh cache folder (a new one per process makes every download a real one).
        token: Value of `HF_TOKEN` (None: no token).
        with_package: Put this checkout (and tests/) on `PYTHONPATH`; False leaves both off, for the
            "loads without the package" checks.
    """
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES and k != "HF_TOKEN"}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    env.pop("PYTHONPATH", None)
    if with_package:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_hub_script(hub: FakeHub, script: str, workdir: Path, name: str, token: str | None = None,
                   with_package: bool = True, timeout: float = 300) -> tuple[dict, str]:
    """Run `script` in a fresh Python process against `hub`; returns (its last stdout line as JSON, all output).

    The script must print one JSON object as its last line. Fails the test with the process's output if it exits
    with an error.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.py"
    path.write_text(script)
    env = hub_env(hub, workdir / f"hf_home_{name}", token=token, with_package=with_package)
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, cwd=workdir,
                          timeout=timeout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"{name} failed (exit {done.returncode}):\n{output[-6000:]}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1]), output
