"""Run the real engine (``python -m engine.cli run``) as a subprocess for end-to-end tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineProcess:
    def __init__(self, tmp: Path, config_text: str, *, db_url: str | None = None, env: dict | None = None,
                 status_port: int | None = None):
        self.tmp = Path(tmp)
        self.config = self.tmp / "routes.yaml"
        self.config.write_text(textwrap.dedent(config_text))
        self.data_dir = self.tmp / "data"
        self.db_url = db_url
        self.extra_env = env or {}
        self.status_port = status_port
        self.proc: subprocess.Popen | None = None
        self.log_path = self.tmp / "engine.log"
        self.starts = 0

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.pop("MINIPFI_DB_URL", None)
        if self.db_url:
            env["MINIPFI_DB_URL"] = self.db_url
        env["MINIPFI_DATA_DIR"] = str(self.data_dir)
        env.update(self.extra_env)
        return env

    def start(self, wait_ready: bool = True) -> "EngineProcess":
        self.starts += 1
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "run", "--config", str(self.config), "--data-dir", str(self.data_dir)],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"engine exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                code, body = self.http("/ready")
                if code == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"engine not ready after {timeout}s:\n{self.log_tail()}")

    def http(self, path: str, token: str | None = None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.status_port}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def status(self) -> dict:
        code, body = self.http("/status")
        assert code == 200, body
        return body

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, env=self.env,
                           capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"minipfi {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def messages(self) -> list[dict]:
        out = self.cli("messages", "list", "--json", "--limit", "100000", "--data-dir", str(self.data_dir)).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("engine did not stop within the deadline after SIGTERM")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait(predicate, timeout=30.0, what="condition"):
    """Poll ``predicate`` until it returns something true (returned), or fail after ``timeout``."""
    end = time.time() + timeout
    while time.time() < end:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
