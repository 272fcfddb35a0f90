"""``serve.proxy = "haproxy"`` end to end: ``raytrade up`` with Serve's HAProxy mode, in a Ray of its own.

Serve reads its HAProxy switch once, when a Ray's processes start, so this
runs ``raytrade up`` as a user would, in a subprocess that starts its own
local Ray (the session's Ray is left alone). Everything listens on and is
called at 127.0.0.1; the run is bounded by ``--duration`` and by the waits
below.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None,
    reason="no haproxy binary on PATH (`make test` installs Debian's where apt can): serve.proxy = 'haproxy' needs it",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listener_name(port: int) -> str | None:
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid).name()
    return None


def test_raytrade_up_serves_decisions_through_haproxy_and_stops_cleanly(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYTRADE_") and k != "RAY_ADDRESS"}
    env.update(
        PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0",
        RAYTRADE_SERVE__PROXY="haproxy", RAYTRADE_SERVE__PORT=str(port),
        RAYTRADE_STORE__URI=str(tmp_path / "store"), RAYTRADE_BROKER__LEDGER_DIR=str(tmp_path / "ledger"),
        RAYTRADE_STATE_DIR=str(tmp_path / "state"), RAYTRADE_RAY__NAMESPACE="raytrade-haproxy-test",
        RAYTRADE_RAY__INCLUDE_DASHBOARD="false", RAYTRADE_RAY__NUM_CPUS="2",
    )
    def start():
        p = subprocess.Popen([sys.executable, "-m", "raytrade", "up", "--duration", "240"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines: list[str] = []
        t = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
        t.start()
        return p, lines, t

    def wait_for(pattern: str, timeout_s: float, fail: bool = True) -> re.Match | None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for line in list(out):
                if m := re.search(pattern, line):
                    return m
            if proc.poll() is not None and not reader.is_alive():
                break
            time.sleep(0.5)
        if not fail:
            return None
        pytest.fail(f"no {pattern!r} in raytrade up's output within {timeout_s:.0f}s:\n" + "".join(out)[-3000:])

    proc, out, reader = start()
    try:
        m = wait_for(r"demo API key\s+(rt-demo-\S+)", 240, fail=False)
        if m is None and "The current node timed out during startup" in "".join(out):
            # Ray's own start-up limit (30 s for the raylet to register, fixed in Ray) can pass on a
            # loaded 2-core machine with the session's Ray beside it: one more try, then it fails.
            proc.wait(timeout=30)
            time.sleep(5)
            proc, out, reader = start()
            m = wait_for(r"demo API key\s+(rt-demo-\S+)", 240, fail=False)
        if m is None:
            pytest.fail("no demo API key in raytrade up's output within 240s:\n" + "".join(out)[-3000:])
        key = m.group(1)
        assert listener_name(port) == "haproxy"  # HAProxy, not Serve's proxy, holds the HTTP port
        headers = {"X-API-Key": key}
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=30) as client:
            deadline = time.time() + 120
            r = client.get(f"{base}/v1/signal/SPY", headers=headers)
            while r.status_code == 503 and time.time() < deadline:  # no live bar yet
                time.sleep(1.0)
                r = client.get(f"{base}/v1/signal/SPY", headers=headers)
            assert r.status_code == 200, r.text
            decision = r.json()
            assert decision["symbol"] == "SPY" and decision["action"] in ("BUY", "SELL", "HOLD")
            assert decision["last_bar"]["seq"] is not None  # decided on live feed data
            # A user's mistake through HAProxy is the app's own 4xx, with what to fix.
            bad = client.post(f"{base}/v1/decisions", headers=headers, json={"symbol": 5})
            assert bad.status_code == 422 and "symbol" in bad.json()["detail"]
            assert client.get(f"{base}/v1/signal/SPY").status_code == 401  # and the key is still required
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, "".join(out)[-3000:]
        reader.join(timeout=10)
        assert "stopped cleanly" in "".join(out)
        assert listener_name(port) is None  # HAProxy went with it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
