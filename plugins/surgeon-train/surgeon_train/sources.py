"""Where --data comes from: a JSONL file (read here), or anything the `datasets` library reads.

    surgeon train SPLIT --data train.jsonl                 # read line by line, errors name the line
    surgeon train SPLIT --data train.parquet               # datasets' parquet builder (also .json, .csv, .arrow)
    surgeon train SPLIT --data ./my_dataset_dir            # a folder of data files, or one from save_to_disk
    surgeon train SPLIT --data org/name --data-split "train[:2000]" --columns prompt=question,completion=answer

Every record must be in one of the formats of surgeon/records.py (text, prompt/completion, messages,
alpaca, sharegpt; see surgeon_train.data); a dataset with other column names is mapped with
--columns FIELD=COLUMN,…. `datasets` (an optional
extra, `pip install 'surgeon-train[datasets]'`) is imported only for the sources that need it; a Hub
id is resolved by datasets itself (its cache, HF_DATASETS_OFFLINE / HF_HUB_OFFLINE honoured).
"""

from __future__ import annotations

from pathlib import Path

from surgeon_train.data import DataError, _check, load_jsonl

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
FIELDS = ("text", "prompt", "completion", "messages", "instruction", "input", "output", "conversations")


def parse_columns(spec: str | None) -> dict[str, str] | None:
    """"prompt=question,completion=answer" → {"prompt": "question", "completion": "answer"}."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        field, sep, col = part.partition("=")
        if not sep or field.strip() not in FIELDS or not col.strip():
            raise DataError(f"--columns {spec!r}: give FIELD=COLUMN pairs separated by commas, FIELD one of {', '.join(FIELDS)}.")
        out[field.strip()] = col.strip()
    return out


def load_records(source, split: str = "train", columns: dict[str, str] | None = None, fmt: str | None = None) -> list[tuple[int, dict]]:
    """(number, record) pairs from a JSONL path, a datasets-readable file or folder, or a Hub id."""
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        raise DataError(f"--data {source} is a model folder (config.json and weights), not training data; give a JSONL file "
                        "with one example a line, a data folder or a dataset id.")
    if path.suffix == ".jsonl" and path.is_file():
        return load_jsonl(path, columns, fmt)
    if path.suffix in BUILDERS and not path.is_file():
        raise DataError(f"data file {path} does not exist (or is not a file); give a JSONL, JSON, parquet or CSV file, or a dataset id.")
    ds = _load_dataset(str(source), path, split)
    missing = [c for c in (columns or {}).values() if c not in ds.column_names]
    if missing:
        raise DataError(f"{source} has no column {missing[0]!r} (it has {ds.column_names}); fix --columns.")
    rename = {col: field for field, col in (columns or {}).items()}
    keep = [c for c in ds.column_names if rename.get(c, c) in FIELDS]
    records = []
    for i, row in enumerate(ds.select_columns(keep) if keep else ds, 1):
        records.append((i, _check({rename.get(k, k): v for k, v in row.items()}, source, i, "row", fmt)))
    if not records:
        raise DataError(f"{source} (split {split!r}) holds no rows.")
    return records


def _load_dataset(source: str, path: Path, split: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {source} needs the `datasets` library: pip install 'surgeon-train[datasets]' "
                        "(JSONL files need nothing more).") from None
    datasets.disable_progress_bars()
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its builders log a failure, then raise it: one line is ours
    try:
        if path.is_file():
            return datasets.load_dataset(BUILDERS.get(path.suffix, "json"), data_files=str(path), split="train")
        if path.is_dir() and (path / "dataset_info.json").exists() and (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError, datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ else e  # what the builder met
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(f"could not read --data {source} with datasets ({first}); give a JSONL/JSON/parquet/CSV file, "
                        "a folder, or a dataset id reachable from here (set HF_DATASETS_OFFLINE=1 to use the cache only).") from None
    finally:
        datasets.logging.set_verbosity(level)
