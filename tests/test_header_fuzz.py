"""Property-based fuzzing (hypothesis) of safetensors headers and shard indexes: surgeon's verdict
against the safetensors library's own.

    PYTHONPATH=$PWD python -m pytest tests/test_header_fuzz.py -q

Properties: whatever `safetensors.safe_open` refuses, surgeon refuses with its own one-line error
(CorruptCheckpointError / SourceError, never another exception); surgeon refuses more only for a dtype
it cannot read or a tensor name given twice (the library keeps one of the two silently); whatever both
accept reads the same bytes. Files are built from near-valid headers with one or more defects drawn at random: non-object
JSON, bad metadata, float / negative / string shapes and offsets, aliased, shifted or overlapping
data ranges, duplicate keys, unknown dtypes, a wrong header length, short or long data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from surgeon.errors import CorruptCheckpointError, SourceError
from surgeon.format import Checkpoint
from surgeon.format.source import resolve

DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "F64": 8}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3)


@st.composite
def header_files(draw) -> bytes:
    """A safetensors file: a valid layout, then defects."""
    n = draw(st.integers(0, 4))
    entries, pos = [], 0
    for i in range(n):
        dt, shape = draw(st.sampled_from(sorted(DTYPES))), draw(shapes)
        size = DTYPES[dt] * int(torch.tensor(shape).prod()) if shape else DTYPES[dt]
        entries.append([f"t{i}", {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + size]}])
        pos += size
    meta = {"format": "pt"}
    for defect in draw(st.lists(st.sampled_from(DEFECTS), max_size=3)):
        pos, meta = defect(draw, entries, pos, meta)
    body = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in ([["__metadata__", meta]] if meta is not None else []) + entries) + "}"
    if draw(st.booleans()) and draw(st.integers(0, 20)) == 0:
        body = draw(st.sampled_from(["[1,2,3]", '"x"', "null", "3", "{not json"]))
    raw = body.encode()
    length = len(raw) + draw(st.sampled_from([0, 0, 0, 1, -1, 10**9]))
    data = bytes(draw(st.integers(0, 255)) for _ in range(min(pos, 64))) + b"\0" * max(0, pos - 64)
    data += draw(st.sampled_from([b"", b"", b"", b"\0", b"\0" * 8]))
    if draw(st.integers(0, 9)) == 0:
        data = data[: len(data) // 2]
    return struct.pack("<Q", max(length, 0)) + raw + data


def _shape_float(draw, entries, pos, meta):
    if entries:
        e = draw(st.sampled_from(entries))[1]
        e["shape"] = [x + 0.5 for x in e.get("shape", [])] or [1.5]
    return pos, meta


def _shape_negative(draw, entries, pos, meta):
    if entries:
        draw(st.sampled_from(entries))[1]["shape"] = [-1, 4]
    return pos, meta


def _offsets(draw, entries, pos, meta):
    if entries:
        e = draw(st.sampled_from(entries))[1]
        kind = draw(st.sampled_from(["float", "shift", "alias", "swap", "string"]))
        b, end = e.get("data_offsets", [0, 0])
        if not (isinstance(b, int) and isinstance(end, int)):  # already broken by an earlier defect
            return pos, meta
        e["data_offsets"] = {"float": [float(b), float(end)], "shift": [b + 1, end + 1], "alias": [0, end - b],
                             "swap": [end, b], "string": [str(b), str(end)]}[kind]
    return pos, meta


def _duplicate(draw, entries, pos, meta):
    if entries:
        entries.append(list(draw(st.sampled_from(entries))))
    return pos, meta


def _dtype(draw, entries, pos, meta):
    if entries:
        draw(st.sampled_from(entries))[1]["dtype"] = draw(st.sampled_from(["Q4", "f32", "", "F8_E4M3", "I4"]))
    return pos, meta


def _meta(draw, entries, pos, meta):
    return pos, draw(st.sampled_from([[1, 2], {"a": 1}, {"a": None}, "x", None, {"a": "b"}]))


def _missing_key(draw, entries, pos, meta):
    if entries:
        e = draw(st.sampled_from(entries))[1]
        e.pop(draw(st.sampled_from(sorted(e))))
    return pos, meta


DEFECTS = [_shape_float, _shape_negative, _offsets, _duplicate, _dtype, _meta, _missing_key]


def library_verdict(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None


@FUZZ
@given(blob=header_files())
def test_surgeon_refuses_what_safetensors_refuses_and_reads_what_it_reads(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(blob)
    want = library_verdict(path)
    try:
        ck = Checkpoint.open([path])
    except (CorruptCheckpointError, SourceError) as e:
        # stricter only where it must be: a dtype it cannot read, or a name given twice (which parsers resolve differently)
        assert want is None or "surgeon cannot read" in str(e) or "duplicate key" in str(e), f"refused what safetensors reads: {e}"
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert want is not None, "accepted a file safetensors refuses"
    assert sorted(ck.tensors) == sorted(want)
    for name, t in want.items():
        got = ck.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8))


GOOD = {"t0": "a.safetensors", "t1": "b.safetensors", "t2": "a.safetensors"}


@st.composite
def indexes(draw) -> str:
    wmap = dict(GOOD)
    kind = draw(st.sampled_from(["ok", "not-object", "no-map", "map-list", "value-int", "extra", "missing", "outside", "wrong-file"]))
    obj = {"metadata": {}, "weight_map": wmap}
    if kind == "not-object":
        return json.dumps(draw(st.sampled_from([[1], "x", None, 3])))
    if kind == "no-map":
        obj.pop("weight_map")
    elif kind == "map-list":
        obj["weight_map"] = list(wmap)
    elif kind == "value-int":
        wmap["t0"] = 7
    elif kind == "extra":
        wmap["t9"] = "a.safetensors"
    elif kind == "missing":
        del wmap["t2"]  # a.safetensors still named, but one of its tensors not
    elif kind == "outside":
        wmap["t1"] = draw(st.sampled_from(["../b.safetensors", "/etc/passwd", "sub/../../b.safetensors"]))
    elif kind == "wrong-file":
        wmap["t0"] = "b.safetensors"
    return json.dumps(obj)


@pytest.fixture(scope="module")
def shard_pair(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("pair")
    save_file({"t0": torch.ones(2), "t2": torch.ones(1)}, d / "a.safetensors")
    save_file({"t1": torch.zeros(3)}, d / "b.safetensors")
    (d / "config.json").write_text("{}")
    return d


@FUZZ
@given(index=indexes())
def test_an_index_must_name_exactly_the_tensors_inside_the_folder(shard_pair, index):
    (shard_pair / "model.safetensors.index.json").write_text(index)
    ok = index == json.dumps({"metadata": {}, "weight_map": GOOD})
    try:
        ck = resolve(str(shard_pair)).checkpoint()
    except (CorruptCheckpointError, SourceError) as e:
        assert not ok, e
        assert "\n" not in str(e)
        return
    assert ok and sorted(ck.tensors) == ["t0", "t1", "t2"]
