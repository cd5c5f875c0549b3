"""Work-dir files: atomic writes under unique temporary names, JSON and JSON lines, OS errors.

Every file a run writes goes through `atomic`: the content lands in a uniquely named temporary file
beside the target and is renamed over it, so a kill at any moment leaves the old file or the new
one, never half of either, and two writers never share a temporary name. On a multi-host run only
process 0 writes (the others skip every write here); see `is_primary`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile

import jax

from early_jax.errors import UserError

# OS errors a user fixes by pointing the work dir elsewhere, freeing space or fixing permissions:
# errno -> (what happened, what to do).
WORKDIR_ERRNOS = {errno.EROFS: ("the file system is read-only", "pass a writable --workdir"),
                  errno.ENOSPC: ("the disk is full", "free space or pass another --workdir"),
                  errno.EDQUOT: ("the disk quota is exceeded", "free space or pass another --workdir"),
                  errno.EACCES: ("permission denied", "fix the folder's permissions or pass another --workdir"),
                  errno.EPERM: ("operation not permitted", "fix the folder's permissions or pass another --workdir"),
                  errno.ENOTDIR: ("a part of the path is a file, not a folder", "pass a folder as --workdir")}


def is_primary() -> bool:
    """Whether this process writes shared files (process 0 of a multi-host run, or the only one)."""
    return jax.process_index() == 0


@contextlib.contextmanager
def atomic(path: str, mode: str = "w"):
    """Open a temporary file for writing; on success it replaces `path` (fsynced first)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    if is_primary():
        with atomic(path) as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=_to_builtin)


def write_text(path: str, text: str) -> None:
    if is_primary():
        with atomic(path) as f:
            f.write(text)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); delete it (a run rebuilds its own "
                        "files) or restore it") from None


def append_jsonl(path: str, obj) -> None:
    """One line appended; a kill mid-write can only cut the last line short (see `read_jsonl`)."""
    if is_primary():
        with open(path, "a") as f:
            f.write(json.dumps(obj, default=_to_builtin) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_jsonl(path: str) -> list:
    """The logged lines. A last line cut short by a kill is dropped; a damaged line elsewhere is an
    error naming the file and line (it was not written by a killed append)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path} line {i + 1} is damaged (not JSON); delete that line, or "
                                "the file to restart its log") from None
    return out


def rewrite_jsonl(path: str, lines: list) -> None:
    if is_primary():
        with atomic(path) as f:
            f.writelines(json.dumps(line, default=_to_builtin) + "\n" for line in lines)


def workdir_error(err: BaseException) -> str | None:
    """One line for an OS error the user can fix (read-only or full disk, permissions), found
    anywhere in the exception's chain (Orbax wraps them); None for other errors."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in WORKDIR_ERRNOS:
            what, advice = WORKDIR_ERRNOS[err.errno]
            return (f"cannot write {err.filename or 'in the work dir'}: {what}; {advice}. Finished "
                    "results are kept and a rerun resumes")
        err = err.__cause__ or err.__context__
    return None


def _to_builtin(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} as JSON")
