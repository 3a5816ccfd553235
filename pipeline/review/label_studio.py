"""A Label Studio server reached through its REST API (no SDK: three calls over the standard library): create a
project with a labeling config, import tasks into it. The API key comes from LABEL_STUDIO_API_KEY and is never
printed: a legacy token goes as `Token KEY`; a personal access token (a JWT) is first exchanged for an access token
at /api/token/refresh, as Label Studio 1.14+ asks."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from pipeline.job.errors import UserError

API_KEY = "LABEL_STUDIO_API_KEY"
TIMEOUT_S = 60
IMPORT_BATCH = 1000  # tasks a request: Django refuses request bodies past its upload limit (2.5 MB by default)


class LabelStudio:
    """One server, one key."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(API_KEY)
        if not key:
            raise UserError(f"-o {self.url}: set {API_KEY} to a Label Studio API key (Account & Settings → "
                            "Access Token) to create the project")
        self._authorization = self._bearer(key) if key.count(".") == 2 else f"Token {key}"

    def create_project(self, title: str, label_config: str) -> int:
        reply = self._call("POST", "/api/projects", {"title": title, "label_config": label_config})
        return int(reply["id"])

    def import_tasks(self, project: int, tasks: list[dict]) -> int:
        """Imports the tasks with their predictions, IMPORT_BATCH a request; returns how many Label Studio took."""
        taken = 0
        for start in range(0, len(tasks), IMPORT_BATCH):
            batch = tasks[start:start + IMPORT_BATCH]
            reply = self._call("POST", f"/api/projects/{project}/import?commit_to_project=true", batch)
            taken += int(reply.get("task_count", len(batch)))
        return taken

    def project_url(self, project: int) -> str:
        return f"{self.url}/projects/{project}/data"

    def _bearer(self, refresh: str) -> str:
        self._authorization = None
        reply = self._call("POST", "/api/token/refresh", {"refresh": refresh})
        return f"Bearer {reply['access']}"

    def _call(self, method: str, path: str, body) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._authorization:
            headers["Authorization"] = self._authorization
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise UserError(_refusal(self.url, path, exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"-o {self.url}: cannot reach Label Studio ({reason}); check the URL and that the "
                            "server is up") from None


def _refusal(url: str, path: str, exc: urllib.error.HTTPError) -> str:
    if exc.code in (401, 403):
        return f"-o {url}: Label Studio refused the API key in {API_KEY} (HTTP {exc.code}); check it"
    detail = exc.read()[:300].decode(errors="replace").replace("\n", " ")
    return f"-o {url}: Label Studio answered HTTP {exc.code} to {path.split('?')[0]}: {detail}"
