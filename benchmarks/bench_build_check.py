"""What checking a build's files on open costs (docs/compiler.md, "Tamper-evident builds"), and copies vs links.

    python benchmarks/bench_build_check.py BUILD [BUILD ...]

For each build: opening it (glmc.artifact.open_build) with the digest memo fresh (the usual case: stats only),
with every file rehashed (the memo gone: a copied or touched build, or `glmc inspect --check-files`), and with
checking off (GLMC_TRUST_BUILD_FILES=1); glmc.load of the same build (ONNX Runtime) with checking on and off, so
the check's share of a load shows. Then the cost of placing the build's largest file as a copy (what the compiler
does now) against a hard link (what it did). Page cache warm (each file read once before timing).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from glmc.artifact import TRUST_ENV, VERIFIED, file_sha256, open_build
from glmc.compiler.builddir import copy_file


def timed(fn, repeats: int = 3, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(build: Path) -> None:
    import glmc
    files = [p for p in build.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    for p in files:
        file_sha256(p)  # warm the page cache
    memo = build / VERIFIED
    open_build(build)
    fresh = timed(lambda: open_build(build), 5)
    rehash = timed(lambda: open_build(build), 3, before=lambda: memo.unlink(missing_ok=True))
    os.environ[TRUST_ENV] = "1"
    off = timed(lambda: open_build(build), 5)
    load_off = timed(lambda: glmc.load(build, backend="onnxruntime"), 3)
    del os.environ[TRUST_ENV]
    load_on = timed(lambda: glmc.load(build, backend="onnxruntime"), 3)
    load_rehash = timed(lambda: glmc.load(build, backend="onnxruntime"), 3,
                        before=lambda: memo.unlink(missing_ok=True))
    print(f"{build}: {len(files)} files, {size / 2**20:.1f} MiB; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    print(f"  open_build  memo fresh {1e3 * fresh:8.1f} ms | all rehashed {1e3 * rehash:8.1f} ms "
          f"({size / 2**20 / rehash:.0f} MiB/s) | checking off {1e3 * off:8.1f} ms")
    print(f"  glmc.load   memo fresh {1e3 * load_on:8.1f} ms | all rehashed {1e3 * load_rehash:8.1f} ms | "
          f"checking off {1e3 * load_off:8.1f} ms")
    print(f"  check's share of glmc.load: memo fresh {(fresh - off) / load_on:.1%}, all rehashed "
          f"{(rehash - off) / load_rehash:.1%}")
    big = max(files, key=lambda p: p.stat().st_size)
    with tempfile.TemporaryDirectory(dir=build.parent) as tmp:
        n = [0]

        def dest() -> Path:
            n[0] += 1
            return Path(tmp) / f"f{n[0]}"
        link = timed(lambda: os.link(big, dest()), 3)
        how = copy_file(big, dest())
        copy = timed(lambda: copy_file(big, dest()), 3)
    print(f"  placing {big.relative_to(build)} ({big.stat().st_size / 2**20:.1f} MiB): hard link "
          f"{1e3 * link:.2f} ms, copy ({how}) {1e3 * copy:.1f} ms")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        bench(Path(arg))
