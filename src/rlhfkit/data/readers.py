"""Readers: jsonl, json, csv and parquet files (gzip-aware), and folders written by
``datasets.save_to_disk``. Each yields ``(location, row)`` where location is "path:line" for
line-based files and "path:record N" otherwise, so every later error can name where it came from.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from rlhfkit.data.errors import DataError

FORMATS = ("jsonl", "json", "csv", "parquet", "hf-disk")


def file_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf-disk"
        raise DataError(f"{path}: a folder, but not one written by datasets.save_to_disk")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1].lstrip(".") if suffixes else ""
    if ext in ("jsonl", "ndjson"):
        return "jsonl"
    if ext in ("json", "csv", "parquet"):
        return ext
    raise DataError(f"{path}: unknown file type '{ext or path.name}'; expected one of .jsonl .json .csv .parquet (optionally .gz) or a save_to_disk folder")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_rows(path: str | Path, split: str = "train") -> Iterator[tuple[str, dict | DataError]]:
    """Yield ``(location, row)``. A row that cannot be parsed is yielded as a ``DataError`` in place of
    the dict, so the caller decides whether to stop or skip; nothing is silently dropped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    kind = file_format(path)
    if kind == "jsonl":
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(row, dict):
                    yield where, DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
                    continue
                yield where, row
    elif kind == "json":
        with _open_text(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} or a dict of columns
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(data) == 1 and lists:
                data = lists[0]
            elif lists and all(isinstance(v, list) and len(v) == len(lists[0]) for v in data.values()):
                data = [dict(zip(data, vals)) for vals in zip(*data.values())]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        for i, row in enumerate(data):
            where = f"{path}:record {i}"
            yield where, row if isinstance(row, dict) else DataError(f"{where}: expected an object, got {type(row).__name__}")
    elif kind == "csv":
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    yield where, DataError(f"{where}: more values than the {len(reader.fieldnames or [])} header columns")
                    continue
                yield where, {k: _csv_value(v) for k, v in row.items()}
    elif kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow: pip install 'rlhfkit[data]'") from None
        table = pq.read_table(path)
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}:record {i}", row
    else:
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path}: reading save_to_disk folders needs datasets: pip install 'rlhfkit[data]'") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split '{split}' (has {', '.join(ds)})")
            ds = ds[split]
        for i, row in enumerate(ds):
            yield f"{path}:record {i}", row


def _csv_value(value: str | None):
    """CSV cells are strings; a cell holding JSON (a list of messages, a list of steps) is decoded."""
    if value is None:
        return None
    text = value.strip()
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    return value
