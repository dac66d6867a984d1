"""Calibration text for `surgeon split --calibrate DATA`, tokenized: one sample per record.

    data = load_calibration_data("default", model_dir)            # the built-in general-knowledge sample
    data = load_calibration_data("task.jsonl", model_dir, max_tokens=16384)
    data.input_ids[0], data.tokens, data.sha256

DATA takes what `surgeon train --data` takes (surgeon.format.datafiles: JSONL read here; .json/.parquet/
.csv files, folders and Hub ids through the optional `datasets` library, streamed: read only as far as
the token budget), in any record format of
surgeon.format.records. Chat records ({"messages"}) and prompt/completion pairs go through the
tokenizer's chat template when it has one (as `surgeon train` renders them); text records are
tokenized as they are. Each record becomes one sample cut to `max_len` tokens; samples are taken in
order until `max_tokens` tokens in all (the last one cut to fit). `sha256` is the hash of the token
ids, sample by sample: the same DATA and tokenizer give the same hash. Errors are one-line UsageErrors.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from surgeon.errors import UsageError
from surgeon.format.datafiles import iter_records
from surgeon.format.records import DataError

DEFAULT = Path(__file__).with_name("calibration_default.jsonl")
EXTRA = "pip install 'surgeon[datasets]'"


@dataclass(frozen=True)
class CalibrationData:
    input_ids: list[torch.Tensor]  # one 1-D LongTensor per sample (one sample per record, truncated)
    sha256: str  # content hash of the token ids (hex)
    tokens: int  # total tokens used
    source: str  # "default" or the DATA string as given


def load_calibration_data(data: str, tokenizer_dir: Path, max_tokens: int = 65536, max_len: int = 512) -> CalibrationData:
    """DATA ("default", a JSONL/JSON/parquet/CSV file, a folder or a dataset id) as token ids."""
    if max_tokens < 1 or max_len < 1:
        raise UsageError(f"--calibrate-tokens must be at least 1 (got {max_tokens}, sample length {max_len}).")
    source = DEFAULT if data == "default" else data
    try:
        records = iter_records(source, extra=EXTRA, option="--calibrate")  # a local file: read only as far as the budget goes
        tok = _tokenizer(Path(tokenizer_dir))
        samples, total = [], 0
        for where, rec in records:
            ids = _ids(tok, rec, f"--calibrate {data}, record {where} (its line or row)")[: min(max_len, max_tokens - total)]
            if ids:
                samples.append(torch.tensor(ids, dtype=torch.long))
                total += len(ids)
            if total >= max_tokens:
                break
    except DataError as e:
        raise UsageError(f"--calibrate {data}: {e}") from None
    if not samples:
        raise UsageError(f"--calibrate {data}: no record gives any token; give text data.")
    return CalibrationData(samples, _hash(samples), total, data)


def _tokenizer(folder: Path):
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many kinds for a folder without a usable tokenizer
        raise UsageError(f"--calibrate needs the model's tokenizer, and {folder} has none transformers can load "
                         f"({type(e).__name__}); add its tokenizer files to the folder.") from None
    finally:
        quiet.setLevel(level)


def _plain(enc) -> list[int]:
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    return [int(i) for i in ids]


def _ids(tok, rec: dict, where: str) -> list[int]:
    """One record's token ids: chat and prompt/completion records through the chat template if any
    (a template that refuses the record, e.g. a system turn Gemma's does not take, is one UsageError)."""
    if "text" in rec:
        return _plain(tok(rec["text"], add_special_tokens=True))
    turns = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]
    if getattr(tok, "chat_template", None):
        try:
            return _plain(tok.apply_chat_template(turns, tokenize=True, return_dict=True))
        except Exception as e:  # jinja2's TemplateError (raise_exception in the template) and what a template trips on
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UsageError(f"{where}: the tokenizer's chat template refused it ({first}); drop or merge that turn, "
                             "or give the text as {\"text\": ...} records.") from None
    return _plain(tok("\n".join(t["content"] for t in turns), add_special_tokens=True))


def _hash(samples: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(len(s).to_bytes(8, "little"))
        h.update(s.numpy().astype("<i8").tobytes())
    return h.hexdigest()
