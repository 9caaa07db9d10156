"""Files behind the flag service: the runtime override file and the audit trail.

`flags.json` holds the runtime overrides as ``{"version": 1, "overrides": {name: value}}``
and is always replaced atomically (temp file, fsync, os.replace, fsync of the directory).
`flags-audit.jsonl` gets one JSON line per change, fsynced, so the trail survives restarts.
Neither file may take the agent down: a corrupt override file is moved aside and
reported; unreadable audit lines are skipped and reported.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("sidecar_agent.flags")

OVERRIDES_FILE = "flags.json"
AUDIT_FILE = "flags-audit.jsonl"
FORMAT_VERSION = 1


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform/filesystem; the replace itself happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OverrideFile:
    """The runtime override layer on disk."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / OVERRIDES_FILE

    def load(self) -> tuple[dict[str, Any], list[str]]:
        """Return (overrides, problems). A corrupt file is moved aside, never fatal."""
        for stale in self.path.parent.glob(f"{OVERRIDES_FILE}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()  # left by a crash between mkstemp and os.replace
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}, []
        except OSError as exc:
            return {}, [f"override file {self.path} cannot be read ({exc.strerror}); runtime overrides are not applied"]
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or not isinstance(doc.get("overrides"), dict):
                raise ValueError('expected an object {"version": 1, "overrides": {...}}')
            if doc.get("version") != FORMAT_VERSION:
                raise ValueError(f"unsupported version {doc.get('version')!r}")
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            moved = self._move_aside()
            where = f"moved to {moved}" if moved else "could not be moved aside"
            msg = f"override file {self.path} was corrupt ({exc}); it was {where} and no runtime overrides apply"
            log.error("%s", msg)
            return {}, [msg]
        return dict(doc["overrides"]), []

    def _move_aside(self) -> Path | None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for i in range(100):
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}" + (f"-{i}" if i else ""))
            if not target.exists():
                try:
                    os.replace(self.path, target)
                except OSError:
                    return None
                return target
        return None

    def save(self, overrides: dict[str, Any]) -> None:
        """Write all overrides atomically. Raises OSError when the disk refuses."""
        doc = {"version": FORMAT_VERSION, "overrides": dict(sorted(overrides.items()))}
        atomic_write(self.path, (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode())


class AuditLog:
    """The last `size` flag changes in memory, and every change appended to a JSONL file.

    The file keeps at least the last `keep_on_disk` changes; it is compacted on load when
    it holds twice that many (or unreadable lines).
    """

    def __init__(self, data_dir: Path, size: int = 200, keep_on_disk: int = 5000) -> None:
        self.path = data_dir / AUDIT_FILE
        self.size = size
        self.keep_on_disk = max(keep_on_disk, size)
        self.entries: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)

    def load(self) -> list[str]:
        """Read the trail back; return problems (unreadable lines are skipped, not fatal)."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        except OSError as exc:
            return [f"audit file {self.path} cannot be read ({exc.strerror}); earlier changes are not shown"]
        good: list[str] = []
        bad = 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:  # e.g. a line torn by a crash mid-append
                bad += 1
                continue
            if isinstance(entry, dict):
                self.entries.append(entry)
                good.append(line)
            else:
                bad += 1
        problems = []
        if bad:
            problems.append(f"audit file {self.path}: skipped {bad} unreadable line(s)")
        torn_tail = bool(text) and not text.endswith("\n")  # the next append would join it
        if bad or torn_tail or len(good) > 2 * self.keep_on_disk:
            self._compact(good[-self.keep_on_disk :])
        return problems

    def _compact(self, lines: list[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        try:
            atomic_write(self.path, data)
        except OSError as exc:
            log.warning("could not compact %s: %s", self.path, exc)

    def append(self, entry: dict[str, Any]) -> None:
        """Keep the entry in memory, then append and fsync it. Raises OSError on a disk error
        (the entry is still kept in memory)."""
        self.entries.append(entry)
        line = json.dumps(entry, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
