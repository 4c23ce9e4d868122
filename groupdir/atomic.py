"""Writing outputs so that nothing is ever half-written: a temporary path beside the target, renamed
when complete. Readers see the old version or the new one, never a mix. And before any work starts,
refusing an output that could not be written at all."""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from groupdir.errors import OutputError


@contextmanager
def atomic_folder(out: Path):
    """Yield an empty temporary folder beside `out`; when the block completes it replaces `out`, when
    it fails (or is interrupted) it is removed. Leftovers of killed processes are cleared first."""
    _remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def check_writable(path: str | Path, atomically: bool = False, file: bool = False) -> None:
    """Refuses an output the command could not write, naming it, before any data is read or Ray
    starts: a file where the output folder or one of its parents should be (a folder where an output
    `file` should be), or a folder this process may not write in. The folder that must be writable
    is PATH itself for an output folder the command writes in, and PATH's parent for one written
    `atomically` (beside PATH, then renamed over it: atomic_folder) and for a `file` (always written
    so); a folder yet to be made needs its nearest existing parent writable."""
    path = Path(path).absolute()
    if path.exists() and path.is_dir() == file:
        raise OutputError(f"cannot write {path}: it is a {'folder' if file else 'file'}, not a "
                          f"{'file' if file else 'folder'}")
    written_in = path.parent if atomically or file else path
    while not written_in.exists():  # exists() is False below a file too: the loop stops at the file
        written_in = written_in.parent
    if not written_in.is_dir():
        raise OutputError(f"cannot write {path}: {written_in} is a file, not a folder")
    if not os.access(written_in, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no permission to write in {written_in}")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def copy_file_atomic(source: Path, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload) -> None:
    """Strict JSON (NaN, e.g. an empty shot, becomes null), written atomically."""
    write_text_atomic(path, json.dumps(_nan_to_none(payload), indent=2, allow_nan=False))


def read_json(path: Path):
    """What write_json_atomic wrote, its nulls read back as NaN (results and histories hold no other
    null)."""
    return _none_to_nan(json.loads(Path(path).read_text()))


def _none_to_nan(value):
    if isinstance(value, dict):
        return {k: _none_to_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_none_to_nan(v) for v in value]
    return math.nan if value is None else value


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _remove_stale_temporaries(out: Path) -> None:
    for folder in out.parent.glob(f".{out.name}.tmp-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
