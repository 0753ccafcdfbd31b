"""Writing outputs: bytes -> one file (`ppl graph -o`) or an output directory
(`ppl fit --out`), whole or not at all, never at the cost of a user's file.

Stage: after a command has its results.  Input: file contents as bytes;
output: files on disk.  Every OS failure becomes a located `PplError`
(``PATH: error: cannot write ...: reason``, exit 1) with no temp file left.

An output directory carries `run.json`, the run record, which also marks the
folder as ppl's: `--force` replaces a directory only when its run.json says
ppl wrote it and it holds nothing but the files run.json lists.  The current
directory, the home directory, `/`, the inputs (or a directory holding any of
them), a regular file and a symlink are never replaced, whatever `--force` says.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import stat
import tempfile
from typing import Mapping, Optional, Sequence

from . import __version__
from .errors import Diagnostic, PplError

MARKER = "run.json"
KIND = "ppl-fit-output"
_NEW_DIR = "choose a new --out directory"


def _error(path: str, message: str) -> PplError:
    return PplError([Diagnostic(None, message, path)])


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _same(a: str, b: str) -> bool:
    """The same file or directory (also through symlinks, hard links and bind mounts)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _within(inner: str, outer: str) -> bool:
    """`inner` is `outer` or lies somewhere under it."""
    p = os.path.realpath(inner)
    while True:
        if _same(p, outer):
            return True
        up = os.path.dirname(p)
        if up == p:
            return False
        p = up


def _put(path: str, data: bytes) -> None:
    """A new file with `data`, flushed to the disk."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---- one file -----------------------------------------------------------------------------------
def write_file(path: str, data: bytes, *, inputs: Sequence[str] = ()) -> None:
    """Write `data` to `path` atomically (a temp file beside it, fsync, rename).  A directory or an
    input file at `path` is refused; any OS failure is a located error and leaves no temp file."""
    if os.path.isdir(path):
        raise _error(path, "cannot write the file: it is a directory; refusing to replace it")
    for p in inputs:
        if os.path.exists(path) and _same(path, p):
            raise _error(path, f"cannot write the file: it is the input file '{p}'; refusing to replace it")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".ppl-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _error(path, f"cannot write the file: {_reason(e)}")
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# ---- an output directory ------------------------------------------------------------------------
def check_target(out_dir: str, force: bool, inputs: Sequence[str] = ()) -> None:
    """Refuse an output directory that ppl may not create or replace (call it before the work)."""
    if not out_dir:
        raise _error("--out", "the output directory name is empty")
    target = os.path.abspath(out_dir)
    refuse = f"refusing to write there ({_NEW_DIR})"
    if os.path.islink(target):
        raise _error(out_dir, f"is a symbolic link; {refuse}")
    protected = [("the root directory", os.path.abspath(os.sep)), ("your home directory", os.path.expanduser("~")),
                 ("the current directory", os.getcwd())]
    protected += [(f"the input file '{p}'", p) for p in inputs]
    for what, p in protected:
        if _within(p, target):
            relation = "is" if _same(p, target) else "contains"
            raise _error(out_dir, f"{relation} {what}; {refuse}")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.lexists(parent) else "does not exist (create it first)"
        raise _error(out_dir, f"the parent directory {parent} {what}")
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise _error(out_dir, f"exists and is not a directory; refusing to replace it ({_NEW_DIR})")
        if not force:
            raise _error(out_dir, "the output directory exists; use --force to replace it")
        _check_ours(out_dir)
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".ppl-probe-"))    # can ppl create a folder there?
    except OSError as e:
        raise _error(out_dir, f"cannot create a directory in {parent}: {_reason(e)}")


def _check_ours(out_dir: str) -> None:
    """`out_dir` holds a ppl run.json and nothing else than the files it lists."""
    refuse = f"refusing to replace it ({_NEW_DIR})"
    try:
        with open(os.path.join(out_dir, MARKER), "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        record = None
    files = record.get("files") if isinstance(record, dict) and record.get("kind") == KIND else None
    if not isinstance(files, list):
        raise _error(out_dir, f"has no ppl {MARKER}, so ppl did not write it; {refuse}")
    ours = {MARKER} | {f for f in files if isinstance(f, str)}
    try:
        for entry in sorted(os.listdir(out_dir)):
            if entry not in ours or not stat.S_ISREG(os.lstat(os.path.join(out_dir, entry)).st_mode):
                raise _error(out_dir, f"holds '{entry}', which ppl did not write; {refuse}")
    except OSError as e:
        raise _error(out_dir, f"cannot read the output directory: {_reason(e)}")


def _finite(x):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def run_record(files: Sequence[str], record: Optional[Mapping] = None) -> bytes:
    """The run.json bytes: ppl's marker fields, then `record`'s (which cannot override them)."""
    rec = {"ppl": __version__, "kind": KIND,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "files": sorted(files)}
    rec.update({k: v for k, v in (record or {}).items() if k not in rec})
    return (json.dumps(_finite(rec), indent=2, default=str) + "\n").encode()


def write_dir(out_dir: str, files: Mapping[str, bytes], *, force: bool, inputs: Sequence[str] = (),
              record: Optional[Mapping] = None) -> None:
    """Write `files` (name -> bytes) and run.json into `out_dir`, whole or not at all: into a fresh
    temp directory beside it, then renamed into place.  With `force`, a directory that ppl wrote is
    replaced (the old one is moved aside first and put back if the swap fails)."""
    bad = [n for n in files if n == MARKER or not n or n in (".", "..") or os.sep in n or "/" in n]
    if bad:
        raise ValueError(f"not plain output file names: {bad}")
    check_target(out_dir, force, inputs)
    target = os.path.abspath(out_dir)
    parent, base = os.path.split(target)
    new = None
    try:
        new = tempfile.mkdtemp(dir=parent, prefix=f".{base}.ppl-new-")
        for name, data in files.items():
            _put(os.path.join(new, name), data)
        _put(os.path.join(new, MARKER), run_record(list(files), record))
        os.chmod(new, 0o777 & ~_umask())      # mkdtemp makes 0700
        if os.path.lexists(target):
            _swap(new, target, out_dir)
        else:
            os.replace(new, target)
        new = None
    except OSError as e:
        raise _error(out_dir, f"cannot write the output directory: {_reason(e)}")
    finally:
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)


def _swap(new: str, target: str, out_dir: str) -> None:
    """Replace the directory `target` by `new`: the old one is moved aside, then deleted once the new
    one is in place; if that fails, the old one is put back."""
    parent, base = os.path.split(target)
    aside = tempfile.mkdtemp(dir=parent, prefix=f".{base}.ppl-old-")
    old = os.path.join(aside, "old")
    try:
        os.replace(target, old)
        try:
            os.replace(new, target)
        except OSError as e:
            try:
                os.replace(old, target)
            except OSError:
                raise _error(out_dir, f"cannot write the output directory: {_reason(e)}; "
                                      f"the previous one could not be put back and is kept at {old}") from e
            raise
    finally:
        if not os.path.lexists(old):          # nothing moved aside, or put back: drop the empty holder
            shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)  # the replaced folder, now that the new one is in place
