"""Where text records come from: a JSONL file (read here, line by line), a plain .txt/.md file (read
here: one {"text"} record per paragraph, paragraphs separated by blank lines), or anything the `datasets`
library reads (a .json/.parquet/.csv/.arrow file, a folder, a Hub dataset id). Shared by
`surgeon train --data` (plugins/surgeon-train) and `surgeon split --calibrate`.

    from surgeon.format.datafiles import load_records
    load_records("train.jsonl")                    # [(line number, {"text"} | {"prompt", "completion"} | {"messages"})]
    load_records("book.txt")                       # [(first line of the paragraph, {"text": paragraph})]
    load_records("org/name", split="train[:200]")  # through datasets (an optional extra)

Every record is brought to one of the three forms of surgeon.format.records.normalize; errors are
DataError naming the file and the line (or row). `datasets` is imported only for the sources that
need it; without it, one DataError naming the extra to install (`extra`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from surgeon.format.records import FORMAT_HINT, DataError, normalize

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
FIELDS = ("text", "prompt", "completion", "messages", "instruction", "input", "output", "conversations")
TRAIN_EXTRA = "pip install 'surgeon-train[datasets]'"


def iter_jsonl(path: Path, columns: dict[str, str] | None = None, fmt: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-blank line, read one line at a time (a caller that needs
    only the first records reads only those); raises DataError naming the file and line, or saying
    that the file holds none. columns maps record fields to the file's keys ({"prompt": "question",
    ...}); fmt forces a format (surgeon.format.records.FORMATS) instead of detecting it per record."""
    path = Path(path)
    rename = {col: field for field, col in (columns or {}).items()}
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (or is not a file); give a JSONL file with {FORMAT_HINT}.")
    n = 0
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError) as e:
                    why = f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                    raise DataError(f"{path}, line {lineno}: not valid JSON ({why}); expected {FORMAT_HINT}.") from None
                if rename and isinstance(obj, dict):
                    obj = {rename.get(k, k): v for k, v in obj.items()}
                n += 1
                yield lineno, normalize(obj, f"{path}, line {lineno}", fmt)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 JSONL.") from None
    if not n:
        raise DataError(f"{path} holds no examples (it is empty or blank); expected {FORMAT_HINT}.")


def load_jsonl(path: Path, columns: dict[str, str] | None = None, fmt: str | None = None) -> list[tuple[int, dict]]:
    """Every record of iter_jsonl, as a list."""
    return list(iter_jsonl(path, columns, fmt))


TEXT_SUFFIXES = (".txt", ".md")
TEXT_CHARS = 2000  # a plain text's record: a paragraph, or up to this many characters of one at line breaks


def iter_text(path: Path, chars: int = TEXT_CHARS) -> Iterator[tuple[int, dict]]:
    """(first line number, {"text": ...}) records of a UTF-8 text file, read one line at a time: its
    paragraphs (separated by blank lines), a long one cut at line breaks into pieces of at most
    `chars` characters (a line longer than that stays whole), so a text with few blank lines is not
    cut to its first tokens per paragraph."""
    start, para, n = 0, [], 0
    try:
        with Path(path).open(encoding="utf-8") as f:
            for lineno, raw in enumerate(_lines(f), 1):
                line = raw.rstrip("\r\n")
                full = para and sum(len(x) + 1 for x in para) + len(line) > chars
                if para and (not line.strip() or full):
                    n += 1
                    yield start, {"text": "\n".join(para)}
                    start, para = 0, []
                if line.strip():
                    start, para = (start or lineno), [*para, line]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") from None
    if not n:
        raise DataError(f"{path} holds no text (it is empty or blank).")


def _lines(f) -> Iterator[str]:
    """The file's lines, then one blank line (it ends the last paragraph)."""
    yield from f
    yield ""


def load_text(path: Path, chars: int = TEXT_CHARS) -> list[tuple[int, dict]]:
    """Every record of iter_text, as a list."""
    return list(iter_text(path, chars))


def iter_records(source, extra: str = TRAIN_EXTRA, option: str = "--data") -> Iterator[tuple[int, dict]]:
    """load_records' records one at a time, read only as far as the caller goes (--calibrate stops at
    its token budget): a local JSONL or text file line by line, a dataset saved with save_to_disk from
    its memory-mapped Arrow files, and any other `datasets` source (JSON/parquet/CSV files, Hub ids)
    with streaming=True, so neither a whole file nor a whole Hub dataset is copied first."""
    path = Path(source)
    if path.suffix == ".jsonl" and path.is_file():
        return iter_jsonl(path)
    if path.suffix in TEXT_SUFFIXES and path.is_file():
        return iter_text(path)
    _not_a_model(path, source, option)
    _exists(path)
    return _iter_dataset(str(source), path, extra, option)


def _iter_dataset(source: str, path: Path, extra: str, option: str) -> Iterator[tuple[int, dict]]:
    try:
        rows = iter(_load_dataset(source, path, "train", extra, option, streaming=True))
    except StopIteration:  # datasets' streaming JSON builder on an empty file (it peeks at the first table)
        rows = iter(())
    keep, n = None, 0
    while True:
        with _reading(source, option):  # around each read only: no context stays open while the caller holds the generator
            row = next(rows, None)
        if row is None:
            break
        n += 1
        keep = keep or [k for k in row if k in FIELDS] or list(row)
        yield n, normalize({k: row[k] for k in keep}, f"{source}, row {n}")
    if not n:
        raise DataError(f"{source} (split 'train') holds no rows.")


def load_records(source, split: str = "train", columns: dict[str, str] | None = None, fmt: str | None = None,
                 extra: str = TRAIN_EXTRA, option: str = "--data") -> list[tuple[int, dict]]:
    """(number, record) pairs from a JSONL path, a datasets-readable file or folder, or a Hub id."""
    path = Path(source)
    _not_a_model(path, source, option)
    if path.suffix == ".jsonl" and path.is_file():
        return load_jsonl(path, columns, fmt)
    if path.suffix in TEXT_SUFFIXES and path.is_file():
        return load_text(path)
    _exists(path)
    ds = _load_dataset(str(source), path, split, extra, option)
    missing = [c for c in (columns or {}).values() if c not in ds.column_names]
    if missing:
        raise DataError(f"{source} has no column {missing[0]!r} (it has {ds.column_names}); fix --columns.")
    rename = {col: field for field, col in (columns or {}).items()}
    keep = [c for c in ds.column_names if rename.get(c, c) in FIELDS]
    records = []
    for i, row in enumerate(ds.select_columns(keep) if keep else ds, 1):
        records.append((i, normalize({rename.get(k, k): v for k, v in row.items()}, f"{source}, row {i}", fmt)))
    if not records:
        raise DataError(f"{source} (split {split!r}) holds no rows.")
    return records


def _not_a_model(path: Path, source, option: str) -> None:
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        raise DataError(f"{option} {source} is a model folder (config.json and weights), not text data; give a JSONL file "
                        "with one example a line, a data folder or a dataset id.")


def _exists(path: Path) -> None:
    if path.suffix in (*BUILDERS, *TEXT_SUFFIXES) and not path.is_file():
        raise DataError(f"data file {path} does not exist (or is not a file); give a JSONL, JSON, parquet, CSV or text file, or a dataset id.")


def _load_dataset(source: str, path: Path, split: str, extra: str, option: str, streaming: bool = False):
    """A datasets Dataset (or, streaming, an iterable of rows: a saved dataset is memory-mapped, so its
    Dataset is returned as it is)."""
    datasets = _datasets(source, extra)
    with _reading(source, option):
        if path.is_file():
            return datasets.load_dataset(BUILDERS.get(path.suffix, "json"), data_files=str(path), split="train", streaming=streaming)
        if path.is_dir() and (path / "dataset_info.json").exists() and (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(source, split=split, streaming=streaming)


def _datasets(source: str, extra: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {source} needs the `datasets` library: {extra} (JSONL files need nothing more).") from None
    datasets.disable_progress_bars()
    return datasets


@contextlib.contextmanager
def _reading(source: str, option: str):
    """datasets' errors while opening or (streaming) reading a source, as one DataError line."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its builders log a failure, then raise it: one line is ours
    try:
        yield
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError, datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ else e  # what the builder met
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(f"could not read {option} {source} with datasets ({first}); give a JSONL/JSON/parquet/CSV file, "
                        "a folder, or a dataset id reachable from here (set HF_DATASETS_OFFLINE=1 to use the cache only).") from None
    finally:
        datasets.logging.set_verbosity(level)
