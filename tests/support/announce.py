"""Child processes that say on stderr where they listen (`itr serve`, Firefox): their
stderr read in a thread, and a bounded wait for that line."""

from __future__ import annotations

import re
import subprocess
import threading


def watch(proc: subprocess.Popen, pattern: re.Pattern,
          timeout: float) -> tuple[str | None, list[str]]:
    """Read ``proc``'s stderr (a text pipe) in a daemon thread for as long as it is open,
    keeping every line, and wait up to ``timeout`` seconds for the first line that matches
    ``pattern``: (its group 1, or None when the process closed its stderr or the time ran
    out first; the lines, a list that grows while the process runs)."""
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            m = pattern.search(line)
            if m and not found:
                found.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(timeout)
    return (found[0] if found else None), lines
