"""Indexing throughput of `itr index` against a straightforward reference pipeline.

Builds (once, cached under bench/out/) a real-architecture random-weight ViT-B/32 model
directory (cost does not depend on the weight values) and reproducible photo sets of
12 MP (4000x3000) and 2 MP (1632x1224) JPEGs.  For each set it runs, as whole processes:

- `itr index` of 24 and of 96 photos into a library bound to the model, and of 96 into a
  new library;
- the reference: the model's own processor on fully decoded images, fp32, batches of 16.

Net throughput = 72 extra photos / extra seconds between the 24- and the 96-photo run, both
into a copy of a library already bound to the model with its text tower exported, so process
start, imports, model load and warm-up cancel (a new library's first run also exports the
text tower, partly beside the encoding: a cost that does not grow with the photos, reported
as the start-up tax below; the 96 photos into a new library are timed too).  Also reports
peak RSS (of the largest process, and of the whole process tree: the run and its text-tower
export child, sampled; their shared pages count twice there), and the time of a re-run of `itr index` over N unchanged files (walk + change
detection only), and with `--rss N` the peak RSS of one `itr index` run over N distinct
2 MP photos.

The machine's ceiling, measured in the same run from its two parts at the chosen precision:
decode + preprocess alone on ONE core with itr's own code (`read_for_vectors`: draft-mode JPEG
decode, resize, crop, normalise), and the image tower alone on all C cores (batches of 32).
Each image costs 1/decode core-seconds to decode and C/encode to encode, so
ceiling = C / (1/decode + C/encode); the net rate is reported as a share of it.

The start-up tax (`--no-tax` skips it): the same 24 photos into a new library, and into a
library already bound to the model with its text tower exported (holding one other photo);
the medians of `--tax-runs` alternated pairs (default 3).

The image tower alone is also reported as a share of the same process's matrix-multiply
rate (torch, 4096x4096, at the tower's precision), its FLOPs counted by torch (2 per
multiply-add); `--runtime` sets ITR_IMAGE_RUNTIME for every run, `--first-export` also
times a new library's run with the tower cache empty (with `--runtime onnx` it makes the
image tower's one-time export before its encoding; `auto` makes it only for a run of 1,000
photos or more, so not here).
Exported towers go to bench/out/towers (ITR_TOWER_CACHE), apart from the user's.

    python bench/index_throughput.py [--sizes 12mp,2mp] [--unchanged 100000] [--rss 10000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# test support (model factories, drawings) lives beside the tests, not in the wheel
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SIZES = {"12mp": (4000, 3000), "2mp": (1632, 1224)}

REFERENCE = r"""
import sys, torch
from PIL import Image, ImageOps
from transformers import AutoModel, AutoProcessor
model_dir, paths = sys.argv[1], sys.argv[2:]
model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
proc = AutoProcessor.from_pretrained(model_dir)
torch.set_num_threads(%d)
with torch.inference_mode():
    for i in range(0, len(paths), 16):
        imgs = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths[i:i + 16]]
        x = proc(images=imgs, return_tensors="pt")["pixel_values"]
        f = model.get_image_features(pixel_values=x).pooler_output
        f = f / f.norm(dim=-1, keepdim=True)
"""


def _make(job: tuple[Path, int, int, int]) -> None:
    from support import synth

    p, w, h, seed = job
    synth.make_photo(p, w, h, seed=seed)


def photos(kind: str, n: int) -> list[Path]:
    from multiprocessing import Pool

    w, h = SIZES[kind]
    d = OUT / f"photos-{kind}"
    d.mkdir(parents=True, exist_ok=True)
    out = [d / (f"{i:04d}.jpg" if i < 10_000 else f"{i}.jpg") for i in range(n)]
    todo = [(p, w, h, i) for i, p in enumerate(out) if not p.exists()]
    if todo:
        with Pool(os.cpu_count() or 1) as pool:
            pool.map(_make, todo, chunksize=16)
    return out


def model_dir() -> Path:
    from support import synth

    d = OUT / "vit-b32"
    if not (d / "model.safetensors").exists():
        synth.make_vit_b32(d)
    return d


def _children(pid: int) -> list[int]:
    """``pid``'s child processes, from each of its threads' ``children`` file (cheap: a
    scan of every /proc/PID/stat costs milliseconds a sample, stolen from the timed run)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += map(int, f.read().split())
    except (OSError, ValueError):
        pass
    return kids


def _tree_rss(root: int, with_pss: bool = True) -> tuple[int, int]:
    """(RSS, PSS) bytes of ``root`` and all its descendants now (from /proc; 0 elsewhere).
    PSS (``smaps_rollup``) shares each page among the processes that map it: the sum is
    what the tree takes from the machine, which RSS counts twice for shared libraries and
    the memory-mapped tower files.  PSS costs the kernel ~6 ms of CPU a call for a 1 GB
    process (it walks the page tables): ``with_pss=False`` skips it (PSS 0)."""
    total, pss, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            if with_pss:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            pss += int(line.split()[1]) * 1024
                            break
        except (OSError, IndexError, ValueError):
            pass
        todo += _children(pid)
    return total, pss


LAST_TREE_RSS = [0.0]  #: peak RSS of the last run()'s whole process tree, MiB (sampled)
LAST_TREE_PSS = [0.0]  #: peak PSS of the same, MiB (sampled)


def run(cmd: list[str], sample: bool = True) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of its largest process: the child or any descendant).
    ``sample``: the peak of the whole tree's sum is sampled (RSS every 20 ms, PSS every
    100 ms: a PSS sample costs the kernel ~6 ms of CPU, so at 20 ms it took a quarter of a
    core from the timed run) and left in LAST_TREE_RSS / LAST_TREE_PSS; the runs timed for
    the net rate are not sampled at all."""
    import threading

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak, done = [0, 0], threading.Event()

    def sampler_loop() -> None:
        k = 0
        while not done.wait(0.02):
            rss, pss = _tree_rss(proc.pid, with_pss=k % 5 == 0)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            k += 1

    sampler = threading.Thread(target=sampler_loop, daemon=True)
    if sample:
        sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t
    done.set()
    if sample:
        sampler.join()
    LAST_TREE_RSS[0] = peak[0] / 2**20
    LAST_TREE_PSS[0] = peak[1] / 2**20
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed with {proc.returncode}")
    return dt, usage.ru_maxrss / 1024


def itr_index(paths: list[Path], extra: list[str], library: Path | None = None,
              first_on_machine: bool | None = None, sample: bool = True) -> tuple[float, float]:
    """One `itr index` of ``paths`` into a new library (or a copy of ``library``).
    ``first_on_machine`` (default: for a new library): with an empty tower cache, as the
    first library of the model on a machine (the worst case: it exports its towers); else
    the machine's cache is used (an existing library's runs: the image tower's export)."""
    import shutil

    saved = os.environ.get("ITR_TOWER_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        if first_on_machine if first_on_machine is not None else library is None:
            os.environ["ITR_TOWER_CACHE"] = str(Path(tmp) / "towers")
        else:  # the bench's own cache, filled by ensure_export and the runs before
            os.environ["ITR_TOWER_CACHE"] = str(OUT / "towers")
        d = Path(tmp) / "photos"
        d.mkdir()
        for p in paths:
            os.symlink(p, d / p.name)
        lib = Path(tmp) / "lib"
        if library is not None:
            shutil.copytree(library, lib)
        try:
            return run([sys.executable, "-m", "itrcli", "index", str(d), "--db", str(lib),
                        "-m", str(model_dir()), "-q", *extra], sample=sample)
        finally:  # the runs after this one (and the ceiling's tower) use the bench's cache
            os.environ["ITR_TOWER_CACHE"] = saved or str(OUT / "towers")


def primed_library(photo: Path, extra: list[str]) -> Path:
    """A library bound to the model, its text tower exported, holding only ``photo``."""
    lib = OUT / "primed-lib"
    if not (lib / "text" / "settings.json").exists():
        import shutil

        shutil.rmtree(lib, ignore_errors=True)
        d = OUT / "primed-photo"
        d.mkdir(parents=True, exist_ok=True)
        if not (d / photo.name).exists():
            os.symlink(photo, d / photo.name)
        subprocess.run([sys.executable, "-m", "itrcli", "index", str(d), "--db", str(lib),
                        "-m", str(model_dir()), "-q", *extra], check=True)
    return lib


DECODE = r"""
import os, sys, time
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
from itrcli.ingest.images import Preprocess
from itrcli.jobs.indexer import read_for_vectors
from itrcli.store.db import Store
prep = Preprocess.from_config(Store(sys.argv[1]).get_meta("preprocess"))
paths = sys.argv[2:]
for p in paths[:2]:
    read_for_vectors(p, prep, True, frozenset())  # warm-up
t = time.perf_counter()
for p in paths:
    assert read_for_vectors(p, prep, True, frozenset()).pixels is not None
print(len(paths) / (time.perf_counter() - t))
"""

ENCODE = r"""
import sys, time
import numpy as np
import torch
from itrcli.embed.encoder import Encoder
enc = Encoder(sys.argv[1], device="cpu", precision=sys.argv[2], towers="image")
p = enc.prep
x = np.random.default_rng(0).standard_normal(
    (32, 3, p.crop_height or p.height, p.crop_width or p.width)).astype(np.float32)
enc.encode_pixels(x)  # warm-up
t, n = time.perf_counter(), 0
while n < 96 or time.perf_counter() - t < 5:
    enc.encode_pixels(x)
    n += len(x)
rate = n / (time.perf_counter() - t)
# the tower's FLOPs per image (2 per multiply-add), counted by torch on the float32 tower
from torch.utils.flop_counter import FlopCounterMode
tower = enc.float32_image_tower()
with torch.no_grad(), FlopCounterMode(display=False) as fc:
    tower(torch.from_numpy(x[:1]))
# the same process's matrix-multiply rate: torch, 4096 x 4096, at the tower's precision
dt = {"bf16": torch.bfloat16}.get(sys.argv[2], torch.float32)
a, b = (torch.randn(4096, 4096).to(dt) for _ in range(2))
torch.mm(a, b)
t, k = time.perf_counter(), 0
while k < 3 or time.perf_counter() - t < 3:
    torch.mm(a, b)
    k += 1
mm = 2 * 4096 ** 3 * k / (time.perf_counter() - t) / 1e9
print(enc.image_runtime, fc.get_total_flops() / 1e9, mm)
print(rate)
"""


TOWER = {}  #: the last ceiling_parts()'s image tower: runtime, GFLOP per image, matmul GFLOP/s


def ceiling_parts(paths: list[Path], library: Path, precision: str) -> tuple[float, float]:
    """(decode+preprocess img/s on one core, image tower img/s on all cores); the tower's
    runtime, GFLOP per image and the same process's matrix-multiply GFLOP/s in TOWER."""
    def rate(code: str, *args: str) -> tuple[float, list[str]]:
        out = subprocess.run([sys.executable, "-c", code, *args], check=True,
                             capture_output=True, text=True).stdout
        lines = out.strip().splitlines()
        return float(lines[-1]), lines[:-1]

    decode, _ = rate(DECODE, str(library), *map(str, paths))
    encode, extra = rate(ENCODE, str(model_dir()), precision)
    runtime, gflop, mm = extra[-1].split()
    TOWER.update(runtime=runtime, gflop=float(gflop), matmul=float(mm))
    return decode, encode


def ensure_export(photo: Path) -> None:
    """The image tower's export in the tower cache, when this run's encoder would use one
    (so that no timed run makes it)."""
    code = ("import sys; from itrcli.embed import imagetower as t, imageexport as x; "
            "from itrcli.embed.encoder import resolve_precision as r; "
            "p = r(sys.argv[3], 'cpu'); "
            "t.export_due(sys.argv[1], None, 'cpu', p) and "
            "x.export(x.torch_encoder(sys.argv[1], None), [sys.argv[2]])")
    subprocess.run([sys.executable, "-c", code, str(model_dir()), str(photo), PRECISION[0]],
                   check=True)


PRECISION = ["auto"]  #: the --precision the itr runs are given (or auto)


def ceiling(decode: float, encode: float, cores: int) -> float:
    """img/s when decoding (1/decode core-seconds an image) and encoding (cores/encode) share
    ``cores`` cores with nothing idle."""
    return cores / (1 / decode + cores / encode)


def reference(paths: list[Path]) -> tuple[float, float]:
    code = REFERENCE % (os.cpu_count() or 1)
    return run([sys.executable, "-c", code, str(model_dir()), *map(str, paths)])


def net(small: float, large: float, n_small: int, n_large: int) -> float:
    return (n_large - n_small) / (large - small)


def unchanged_rerun(n: int) -> float:
    """Seconds for `itr index` over n unchanged (tiny, already indexed) files."""
    import numpy as np

    from itrcli.library import Library

    d = OUT / f"unchanged-{n}"
    lib_dir = OUT / f"unchanged-lib-{n}"
    if not (lib_dir / "itr.db").exists():
        d.mkdir(parents=True, exist_ok=True)
        lib = Library.open(lib_dir, create=True)
        enc = lib.encoder(str(model_dir()), "cpu", "fp32")
        lib._bind(enc)
        vec = np.ones(enc.dim, dtype=np.float32) / np.sqrt(enc.dim)
        with lib.store.transaction() as c:
            for i in range(n):
                sub = d / f"{i // 1000:03d}"
                sub.mkdir(exist_ok=True)
                p = sub / f"{i:06d}.jpg"
                p.write_bytes(b"")
                st = p.stat()
                lib.store.insert_file(c, str(p), {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                   "hash": f"{i:032x}"}, vec)
        lib.store.set_meta(roots=[str(d)])
        lib.close()
    cmd = [sys.executable, "-m", "itrcli", "index", str(d), "--db", str(lib_dir), "-q"]
    subprocess.run(cmd, check=True)  # brings a new library up to date (graph saved, ef measured)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def _cpu_flags() -> str:
    """The CPU's model and the flags that decide the image tower's speed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), "?")
    flags = next((set(ln.split(":", 1)[1].split()) for ln in text.splitlines()
                  if ln.startswith("flags")), set())
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}; {' '.join(have) or 'no avx2'}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="12mp,2mp")
    ap.add_argument("--small", type=int, default=24)
    ap.add_argument("--large", type=int, default=96)
    ap.add_argument("--unchanged", type=int, default=100_000)
    ap.add_argument("--rss", type=int, default=0, metavar="N",
                    help="also index N distinct 2 MP photos in one run and report its peak RSS")
    ap.add_argument("--itr-args", default="", help="extra itr index options, e.g. '--precision bf16'")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference pipeline")
    ap.add_argument("--no-tax", action="store_true", help="skip the start-up tax")
    ap.add_argument("--tax-runs", type=int, default=3, help="pairs of runs for the start-up tax")
    ap.add_argument("--runtime", default=None, choices=("auto", "torch", "onnx"),
                    help="the image tower's runtime (sets ITR_IMAGE_RUNTIME for every run)")
    ap.add_argument("--first-export", action="store_true",
                    help="also time a new library's run with the tower cache empty and its "
                         "memory (with --runtime onnx it makes the image tower's export before "
                         "encoding)")
    a = ap.parse_args()
    if a.runtime:
        os.environ["ITR_IMAGE_RUNTIME"] = a.runtime
    # the exported towers of these runs, apart from the user's (bench/out/towers)
    os.environ.setdefault("ITR_TOWER_CACHE", str(OUT / "towers"))
    model_dir()
    extra = a.itr_args.split()
    from itrcli.embed.encoder import resolve_precision

    PRECISION[0] = extra[extra.index("--precision") + 1] if "--precision" in extra else "auto"
    precision = resolve_precision(PRECISION[0], "cpu")
    cores = len(os.sched_getaffinity(0))
    flags = _cpu_flags()
    print(f"cpus: {cores} ({flags}), precision: {precision}, image runtime: "
          f"{os.environ.get('ITR_IMAGE_RUNTIME', 'auto')}, model: random-weight ViT-B/32 ({model_dir()})")
    for kind in filter(None, a.sizes.split(",")):
        ps = photos(kind, a.large + 1)
        ps, spare = ps[: a.large], ps[a.large]
        primed = primed_library(spare, extra)
        ensure_export(spare)
        if a.first_export:  # a new library runs with an empty tower cache of its own
            fx, fx_rss = itr_index(ps[: a.small], extra)
            print(f"{kind}: {a.small} photos into a new library with the tower cache empty (its "
                  f"one-time exports made first, once per machine): {fx:.1f}s, peak RSS "
                  f"{fx_rss:.0f} MiB, whole process tree {LAST_TREE_RSS[0]:.0f} MiB RSS, {LAST_TREE_PSS[0]:.0f} MiB PSS")
        # not sampled: the sampler's CPU would come off the net rate
        i_s, _ = itr_index(ps[: a.small], extra, library=primed, sample=False)
        i_l, i_rss = itr_index(ps, extra, library=primed, sample=False)
        itr_net = net(i_s, i_l, a.small, a.large)
        print(f"{kind}: itr index {itr_net:.1f} img/s net ({a.small}: {i_s:.1f}s, {a.large}: {i_l:.1f}s, "
              f"into a library bound to the model; peak RSS {i_rss:.0f} MiB)")
        first, first_rss = itr_index(ps, extra)
        print(f"{kind}: {a.large} photos into a new library, the machine's first of the model "
              f"(its towers exported before the encoding): "
              f"{first:.1f}s, end to end {a.large / first:.1f} img/s, peak RSS {first_rss:.0f} MiB, "
              f"whole process tree {LAST_TREE_RSS[0]:.0f} MiB RSS, {LAST_TREE_PSS[0]:.0f} MiB PSS")
        dec, enc = ceiling_parts(ps[: a.small], primed, precision)
        top = ceiling(dec, enc, cores)
        print(f"{kind}: ceiling {top:.1f} img/s = {cores} / (1/{dec:.1f} + {cores}/{enc:.1f}) "
              f"(decode+preprocess {dec:.1f} img/s on one core, image tower {enc:.1f} img/s "
              f"on {cores} cores, {precision}); net / ceiling {itr_net / top:.0%}")
        t = TOWER
        print(f"{kind}: image tower ({t['runtime']}, {precision}) {enc:.1f} img/s x {t['gflop']:.2f} "
              f"GFLOP = {enc * t['gflop']:.0f} GFLOP/s, {enc * t['gflop'] / t['matmul']:.2f} of the "
              f"same run's matrix multiply ({t['matmul']:.0f} GFLOP/s, torch 4096x4096 "
              f"{precision}, {cores} threads); net {itr_net:.1f} img/s = "
              f"{itr_net * t['gflop'] / t['matmul']:.2f} of it")
        if not a.no_tax:
            # alternated pairs, medians: one pair of runs on a shared machine can be off by 2 s
            # three runs a round: a new library as the machine's first of the model (it
            # exports the towers, once per machine), a new library of a model the machine
            # has exported before (the tower cache), a library bound to the model
            rounds = []
            for _ in range(a.tax_runs):
                row = []
                for first_on_machine in (True, False):
                    t, largest = itr_index(ps[: a.small], extra, first_on_machine=first_on_machine)
                    row += [t, largest, LAST_TREE_RSS[0], LAST_TREE_PSS[0]]
                inc, inc_rss = itr_index(ps[: a.small], extra, library=primed)
                rounds.append(row + [inc, inc_rss, LAST_TREE_PSS[0]])
            med = [statistics.median(r[i] for r in rounds) for i in range(11)]
            top = [max(r[i] for r in rounds) for i in range(11)]
            inc = med[8]
            for label, at in (("the machine's first library of the model (exports its towers)", 0),
                              ("a new library, the model's towers in the machine's cache", 4)):
                print(f"{kind}: start-up tax {med[at] - inc:+.1f}s, {label}: {a.small} photos "
                      f"{med[at]:.1f}s, largest process {top[at + 1]:.0f} MiB, whole tree "
                      f"{top[at + 2]:.0f} MiB RSS / {top[at + 3]:.0f} MiB PSS (medians of "
                      f"{a.tax_runs}, peaks the highest)")
            print(f"{kind}: into a library with the model bound and its towers exported: "
                  f"{inc:.1f}s, largest process {top[9]:.0f} MiB, tree {top[10]:.0f} MiB PSS")
        if not a.no_reference:
            r_s, _ = reference(ps[: a.small])
            r_l, r_rss = reference(ps)
            ref_net = net(r_s, r_l, a.small, a.large)
            print(f"{kind}: reference {ref_net:.1f} img/s net ({a.small}: {r_s:.1f}s, {a.large}: {r_l:.1f}s, "
                  f"peak RSS {r_rss:.0f} MiB)")
            print(f"{kind}: ratio itr / reference: {itr_net / ref_net:.2f}x")
    if a.rss:
        ps = photos("2mp", a.rss)
        dt, rss = itr_index(ps, extra)
        print(f"itr index of {a.rss} distinct 2 MP photos: {dt:.0f}s end to end "
              f"({a.rss / dt:.1f} img/s), peak RSS {rss:.0f} MiB, whole tree {LAST_TREE_RSS[0]:.0f} MiB RSS, {LAST_TREE_PSS[0]:.0f} MiB PSS")
    if a.unchanged:
        print(f"re-run over {a.unchanged} unchanged files: {unchanged_rerun(a.unchanged):.2f}s")


if __name__ == "__main__":
    main()
