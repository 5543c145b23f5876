"""bench/avx2only: the AVX2 code paths of an AVX-512 CPU, for figures of an AVX2 machine
(issue 32) where none is at hand.  Needs gcc and CPUID faulting (`cpuid_fault`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "bench" / "avx2only" / "run"


def _cpuid_faulting() -> bool:
    try:
        return "cpuid_fault" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                       reason="CPUID faulting is an x86-64 Linux feature"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build bench/avx2only"),
    pytest.mark.skipif(not _cpuid_faulting(), reason="this CPU (or its hypervisor) has no "
                       "CPUID faulting (no cpuid_fault in /proc/cpuinfo)"),
]

FEATURES = """
try:
    from numpy._core._multiarray_umath import __cpu_features__ as f
except ImportError:
    from numpy.core._multiarray_umath import __cpu_features__ as f
print(f["AVX2"], f["FMA3"], f["AVX512F"], f.get("AVX512BF16", False))
"""


def _run(tmp_path, *args, **kw):
    env = {**os.environ, "HOME": str(tmp_path), "AVX2ONLY_SO": str(tmp_path / "avx2only.so")}
    return subprocess.run([str(RUN), *args], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def test_a_process_sees_avx2_and_no_avx512(tmp_path):
    r = _run(tmp_path, sys.executable, "-c", FEATURES)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "False", "False"]
    r = _run(tmp_path, sys.executable, "-c",  # and so does a child, after execve
             f"import subprocess, sys; subprocess.run([sys.executable, '-c', {FEATURES!r}])")
    assert r.stdout.split() == ["True", "True", "False", "False"], r.stderr


def test_itr_takes_the_fp32_path(tmp_path):
    r = _run(tmp_path, sys.executable, "-c",
             "from itrcli.embed.encoder import cpu_has_native_bf16; print(cpu_has_native_bf16())")
    assert r.stdout.strip() == "False", r.stderr


def test_a_real_crash_still_crashes(tmp_path):
    """The trap handler passes a fault that is not CPUID on, to Python's faulthandler when
    it is on, else to the default action."""
    crash = "import ctypes; ctypes.string_at(0)"
    r = _run(tmp_path, sys.executable, "-c", crash)
    assert r.returncode == -11, (r.returncode, r.stderr)
    r = _run(tmp_path, sys.executable, "-X", "faulthandler", "-c", crash)
    assert r.returncode == -11 and "Segmentation fault" in r.stderr, (r.returncode, r.stderr)
