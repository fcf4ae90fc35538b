"""A stand-in for the Hugging Face Hub on localhost: the routes huggingface_hub uses to create a repo, commit
files (validate-yaml, preupload, commit) and download them (repo info, tree, resolve). It keeps what arrives.

Every file is declared "regular" at preupload, so its bytes travel inside the commit request (no LFS or Xet
storage to fake). Route shapes follow huggingface_hub's HfApi.create_repo / create_commit / snapshot_download.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class FakeRepo:
    files: dict[str, bytes] = field(default_factory=dict)
    sha: str = "0" * 40
    commits: list[dict] = field(default_factory=list)


@dataclass
class FakeHub:
    url: str = ""
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    validated_readmes: list[str] = field(default_factory=list)


def start(hub: FakeHub) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_POST(self):
            self._route("POST")

        def do_GET(self):
            self._route("GET")

        def do_HEAD(self):
            self._route("HEAD")

        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((method, path))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            for route_method, pattern, action in ROUTES:
                match = re.fullmatch(pattern, path)
                if match and route_method == method.replace("HEAD", "GET"):
                    return action(self, hub, body, head=method == "HEAD", **match.groupdict())
            self._send(404, {"error": f"no route {method} {path}"}, headers={"X-Error-Code": "EntryNotFound"})

        def _send(self, status: int, payload, headers: dict | None = None, head: bool = False) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(data)

    return Handler


def _create_repo(handler, hub: FakeHub, body: bytes, head: bool) -> None:
    request = json.loads(body)
    repo_id = f"{request['organization']}/{request['name']}"
    hub.repos.setdefault(repo_id, FakeRepo())
    handler._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})


def _validate_yaml(handler, hub: FakeHub, body: bytes, head: bool) -> None:
    content = json.loads(body)["content"]
    hub.validated_readmes.append(content)
    try:
        metadata = yaml.safe_load(content.split("---")[1])
        errors = [] if isinstance(metadata, dict) else [{"message": "metadata is not a mapping"}]
    except (IndexError, yaml.YAMLError) as error:
        errors = [{"message": str(error)}]
    handler._send(400 if errors else 200, {"errors": errors, "warnings": []})


def _preupload(handler, hub: FakeHub, body: bytes, head: bool, repo: str, revision: str) -> None:
    files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in json.loads(body)["files"]]
    handler._send(200, {"files": files})


def _commit(handler, hub: FakeHub, body: bytes, head: bool, repo: str, revision: str) -> None:
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    stored = hub.repos[repo]
    for line in lines:
        if line["key"] == "file":
            stored.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
    stored.commits.append(lines[0]["value"])
    stored.sha = hashlib.sha1(b"".join(stored.files[name] for name in sorted(stored.files))).hexdigest()
    handler._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{stored.sha}", "commitOid": stored.sha, "pullRequestUrl": None})


def _repo_info(handler, hub: FakeHub, body: bytes, head: bool, repo: str, revision: str) -> None:
    if repo not in hub.repos:
        return handler._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
    stored = hub.repos[repo]
    siblings = [{"rfilename": name} for name in sorted(stored.files)]
    handler._send(200, {"id": repo, "modelId": repo, "sha": stored.sha, "siblings": siblings, "private": False})


def _tree(handler, hub: FakeHub, body: bytes, head: bool, repo: str, revision: str) -> None:
    entries = [
        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        for name, data in sorted(hub.repos[repo].files.items())
    ]
    handler._send(200, entries)


def _resolve(handler, hub: FakeHub, body: bytes, head: bool, repo: str, revision: str, filename: str) -> None:
    stored = hub.repos.get(repo)
    if stored is None or filename not in stored.files:
        return handler._send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"}, head=head)
    data = stored.files[filename]
    headers = {"X-Repo-Commit": stored.sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
    handler._send(200, data, headers=headers, head=head)


ROUTES = [
    ("POST", r"/api/repos/create", _create_repo),
    ("POST", r"/api/validate-yaml", _validate_yaml),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", _preupload),
    ("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", _commit),
    ("GET", rf"/api/models/{REPO}/revision/(?P<revision>[^/]+)", _repo_info),
    ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(/.*)?", _tree),
    ("GET", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)", _resolve),
]
