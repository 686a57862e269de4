"""Nothing bad gets in (issue 17): tamper-evident builds, build files independent of the stage cache, locks a full
disk cannot wedge, safe YAML, a chat that keeps going, and one error path. Real files throughout: flipped bytes, a
damaged cache, a real ENOSPC on a small tmpfs (skipped where mounting is not permitted)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import glmc
from glmc.api import ArgumentError, MessageTooLong
from glmc.artifact import MANIFEST, TRUST_ENV, VERIFIED, check_files, file_sha256
from glmc.cli import main
from glmc.compiler import schema
from glmc.compiler.builddir import BuildDir, Lock
from glmc.errors import ConfigError, GlmcError

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "compile_configs" / "glmc-tiny-int8.yaml"


def no_leftovers(*folders: Path) -> None:
    """No temp folders or files, no lock files, no moved-aside old builds."""
    left = [p for f in folders if f.exists() for p in f.rglob("*")
            if ".tmp-" in p.name or p.name.endswith(".lock") or ".old-" in p.name]
    assert left == [], left


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> dict:
    """The shipped model compiled with compile_configs/glmc-tiny-int8.yaml (onnxruntime lowering only, to keep
    the test quick; limits: batch 2, prompt 64, sequence 256)."""
    root = tmp_path_factory.mktemp("shipped")
    sets = [f"output={root / 'build'}", f"cache_dir={root / 'cache'}", "targets=[onnxruntime]"]
    assert main(["compile", str(CONFIG)] + [a for s in sets for a in ("--set", s)]) == 0
    return {"root": root, "build": root / "build", "cache": root / "cache", "sets": sets}


@pytest.fixture
def build(shipped, tmp_path) -> Path:
    """A private copy of the shipped build (cp -a: new inodes, so its digest memo no longer matches)."""
    dest = tmp_path / "b"
    shutil.copytree(shipped["build"], dest)
    return dest


def flip_byte(path: Path, keep_times: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0x01]))
    if keep_times:  # what a careful tamperer does: size and mtime unchanged (ctime cannot be set back)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---------------------------------------------------------------------------------------------- tamper-evident builds

def test_a_fresh_build_opens_without_rehashing_and_a_copy_rehashes_once(shipped, build):
    m = json.loads((shipped["build"] / MANIFEST).read_text())
    bad, done = check_files(shipped["build"], m)
    assert bad == [] and done["hashed"] == 0 and done["files"] == len(m["files"]) > 5  # the compiler's memo holds
    bad, done = check_files(build, m)  # a copy: new inodes, every file rehashed once ...
    assert bad == [] and done["hashed"] == len(m["files"])
    assert done["hashed_bytes"] == sum(f["bytes"] for f in m["files"].values())
    assert check_files(build, m)[1]["hashed"] == 0  # ... and the memo is rewritten
    os.utime(build / "verify.json")  # touched: that one file is rehashed
    assert check_files(build, m)[1]["hashed"] == 1
    assert check_files(build, m, rehash=True)[1]["hashed"] == len(m["files"])  # inspect --check-files


def test_a_read_only_build_keeps_its_digest_memo_in_the_user_cache(shipped, tmp_path, monkeypatch):
    """A build on a read-only filesystem (an install in /opt, a read-only mount): the memo goes to
    $XDG_CACHE_HOME/glmc/verified/, so only the first open rehashes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with small_tmpfs(tmp_path / "ro", "64m") as ro:
        shutil.copytree(shipped["build"], ro / "b", ignore=shutil.ignore_patterns(VERIFIED))
        r = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only here ({r.stderr.decode().strip()})")
        m = json.loads((ro / "b" / MANIFEST).read_text())
        assert check_files(ro / "b", m)[1]["hashed"] == len(m["files"])
        assert check_files(ro / "b", m)[1]["hashed"] == 0
        assert glmc.load(ro / "b").backend.name == "onnxruntime"
        memos = list((tmp_path / "xdg" / "glmc" / "verified").iterdir())
        assert len(memos) == 1 and not (ro / "b" / VERIFIED).exists()
    no_leftovers(tmp_path)


@pytest.mark.parametrize("keep_times", [False, True])
def test_a_flipped_byte_is_refused_by_load_run_and_inspect(build, capsys, monkeypatch, keep_times):
    model_file = max((p for p in build.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    name = str(model_file.relative_to(build))
    glmc.load(build)  # opens (and leaves the memo fresh)
    flip_byte(model_file, keep_times)
    with pytest.raises(GlmcError, match=f"{model_file}: its sha256 differs from the manifest's"):
        glmc.load(build)
    assert main(["run", str(build), "Hello", "--max-new-tokens", "4"]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"glmc run: error: {model_file}: its sha256 differs") and TRUST_ENV in err
    assert main(["chat", str(build)]) == 2 and str(model_file) in capsys.readouterr().err
    assert main(["inspect", str(build)]) == 1
    out = capsys.readouterr().out
    assert "verified   NO: 1 file(s) differ from the manifest" in out and name in out and "passed" not in out
    # the expert's escape hatch, named: the build opens (and answers whatever the damaged file makes it answer)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert glmc.load(build).backend.name == "onnxruntime"
    monkeypatch.delenv(TRUST_ENV)
    flip_byte(model_file)  # flipped back: the same bytes as built, accepted again
    assert glmc.load(build).backend.name == "onnxruntime"
    no_leftovers(build.parent)


def test_missing_and_resized_files_and_a_damaged_manifest_are_named(build, capsys):
    (build / "verify.json").unlink()
    with pytest.raises(GlmcError, match=r"verify\.json: missing"):
        glmc.load(build)
    tok = build / "model" / "tokenizer.model"
    with open(tok, "ab") as f:
        f.write(b"x")
    bad, _ = check_files(build, json.loads((build / MANIFEST).read_text()))
    assert sorted(b.split(":")[0] for b in bad) == ["model/tokenizer.model", "verify.json"]
    n = tok.stat().st_size
    assert bad[0] == f"model/tokenizer.model: {n:,} bytes, the manifest says {n - 1:,}"
    manifest = build / MANIFEST
    manifest.write_text("")  # emptied
    for cmd in (["run", str(build), "hi"], ["inspect", str(build)], ["bench", str(build)]):
        assert main(cmd) == 2
        assert one_line(capsys.readouterr().err).endswith(f"{manifest}: the build manifest is empty (damaged); "
                                                          "recompile the build")
    manifest.write_text("{}")
    assert main(["run", str(build), "hi"]) == 2
    assert f"{manifest}: no file table ('files' is missing or empty)" in one_line(capsys.readouterr().err)
    manifest.write_bytes(b"\xff\xfe{")
    with pytest.raises(GlmcError, match=f"{manifest}: the build manifest is not UTF-8"):
        glmc.load(build)


# ---------------------------------------------------------------------------------------------- copies, not links

def test_build_files_are_copies_so_editing_a_build_leaves_the_cache_alone(shipped, tmp_path):
    build, cache = shipped["build"], shipped["cache"]
    cached = {p.stat().st_ino for p in cache.rglob("*") if p.is_file()}
    files = [p for p in build.rglob("*") if p.is_file()]
    inodes = [p.stat().st_ino for p in files]
    assert not set(inodes) & cached  # no inode shared with the cache (links only within the build, if any)
    assert all(p.stat().st_nlink == inodes.count(p.stat().st_ino) for p in files)
    # a user edits the build in place; a new build from the same cache is still the one verified
    out = tmp_path / "again"
    victim = build / "onnx" / "onnxruntime" / "model.json"
    before = file_sha256(victim)
    victim.write_text(victim.read_text().replace("onnxruntime", "ONNXRUNTIME"))  # same size
    sets = [s for s in shipped["sets"] if not s.startswith("output=")] + [f"output={out}"]
    assert main(["compile", str(CONFIG)] + [a for s in sets for a in ("--set", s)]) == 0
    assert file_sha256(out / "onnx" / "onnxruntime" / "model.json") == before
    assert glmc.load(out).generate("Hello", max_new_tokens=4) is not None
    with pytest.raises(GlmcError, match=r"model\.json: its sha256 differs"):
        glmc.load(build)
    victim.write_text((out / "onnx" / "onnxruntime" / "model.json").read_text())  # (restored for later tests)
    glmc.load(build)
    no_leftovers(shipped["root"], tmp_path)


def test_a_damaged_stage_cache_entry_is_rebuilt_not_trusted(shipped, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # (rich folds long paths at the terminal width)
    stage_json = next(shipped["cache"].glob("lower-onnxruntime-*/stage.json"))
    stage_json.write_text('{"stage": "lower:onnxruntime", "inf')  # cut short
    out = tmp_path / "b"
    sets = [s for s in shipped["sets"] if not s.startswith("output=")] + [f"output={out}"]
    assert main(["compile", str(CONFIG)] + [a for s in sets for a in ("--set", s)]) == 0
    err = capsys.readouterr().err
    assert f"{stage_json} is damaged: running the stage again" in " ".join(err.split())
    assert json.loads(stage_json.read_text())["stage"] == "lower:onnxruntime"
    m = json.loads((out / MANIFEST).read_text())
    assert {s["name"]: s["status"] for s in m["stages"]}["lower:onnxruntime"] == "ran"
    no_leftovers(shipped["root"], tmp_path)


# ---------------------------------------------------------------------------------------------- locks

def test_an_empty_or_garbled_lock_is_taken_over_saying_so(tmp_path, capsys):
    out = tmp_path / "b"
    for content in ("", "{\"pid\": "):
        (tmp_path / "b.lock").write_text(content)
        with BuildDir(out) as b:
            b.commit({"format": "test"}, "")
        err = capsys.readouterr().err
        what = "empty" if not content else "unreadable"
        assert f"b.lock: taking over an {what} lock file (left by a compile that crashed" in err
        no_leftovers(tmp_path)
    # a live lock is still a lock
    with BuildDir(out), pytest.raises(GlmcError, match="another glmc compile"):
        BuildDir(out).__enter__()
    no_leftovers(tmp_path)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "256k"):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here for a real ENOSPC ({r.stderr.decode().strip() or r.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Fill the filesystem: the next write of anything fails with ENOSPC."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    return filler


def test_a_full_disk_fails_the_lock_cleanly_and_does_not_wedge_later_compiles(tmp_path, capsys):
    with small_tmpfs(tmp_path / "disk") as disk:
        filler = fill(disk)
        with pytest.raises(OSError) as probe:
            (disk / "probe").write_text("x")
        assert probe.value.errno == errno.ENOSPC
        (disk / "probe").unlink(missing_ok=True)
        out = disk / "b"
        with pytest.raises(GlmcError, match=r"b\.lock: cannot write the build lock \(the disk is full\)"):
            BuildDir(out).__enter__()
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no lock, no temp file left
        filler.unlink()
        with BuildDir(out) as b:  # space again: the next compile is not refused
            (b.tmp / "x").write_text("ok")
            b.commit({"format": "test"}, "")
        assert (out / "x").read_text() == "ok"
        assert "another" not in capsys.readouterr().err
        no_leftovers(disk)


def test_a_full_disk_during_a_compile_is_one_line_and_leaves_nothing(shipped, tmp_path, capsys):
    with small_tmpfs(tmp_path / "disk", "1m") as disk:  # the cache is elsewhere; the build does not fit
        out = disk / "b"
        sets = [s for s in shipped["sets"] if not s.startswith("output=")] + [f"output={out}"]
        assert main(["compile", str(CONFIG)] + [a for s in sets for a in ("--set", s)]) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err
        assert re.fullmatch(rf"glmc compile: error: {re.escape(str(disk))}/\.b\.tmp-\d+/\S+: cannot write the build "
                            r"file \([\d,]+ bytes\) \(the disk is full\)", last), last
        assert list(disk.iterdir()) == []  # no half build, no lock
    no_leftovers(shipped["root"])


def test_the_lock_never_holds_partial_content(tmp_path):
    lock = Lock(tmp_path / "x.lock")
    lock.acquire()
    assert json.loads((tmp_path / "x.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- YAML

BOMB = "".join(f"{c}: &{c} [" + ",".join([f"*{p}" if p else '"lol"'] * 9) + "]\n"
               for p, c in zip([None, *"abcdefgh"], "abcdefghi", strict=True))


@pytest.mark.parametrize(("text", "match"), [
    (BOMB, r"bomb\.yaml:\d+: the YAML under '[a-i]' expands to more than 10,000 values through aliases"),
    ("a: &a [*a]\n", r"bomb\.yaml:1: YAML nested more than 32 levels deep \(or an alias that contains itself\)"),
    ("model:\n  name: !!python/object/apply:os.system ['echo pwned']\n",
     r"bomb\.yaml:2: YAML tag '!!python/object/apply:os.system' refused: compile configs hold plain values "
     r"\(no !tags\) at 'model\.name'"),
    ("model: !custom {name: x}\n", r"bomb\.yaml:1: YAML tag '!custom' refused"),
    ("limits:\n  max_batch: !!binary AAAA\n", r"bomb\.yaml:2: YAML tag '!!binary' refused"),
    (b"model:\n  name: caf\xe9\n", r"bomb\.yaml:2: not UTF-8 text \(byte 0xe9 at offset 18\); save the config as "
                                   r"UTF-8"),
    ("limits:\n  max_batch: " + "9" * 5000 + "\n", r"bomb\.yaml:2: limits\.max_batch: cannot read"),
])
def test_unsafe_yaml_fails_fast_naming_file_and_line(tmp_path, capsys, text, match):
    path = tmp_path / "bomb.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        schema.load(path)
    assert time.perf_counter() - t0 < 2.0
    assert main(["compile", str(path)]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"glmc compile: error: {path}")
    no_leftovers(tmp_path)


@pytest.mark.parametrize("value", ["!!python/name:os.system", "!foo bar", "[*a]"])
def test_set_values_are_safe_yaml(tmp_path, capsys, value):
    option = f"model.name={value}"
    if value.startswith("!"):
        with pytest.raises(ConfigError, match=f"--set {option}: YAML tag '.+' refused"):
            schema.load(CONFIG, [option], check_files=False)
        assert main(["compile", str(CONFIG), "--set", option, "--set", f"output={tmp_path / 'o'}"]) == 2
        assert one_line(capsys.readouterr().err).startswith(f"glmc compile: error: --set {option}: YAML tag")
    else:  # not YAML on its own: kept as the text it is
        assert schema.parse_set(option) == ("model.name", value)
    assert schema.parse_set("limits.max_batch=4") == ("limits.max_batch", 4)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- one error path

def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "build"  # root ignores chmod; a path under a file cannot be created by anyone
    assert main(["compile", str(CONFIG), "--set", f"output={out}", "--set", f"cache_dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"glmc compile: error: {blocker}: is a file, so the output {out} cannot be created under it; choose another "
        "output")
    if os.geteuid() != 0:  # a read-only folder stops only non-root users
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert main(["compile", str(CONFIG), "--set", f"output={ro / 'b'}"]) == 2
        assert capsys.readouterr().err.strip().endswith(f"{ro}: the output folder is not writable; choose another "
                                                        "output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_debug_adds_the_traceback(tmp_path, capsys):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"\xff")
    assert main(["compile", str(path)]) == 2
    one_line(capsys.readouterr().err)
    assert main(["--debug", "compile", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith(f"{path}:1: not UTF-8 text (byte 0xff at offset 0); save "
                                                       "the config as UTF-8")
    assert main(["compile", str(path), "--debug"]) == 2 and "Traceback" in capsys.readouterr().err


def test_api_arguments_are_checked_and_named(shipped):
    with pytest.raises(TypeError, match=r"glmc\.load: path=123 must be str or Path, not int"):
        glmc.load(123)
    with pytest.raises(GlmcError, match=r"glmc\.load: max_length='5' must be int"):
        glmc.load(shipped["build"], max_length="5")
    model = glmc.load(shipped["build"])
    with pytest.raises(GlmcError, match=r"sampling: max_new_tokens='5' must be an integer, not str"):
        model.generate("Hello", max_new_tokens="5")
    with pytest.raises(GlmcError, match=r"sampling: temperature=1e-09 is below 0\.001"):
        model.generate("Hello", temperature=1e-9)
    with pytest.raises(GlmcError, match=r"sampling: top_p=nan must be finite"):
        model.generate("Hello", top_p=float("nan"))
    with pytest.raises(ArgumentError, match=r"prompt\[1\]: token id -3 is outside the vocabulary \(0\.\.\d+\)"):
        model.generate([5, -3, 7])
    with pytest.raises(ArgumentError, match=r"prompt\[0\]: token id \d+ is outside the vocabulary"):
        model.generate([model.vocab_size])
    with pytest.raises(ArgumentError, match=r"prompt\[0\]: token ids are integers, not str"):
        model.generate(["5"])
    with pytest.raises(ArgumentError, match=r"messages\[0\]: expected a \{'role': str, 'content': str\} dict"):
        model.chat([{"role": "user", "content": 5}])
    assert model.generate([5, 6, 7], max_new_tokens=2) is not None  # in range: runs


def test_bench_refuses_a_prompt_longer_than_the_build_takes(shipped, capsys):
    b = str(shipped["build"])
    assert main(["bench", b, "--prompt-length", "200", "--new-tokens", "2", "--repeats", "1"]) == 2
    assert one_line(capsys.readouterr().err) == (f"glmc bench: error: --prompt-length 200: the build takes prompts "
                                                 f"of 1 to 64 tokens (its max_input_length; {b})")
    assert main(["bench", b, "--prompt-length", "64", "--new-tokens", "500", "--repeats", "1"]) == 2
    assert "leaves room for 1 to 192 new tokens" in one_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- chat

def test_fit_messages_drops_the_oldest_turns_and_keeps_the_system_message(shipped):
    model = glmc.load(shipped["build"])
    system = {"role": "system", "content": "You answer briefly."}
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"question {i} about os.path.join"},
                  {"role": "assistant", "content": f"answer {i}: it joins paths"}]
    msgs = [system, *turns, {"role": "user", "content": "and now?"}]
    kept, dropped = model.fit_messages(msgs, reserve=16)
    assert kept[0] == system and kept[-1] == msgs[-1] and dropped > 0 and dropped % 2 == 0
    assert kept[1:-1] == turns[dropped:]  # whole turns, the oldest first
    assert len(model.prompt_ids(kept)) <= 64 < len(model.prompt_ids([system, *turns[dropped - 2:], msgs[-1]]))
    assert model.fit_messages(msgs[-1:], 16) == (msgs[-1:], 0)
    with pytest.raises(MessageTooLong, match=r"this message makes a prompt of \d+ tokens .* over the build's "
                                             r"max_input_length of 64; send a shorter one") as e:
        model.fit_messages([system, {"role": "user", "content": "word " * 80}], 16)
    assert e.value.limit == 64 and e.value.tokens > 64
    with pytest.raises(ArgumentError, match="reserve=256"):
        model.fit_messages(msgs, 256)


def test_chat_keeps_going_for_20_turns_on_the_shipped_build(shipped, tmp_path):
    """20 messages (one of them far too long) through `glmc chat` in a subprocess: every other message is
    answered, the oldest turns are dropped (and the chat says so), the long one is refused and the chat goes on;
    stdout is exactly what the API's policy (Model.fit_messages, the same reserve) gives."""
    from glmc.runtime.chat_format import ReplyParser
    from glmc.runtime.cli_chat import reserve_for
    build = shipped["build"]
    messages = [f"What does function number {i} of the os module do?" for i in range(20)]
    messages[7] = "tell me " * 60  # about 120 tokens: over the build's max_input_length of 64
    r = subprocess.run([sys.executable, "-m", "glmc.cli", "chat", str(build), "--max-new-tokens", "12"],
                       input="\n".join(messages) + "\n", capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model = glmc.load(build)
    reserve = reserve_for(model, 12)
    history: list[dict] = []
    replies, drops = [], 0
    for text in messages:
        try:
            history, dropped = model.fit_messages(history + [{"role": "user", "content": text}], reserve)
        except MessageTooLong:
            continue
        drops += dropped > 0
        parser = ReplyParser(model.tokenizer)
        replies.append("".join(model.stream(history, chat=True, reply=parser, max_new_tokens=12)))
        history.append(parser.message)
    assert len(replies) == 19 and drops >= 5
    assert r.stdout == "".join(f"{reply}\n" for reply in replies)
    err = r.stderr.splitlines()
    refused = [line for line in err if "send a shorter one" in line]
    assert len(refused) == 1 and "over the build's max_input_length of 64" in refused[0]
    assert "the chat goes on" in refused[0]
    assert sum("dropped the" in line and "oldest message(s)" in line for line in err) == drops
    no_leftovers(tmp_path)
