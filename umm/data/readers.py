"""Where rows come from: one reader per storage format, each with random access by row index.

- ``jsonl``: a ``*.jsonl`` file, one JSON object per line (blank lines ignored); byte offsets are
  indexed once, a row is one seek and one line.
- ``parquet``: a ``*.parquet`` file or a folder of them (upstream BAGEL's layout); a row is a dict of
  its columns. Only footers are read up front; rows are read one row group at a time (the group
  being read is the only one held in memory), so a file is never loaded whole.
- ``tar``: a ``*.tar`` shard or a folder of them (webdataset, as recA reads them); every image member
  is a row ``{"image": <bytes>}``. Member headers are indexed once; a row is one seek and one read
  of that member, nothing is extracted to disk. Compressed tars cannot be seeked and are refused.
- ``folder``: a folder of image files (searched recursively, sorted); every image is a row
  ``{"image": <path>}``.

Readers also report ``blocks``: the row counts of the units that are cheap to read together
(parquet row groups), so the row order can keep a unit's rows together (umm/data/mix.py); None
means every row is cheap on its own. Handles are opened lazily and per process (DataLoader workers
fork after construction).
"""
from __future__ import annotations

import json
import os
import tarfile
from bisect import bisect_right
from typing import Any, Dict, List, Optional, Tuple

from umm.errors import UmmError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMATS = ("jsonl", "parquet", "tar", "folder")


class ReaderError(UmmError):
    """A dataset path that cannot be read as any format (missing, empty, unsupported)."""


class RowError(Exception):
    """One row that cannot be read; the dataset layer turns it into a DataError naming the row."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.message, self.reason = message, reason


class _PerProcess:
    """Lazily opened handles, reopened in each process (never pickled)."""

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"], state["_pid"] = {}, None
        return state

    def _handle(self, key, opener):
        if getattr(self, "_pid", None) != os.getpid():
            self._open, self._pid = {}, os.getpid()
        if key not in self._open:
            self._open.clear()  # one open file at a time per reader
            self._open[key] = opener()
        return self._open[key]


class JsonlReader(_PerProcess):
    format = "jsonl"
    blocks: Optional[List[int]] = None

    def __init__(self, path: str):
        self.path = path
        self.offsets: List[int] = []
        self.line_numbers: List[int] = []
        with open(path, "rb") as handle:
            offset = 0
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    self.offsets.append(offset)
                    self.line_numbers.append(number)
                offset += len(line)

    def __len__(self) -> int:
        return len(self.offsets)

    def source(self, index: int) -> str:
        return f"{self.path}:{self.line_numbers[index]}"

    def raw(self, index: int) -> Dict[str, Any]:
        handle = self._handle(self.path, lambda: open(self.path, "rb"))
        handle.seek(self.offsets[index])
        try:
            data = json.loads(handle.readline())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RowError(f"malformed JSON line ({exc})", "malformed_line") from None
        if not isinstance(data, dict):
            raise RowError(f"a row must be a JSON object, got {type(data).__name__}", "malformed_line")
        return data


def _shards(path: str, suffix: str) -> List[str]:
    """``path`` itself, or the ``*<suffix>`` files directly in the folder ``path`` (sorted)."""
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(suffix)
                  and os.path.isfile(os.path.join(path, n)))


class ParquetReader(_PerProcess):
    format = "parquet"

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.path = path
        self.files = _shards(path, ".parquet")
        # One entry per row group: (file index, row group, first row of the group within its file).
        self.groups: List[Tuple[int, int, int]] = []
        self.blocks: List[int] = []
        for f, file in enumerate(self.files):
            try:
                meta = pq.read_metadata(file)
            except Exception as exc:  # pyarrow raises its own error types for a bad footer
                raise ReaderError(f"cannot read parquet file {file} ({exc})") from None
            first = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    self.groups.append((f, g, first))
                    self.blocks.append(rows)
                first += rows
        self.starts = [0]
        for rows in self.blocks:
            self.starts.append(self.starts[-1] + rows)
        self._group: Optional[Tuple[int, Any]] = None

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, index: int) -> Tuple[int, int]:
        g = bisect_right(self.starts, index) - 1
        return g, index - self.starts[g]

    def source(self, index: int) -> str:
        g, r = self._locate(index)
        f, _, first = self.groups[g]
        return f"{self.files[f]}:row{first + r}"

    def raw(self, index: int) -> Dict[str, Any]:
        import pyarrow.parquet as pq

        g, r = self._locate(index)
        if self._group is None or self._group[0] != g:
            f, group, _ = self.groups[g]
            handle = self._handle(f, lambda: pq.ParquetFile(self.files[f]))
            try:
                table = handle.read_row_group(group)
            except Exception as exc:
                raise RowError(f"row group {group} cannot be read ({exc})", "corrupt_row") from None
            self._group = (g, table)
        return self._group[1].slice(r, 1).to_pylist()[0]

    def __getstate__(self):
        state = super().__getstate__()
        state["_group"] = None
        return state


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class TarReader(_PerProcess):
    format = "tar"
    blocks: Optional[List[int]] = None

    def __init__(self, path: str):
        self.path = path
        self.files = _shards(path, ".tar")
        self.members: List[Tuple[int, str, int, int]] = []  # (shard, name, data offset, size)
        for s, file in enumerate(self.files):
            try:
                with tarfile.open(file, "r:") as tar:  # "r:": uncompressed only, so members can be seeked
                    for member in tar:
                        if member.isfile() and _is_image(member.name):
                            self.members.append((s, member.name, member.offset_data, member.size))
            except tarfile.ReadError as exc:
                raise ReaderError(f"cannot read {file} as an uncompressed tar ({exc}); webdataset shards are "
                                  "plain .tar files: decompress it first") from None

    def __len__(self) -> int:
        return len(self.members)

    def source(self, index: int) -> str:
        s, name, _, _ = self.members[index]
        return f"{self.files[s]}:{name}"

    def raw(self, index: int) -> Dict[str, Any]:
        s, _, offset, size = self.members[index]
        handle = self._handle(s, lambda: open(self.files[s], "rb"))
        handle.seek(offset)
        payload = handle.read(size)
        if len(payload) != size:
            raise RowError(f"member is truncated ({len(payload)} of {size} bytes)", "corrupt_image")
        return {"image": payload}


class FolderReader:
    format = "folder"
    blocks: Optional[List[int]] = None

    def __init__(self, path: str):
        self.path = path
        self.images = sorted(
            os.path.relpath(os.path.join(d, n), path)
            for d, _, names in os.walk(path, followlinks=False) for n in names if _is_image(n)
        )

    def __len__(self) -> int:
        return len(self.images)

    def source(self, index: int) -> str:
        return os.path.join(self.path, self.images[index])

    def raw(self, index: int) -> Dict[str, Any]:
        return {"image": self.images[index]}


def detect_format(path: str) -> str:
    """The storage format of ``path`` (a file by its suffix, a folder by what it holds)."""
    if os.path.isfile(path):
        for suffix, fmt in ((".jsonl", "jsonl"), (".parquet", "parquet"), (".tar", "tar")):
            if path.endswith(suffix):
                return fmt
        raise ReaderError(f"{path}: unknown file type; a dataset path is a .jsonl, .parquet or .tar file, or a "
                          "folder of .parquet files, .tar shards or images")
    names = os.listdir(path)
    found = [fmt for suffix, fmt in ((".parquet", "parquet"), (".tar", "tar")) if any(n.endswith(suffix) for n in names)]
    if len(found) > 1:
        raise ReaderError(f"{path} holds both .parquet and .tar files; give each its own dataset")
    return found[0] if found else "folder"


READERS = {"jsonl": JsonlReader, "parquet": ParquetReader, "tar": TarReader, "folder": FolderReader}


def open_reader(path: str):
    """The reader for ``path`` (which must exist), checked to hold at least one row."""
    fmt = detect_format(path)
    reader = READERS[fmt](path)
    if len(reader) == 0:
        what = {"jsonl": "rows", "parquet": "rows", "tar": "image members", "folder": "image files"}[fmt]
        raise ReaderError(f"{path} ({fmt}) has no {what}")
    return reader
