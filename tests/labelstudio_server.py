"""A real Label Studio server for the tests: `label-studio start` from .venv-labelstudio (tests/tools/
install_labelstudio.sh) on 127.0.0.1 with its own data folder, a user and an API token made non-interactively,
serving local files from ``root``; stopped by its process (group) id."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

VENV = Path(__file__).resolve().parents[1] / ".venv-labelstudio"
TEMPLATE = VENV / "template" / "label_studio.sqlite3"  # migrated by the install script: no 30 s migration here
START_TIMEOUT_S = 120


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    token: str  # the user's (legacy) API token
    root: Path  # LOCAL_FILES_DOCUMENT_ROOT: images under its subfolders are served
    log: Path

    def client(self):
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.token)


def installed() -> bool:
    return (VENV / "bin" / "label-studio").exists() and TEMPLATE.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data: Path, root: Path) -> Server:
    """Start the server on a free port and wait until it answers with the token; seconds logged."""
    began = time.monotonic()
    data.mkdir(parents=True, exist_ok=True)
    shutil.copy(TEMPLATE, data / "label_studio.sqlite3")
    port, token = _free_port(), secrets.token_hex(20)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "LOCAL_FILES_"))}
    env.update(
        LABEL_STUDIO_USERNAME="labeller@example.com",
        LABEL_STUDIO_PASSWORD=secrets.token_hex(12),
        LABEL_STUDIO_USER_TOKEN=token,
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
        LOCAL_FILES_SERVING_ENABLED="true",
        LOCAL_FILES_DOCUMENT_ROOT=str(root),
        LATEST_VERSION_CHECK="false",  # no request to PyPI at start
        COLLECT_ANALYTICS="false",
    )
    log = data / "server.log"
    process = subprocess.Popen(
        [str(VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1"]
        + ["--port", str(port), "--data-dir", str(data)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(process, f"http://127.0.0.1:{port}", token, root, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            answer = httpx.get(f"{server.url}/api/current-user/whoami", headers={"Authorization": f"Token {token}"})
            if answer.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop(server)
            raise RuntimeError(f"Label Studio did not start; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    logger.info("Label Studio up at %s in %.1f s", server.url, time.monotonic() - began)
    return server


def stop(server: Server) -> None:
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
