"""`datasets` sources are read as far as the caller goes (iter_records, used by --calibrate): JSON,
parquet and CSV files stream row by row without an Arrow copy in the datasets cache, give the records
load_records gives, and the calibration tokens (and their hash) equal those of the same rows as JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from surgeon.format.datafiles import iter_records, load_records  # noqa: E402
from surgeon.format.records import DataError  # noqa: E402
from surgeon.model.calibdata import load_calibration_data  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama"
ROWS = [{"text": f"row {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(30)), "id": i} for i in range(20000)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", c)
    return c


def arrow_files(cache: Path) -> list[Path]:
    return list(cache.rglob("*.arrow")) if cache.exists() else []


def test_parquet_streams_without_a_copy_and_matches_load_records(tmp_path, cache):
    f = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), f, row_group_size=500)
    it = iter_records(str(f))
    first = [next(it) for _ in range(3)]
    assert first == [(i + 1, {"text": ROWS[i]["text"]}) for i in range(3)]  # numbered rows, only the text field kept
    assert arrow_files(cache) == []  # nothing converted: the file was not read whole
    whole = load_records(str(f))
    assert whole[:3] == first and len(whole) == len(ROWS)
    assert arrow_files(cache)  # the check above can see a copy: load_records makes one


def test_calibration_from_parquet_equals_the_same_rows_as_jsonl(tmp_path, cache):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet", row_group_size=500)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in ROWS))
    a = load_calibration_data(str(tmp_path / "d.parquet"), TINY, max_tokens=3000, max_len=64)
    b = load_calibration_data(str(tmp_path / "d.jsonl"), TINY, max_tokens=3000, max_len=64)
    assert a.tokens == b.tokens == 3000 and a.sha256 == b.sha256
    assert len(a.input_ids) < 100 and arrow_files(cache) == []  # 3000 tokens took the first rows of 20000


def test_json_and_csv_stream_too(tmp_path, cache):
    (tmp_path / "d.json").write_text("\n".join(json.dumps(r) for r in ROWS[:50]))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(50)))
    assert next(iter_records(str(tmp_path / "d.json"))) == (1, {"text": ROWS[0]["text"]})
    assert next(iter_records(str(tmp_path / "d.csv"))) == (1, {"prompt": "q0", "completion": "a0"})
    assert arrow_files(cache) == []


def test_streamed_errors_are_one_line(tmp_path, cache):
    (tmp_path / "bad.json").write_text("{not json\n")
    with pytest.raises(DataError, match=r"could not read --calibrate .*bad\.json with datasets") as e:
        next(iter_records(str(tmp_path / "bad.json"), option="--calibrate"))
    assert "\n" not in str(e.value)
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(DataError, match="holds no rows"):
        list(iter_records(str(tmp_path / "empty.json")))
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("text", pa.string())])), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="empty.parquet"):  # datasets' own complaint, as one line
        list(iter_records(str(tmp_path / "empty.parquet")))
    with pytest.raises(DataError, match="does not exist"):
        iter_records(str(tmp_path / "missing.parquet"))
    with pytest.raises(DataError, match="is a model folder"):
        iter_records(str(TINY))
