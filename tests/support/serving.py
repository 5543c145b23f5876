"""A real ``itr serve`` in a child process, for the tests and bench/ (loopback only).

``start(db, ...)`` runs ``python -m itrcli serve --db DB --port 0 ...``, reads the URL it
prints on stderr (within a bounded wait), and returns a :class:`Served` to stop it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from support import announce

URL = re.compile(r"itr serve: (http://\S+?)(\?token=\S+)?\s")


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, lines: list[str]) -> None:
        self.proc, self.url, self.lines = proc, url.rstrip("/"), lines

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def get_json(self, path: str, timeout: float = 60):
        """GET ``path`` (``/api/search?q=...``) from the server: its JSON answer, decoded."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and wait for the exit code (killed past ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.stop()


def start(db: str | os.PathLike, *args: str, env: dict | None = None,
          timeout: float = 120) -> Served:
    """Start ``itr serve --db DB --port 0 ARGS`` and wait for its URL.
    Raises:
        RuntimeError: it exited or printed no URL within ``timeout`` seconds.
    """
    cmd = [sys.executable, "-m", "itrcli", "serve", "--db", str(db), "--port", "0", *map(str, args)]
    root = Path(__file__).resolve().parents[2]
    e = {**os.environ, **(env or {})}
    e["PYTHONPATH"] = os.pathsep.join([str(root), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=e)
    url, lines = announce.watch(proc, URL, timeout)
    if url is None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        raise RuntimeError(f"itr serve printed no URL (exit {proc.returncode}): {''.join(lines)[-2000:]}")
    return Served(proc, url, lines)
