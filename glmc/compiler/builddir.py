"""Build directories: a lock, a temp dir beside the output renamed into place atomically, manifest and report.

    with BuildDir(out) as b:      # takes OUT.lock (refuses a concurrent compile), makes .OUT.tmp-PID/
        write files under b.tmp
        b.commit(manifest)        # writes manifest.json + REPORT.md, renames the temp dir to OUT
    # any exception (Ctrl-C included) before commit: the temp dir is removed, OUT is untouched

A previous build at OUT is replaced only at commit time (moved aside, the new one renamed in, the old removed).

The lock's content (host, pid) is written to a temp file and hard-linked into place, so a lock file is never empty
(a full disk fails the compile naming the lock, and leaves nothing); an empty or unreadable lock (an older glmc,
a crash) is taken over as stale, saying so. Build files are copies of the stage cache's (reflinks where the
filesystem offers them), never hard links: editing a build cannot change the cache.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from glmc.artifact import MANIFEST, REPORT, VERIFIED, file_sha256, write_verified
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


def _os_error(path: Path, e: OSError, doing: str) -> GlmcError:
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    return GlmcError(f"{path}: cannot {doing} ({why})")


class Lock:
    """An exclusive lock file holding host and pid, created whole (written to a temp file, then hard-linked into
    place: O_EXCL semantics, never empty). A lock of a dead process on this host, or an empty or unparseable one,
    is taken over."""

    def __init__(self, path: Path):
        self.path = path
        self.held = False
        self.stale_pid: int | None = None  # the dead process whose lock was taken over

    def _create(self, me: dict) -> bool:
        """Create the lock with `me` in it; False when a lock exists."""
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            try:
                with open(tmp, "w") as f:
                    json.dump(me, f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise _os_error(self.path, e, "write the build lock") from None
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: exclusive create, content written after
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(me, f)
                except OSError as e:
                    self.path.unlink(missing_ok=True)
                    raise _os_error(self.path, e, "write the build lock") from None
                return True
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            if self._create(me):
                self.held = True
                return
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                continue  # released meanwhile
            except OSError:
                text = None
            try:
                owner = json.loads(text) if text is not None else None
            except json.JSONDecodeError:
                owner = None
            if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
                # no glmc of this version leaves such a lock: a crash or a full disk while an older one wrote it
                what = "empty" if text is not None and not text.strip() else "unreadable"
                print(f"glmc: {self.path}: taking over an {what} lock file (left by a compile that crashed or ran "
                      "out of disk space)", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            if owner.get("host") == me["host"] and not _pid_alive(owner["pid"]):
                self.path.unlink(missing_ok=True)  # stale: its process is gone (killed with SIGKILL, ...)
                self.stale_pid = owner["pid"]
                continue
            raise BuildLocked(f"{self.path}: another glmc compile (pid {owner.get('pid', '?')} on "
                              f"{owner.get('host', '?')}) is building this directory; wait for it, or "
                              "delete the lock file if that process is gone")
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

    def __enter__(self) -> BuildDir:
        if self.out.exists() and not (self.out / MANIFEST).is_file() and (
                not self.out.is_dir() or any(self.out.iterdir())):
            raise GlmcError(f"{self.out}: exists and is not a glmc build directory (no {MANIFEST}); glmc replaces "
                            "only its own builds: choose another output or remove it")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            up = next((a for a in self.out.parents if a.exists()), None)
            if up is not None and not up.is_dir():
                raise GlmcError(f"{up}: is a file, so the output {self.out} cannot be created under it; choose "
                                "another output") from None
            raise _os_error(self.out.parent, e, "create the output folder") from None
        if not os.access(self.out.parent, os.W_OK | os.X_OK):
            raise GlmcError(f"{self.out.parent}: the output folder is not writable; choose another output")
        self.lock.acquire()
        _COPIED.clear()
        _PLACED.clear()
        try:
            if self.lock.stale_pid is not None:  # what the dead process left half-written
                for kind in ("tmp", "old"):
                    shutil.rmtree(self.out.parent / f".{self.out.name}.{kind}-{self.lock.stale_pid}",
                                  ignore_errors=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            try:
                self.tmp.mkdir()
            except OSError as e:
                raise _os_error(self.tmp, e, "create the build's temp folder") from None
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
        """Write manifest.json and the report (and, for a manifest with a file table, the digest memo that lets
        opening the build skip rehashing: artifact.VERIFIED), then rename the temp dir into place."""
        try:
            (self.tmp / REPORT).write_text(report)
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        except OSError as e:
            raise _os_error(self.tmp / MANIFEST, e, "write the build manifest") from None
        if isinstance(manifest.get("files"), dict):
            write_verified(self.tmp, {n: f["sha256"] for n, f in manifest["files"].items()})
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


# dest (absolute) -> (stamp of the cached source, stamp of the copy) for files `place` copied: file_table takes
# a copy's digest from the source's memo entry while the copy is unchanged, so a recompile does not rehash them
_PLACED: dict[str, tuple[str, str]] = {}
# (device, inode) of a cached file -> its copy in the build being assembled (BuildDir.__enter__ clears it)
_COPIED: dict[tuple[int, int], Path] = {}


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def file_table(root: Path, memo_path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every file under root (manifest, report and digest memo excluded): relative path -> size and sha256.

    `memo_path` (a JSON file in the cache) remembers the hash of each cached file by (device, inode, size, mtime);
    a file `place` copied from the cache takes its source's hash while it is unchanged, so a recompile does not
    reread gigabytes of unchanged weights."""
    memo: dict[str, str] = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
        memo = memo if isinstance(memo, dict) else {}
    out: dict[str, dict[str, Any]] = {}
    used: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, REPORT, VERIFIED):
            st = p.stat()
            key = _key(st)
            src_key, placed_key = _PLACED.pop(str(p.absolute()), ("", ""))
            src_key = src_key if placed_key == key else ""
            digest = used.get(key) or memo.get(key) or (src_key and memo.get(src_key)) or file_sha256(p)
            used[key] = digest
            if src_key:
                used[src_key] = digest
            out[str(p.relative_to(root))] = {"bytes": st.st_size, "sha256": digest}
    if memo_path is not None:
        memo.update(used)
        tmp = memo_path.with_name(f".{memo_path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:  # only a memo: the next compile rehashes
            tmp.unlink(missing_ok=True)
    return out


FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def copy_file(src: Path, dest: Path) -> str:
    """A new file at dest with src's bytes and times: a reflink (btrfs, XFS: shared extents, copy-on-write), else
    an in-kernel copy (copy_file_range), else a plain copy. Returns how it copied."""
    how = "reflink"
    with open(src, "rb") as fi, open(dest, "xb") as fo:  # x: never writes through an existing file or link
        try:
            fcntl.ioctl(fo.fileno(), FICLONE, fi.fileno())
        except OSError:
            how = "copy_file_range"
            size = os.fstat(fi.fileno()).st_size
            try:
                done = 0
                while done < size:
                    n = os.copy_file_range(fi.fileno(), fo.fileno(), size - done)
                    if n == 0:
                        break
                    done += n
                if done != size:
                    raise OSError(errno.EIO, "short copy")
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                    raise
                how = "copy"
                fi.seek(0)
                fo.seek(0)
                fo.truncate()
                shutil.copyfileobj(fi, fo, 1 << 22)
    shutil.copystat(src, dest)
    return how


def place(src: Path, dest: Path) -> None:
    """Put a cached file or folder into the build as copies (copy_file: reflinks where the filesystem allows):
    never hard links to the cache, so editing a build cannot change the cache or other builds. A cached file
    placed twice in one build (the external-data file that several lowerings share) is copied once and
    hard-linked within the build."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        for p in sorted(src.rglob("*")):
            if p.is_file():
                place(p, dest / p.relative_to(src))
        return
    st = src.stat()
    first = _COPIED.get((st.st_dev, st.st_ino))
    try:
        if first is not None and first.is_file():  # one cached file placed twice (an external-data file several
            os.link(first, dest)                    # lowerings share): one copy in the build, linked within it
        else:
            copy_file(src, dest)
            _COPIED[(st.st_dev, st.st_ino)] = dest
    except OSError as e:  # a full disk, above all: name the file (BuildDir removes the half-made build)
        raise _os_error(dest, e, f"write the build file ({st.st_size:,} bytes)") from None
    _PLACED[str(dest.absolute())] = (_key(st), _key(dest.stat()))
