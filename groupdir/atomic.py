"""Writing outputs so that nothing is ever half-written: a temporary path beside the target, renamed
when complete. Readers see the old version or the new one, never a mix."""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


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
