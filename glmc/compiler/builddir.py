"""Build directories: a lock, a temp dir beside the output renamed into place atomically, manifest and report.

    with BuildDir(out) as b:      # takes OUT.lock (refuses a concurrent compile), makes .OUT.tmp-PID/
        write files under b.tmp
        b.commit(manifest)        # writes manifest.json + REPORT.md, renames the temp dir to OUT
    # any exception (Ctrl-C included) before commit: the temp dir is removed, OUT is untouched

A previous build at OUT is replaced only at commit time (moved aside, the new one renamed in, the old removed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from glmc.artifact import MANIFEST, REPORT
from glmc.errors import GlmcError


class BuildLocked(GlmcError):
    """Another compile is writing the same build directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """An exclusive lock file (O_EXCL) holding host and pid; a lock left by a dead process on this host is taken over."""

    def __init__(self, path: Path):
        self.path = path
        self.held = False
        self.stale_pid: int | None = None  # the dead process whose lock was taken over

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                except (OSError, json.JSONDecodeError):
                    owner = {}
                if owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) \
                        and not _pid_alive(owner["pid"]):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone (killed with SIGKILL, ...)
                    self.stale_pid = owner["pid"]
                    continue
                raise BuildLocked(f"{self.path}: another glmc compile (pid {owner.get('pid', '?')} on "
                                  f"{owner.get('host', '?')}) is building this directory; wait for it, or "
                                  "delete the lock file if that process is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise BuildLocked(f"{self.path}: could not take the build lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


class BuildDir:
    """A build directory that appears all at once or not at all."""

    def __init__(self, out: str | Path):
        self.out = Path(out).resolve()
        self.lock = Lock(self.out.parent / f"{self.out.name}.lock")
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        self.committed = False

    def __enter__(self) -> "BuildDir":
        if self.out.exists() and not (self.out / MANIFEST).is_file() and (
                not self.out.is_dir() or any(self.out.iterdir())):
            raise GlmcError(f"{self.out}: exists and is not a glmc build directory (no {MANIFEST}); glmc replaces "
                            "only its own builds: choose another output or remove it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            if self.lock.stale_pid is not None:  # what the dead process left half-written
                for kind in ("tmp", "old"):
                    shutil.rmtree(self.out.parent / f".{self.out.name}.{kind}-{self.lock.stale_pid}",
                                  ignore_errors=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self.committed:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self.lock.release()

    def commit(self, manifest: dict, report: str) -> Path:
        """Write manifest.json and the report, then rename the temp dir into place."""
        (self.tmp / REPORT).write_text(report)
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def remove_dead_temps(folder: Path) -> list[str]:
    """Remove `.*.tmp-PID` folders in `folder` whose process no longer runs (a stage cache after a SIGKILL)."""
    removed = []
    for p in folder.glob(".*.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path, memo_path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every file under root (manifest and report excluded): relative path -> size and sha256.

    Files hard-linked from the stage cache are hashed once: `memo_path` (a JSON file in the cache) remembers
    the hash of each (device, inode, size, mtime), so a recompile does not reread gigabytes of unchanged weights."""
    memo: dict[str, str] = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except json.JSONDecodeError:
            memo = {}
    out, used = {}, {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, REPORT):
            st = p.stat()
            key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
            digest = used.get(key) or memo.get(key) or file_sha256(p)
            used[key] = digest
            out[str(p.relative_to(root))] = {"bytes": st.st_size, "sha256": digest}
    if memo_path is not None:
        memo.update(used)
        tmp = memo_path.with_name(f".{memo_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    return out


def place(src: Path, dest: Path) -> None:
    """Put a cached file or folder into the build: hard links where the filesystem allows, else copies."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        for p in sorted(src.rglob("*")):
            if p.is_file():
                place(p, dest / p.relative_to(src))
        return
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
