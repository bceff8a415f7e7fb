"""A persistent index of the DICOM headers a scan read: a rerun (a resume, each shard of an array
job, the next version of an export) re-reads only the files whose size or modification time changed.

Headers hold the values that identify patients (they are how side tables are joined), so like the
crosswalk the index lives OUTSIDE the cache: ``<CACHE>.scan.sqlite`` beside it by default, created
with mode 0600 (docs/preprocess.md). An entry is a pickled header signed with an HMAC under the run's
source-hash key (derived from ``VOL3D_ID_KEY``): an entry that does not verify (written with another
key, or edited) is read again from its file, so the index never unpickles bytes it did not sign.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from preprocess.ingest.discover import FoundFile
from preprocess.types import Candidate

#: Bumped whenever what a header holds changes: entries of another version are read again.
INDEX_VERSION = "1"


def _version() -> str:
    import pydicom

    return f"{INDEX_VERSION}/pydicom-{pydicom.__version__}"


class ScanIndex:
    """``lookup`` the headers of unchanged files, ``store`` those read now (see the module docstring)."""

    def __init__(self, path: str | Path, key: bytes, readonly: bool = False):
        self.path = Path(path)
        self.key = key
        self.readonly = readonly
        self.version = _version()
        if readonly:
            if not self.path.is_file():
                from preprocess.errors import InputError

                raise InputError(f"scan index {self.path} does not exist; build it first with "
                                 "`vol3d preprocess SRC --out CACHE --scan-only --scan-index PATH`")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=120)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # PHI: readable by its owner only
            os.close(fd)
            self.db = sqlite3.connect(self.path, timeout=120)
            self.db.execute("CREATE TABLE IF NOT EXISTS headers (rel TEXT PRIMARY KEY, size INTEGER, "
                            "mtime_ns INTEGER, known INTEGER, version TEXT, sig BLOB, blob BLOB)")
            self.db.commit()
        self.hits = self.misses = 0
        self._seen: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) as lookup saw it, for store

    def _sign(self, blob: bytes) -> bytes:
        return hmac.new(self.key, blob, hashlib.sha256).digest()

    def lookup(self, files: Sequence[tuple[FoundFile, bool]]) -> dict[str, Any]:
        """``{rel: header}`` for the files whose size, mtime and DICOM hint match their entry."""
        out: dict[str, Any] = {}
        rows: dict[str, tuple] = {}
        rels = [f.rel for f, _ in files]
        for i in range(0, len(rels), 500):
            chunk = rels[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.execute(f"SELECT rel, size, mtime_ns, known, version, sig, blob FROM headers "
                                       f"WHERE rel IN ({marks})", chunk):  # fmt: skip
                rows[row[0]] = row[1:]
        for f, known in files:
            row = rows.get(f.rel)
            try:
                st = os.stat(f.path)
                self._seen[f.rel] = (st.st_size, st.st_mtime_ns)
            except OSError:
                row = None
            if row is None or (row[0], row[1], bool(row[2]), row[3]) != (st.st_size, st.st_mtime_ns, known,
                                                                          self.version):
                self.misses += 1
                continue
            sig, blob = row[4], row[5]
            if not hmac.compare_digest(sig, self._sign(blob)):
                self.misses += 1
                continue
            out[f.rel] = _repoint(pickle.loads(blob), f)  # noqa: S301 (signed by this key above)
            self.hits += 1
        return out

    def store(self, items: Iterable[tuple[tuple[FoundFile, bool], Any]]) -> None:
        """Record what was read for each ``((file, known_dicom), header)``, under the size and mtime
        :meth:`lookup` saw before it was read (a file changed meanwhile is read again next time)."""
        if self.readonly:
            return
        rows = []
        for (f, known), result in items:
            stat = self._seen.get(f.rel)
            if stat is None:
                try:
                    st = os.stat(f.path)
                except OSError:
                    continue
                stat = (st.st_size, st.st_mtime_ns)
            blob = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
            rows.append((f.rel, *stat, int(known), self.version, self._sign(blob), blob))
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO headers VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM headers").fetchone()[0])

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ScanIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _repoint(result: Any, f: FoundFile) -> Any:
    """A stored header (or row) pointed at the file where it is now (an export may have moved)."""
    if result is None:
        return None
    if isinstance(result, Candidate):
        result.source_files = [f.path]
        return result
    result.file = f
    return result


def index_path(out: str | Path) -> Path:
    """The default index of a cache: ``<CACHE>.scan.sqlite`` beside it (outside the cache: it holds PHI)."""
    out = Path(out)
    return out.parent / f"{out.name}.scan.sqlite"


__all__ = ["INDEX_VERSION", "ScanIndex", "index_path"]
