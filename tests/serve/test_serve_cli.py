"""`kvc serve` as users start it: a subprocess on 127.0.0.1 that answers, then stops on SIGTERM."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kvc_serve_command(serve_artifact, tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "kvc.cli.main", "serve", str(serve_artifact), "--port", str(port),
           "--max-batch", "2", "--api-key", "k", "--model-name", "m"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "kvc serve did not answer /health in 60 s"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": "m", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        ok = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()


def test_kvc_serve_refuses_bad_options(serve_artifact, tmp_path):
    cmd = [sys.executable, "-m", "kvc.cli.main", "serve", str(serve_artifact), "--replicas", "2"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--replicas and --ray-address need --ray" in out.stderr
