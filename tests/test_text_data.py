"""Plain text files (.txt, .md) as data for `surgeon split --calibrate` and `surgeon train --data`:
paragraphs as {"text"} records, long ones cut at line breaks, read without `datasets`."""

from __future__ import annotations

import pytest

from surgeon.format.datafiles import load_records, load_text
from surgeon.format.records import DataError


def test_paragraphs_are_records_with_their_first_line(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("First line.\nsecond line.\n\n\n  \nAnother paragraph.\n\nLast one, no newline", encoding="utf-8")
    assert load_records(f) == [(1, {"text": "First line.\nsecond line."}), (6, {"text": "Another paragraph."}),
                                (8, {"text": "Last one, no newline"})]


def test_a_long_paragraph_is_cut_at_line_breaks(tmp_path):
    lines = [f"line {i:03d} " + "x" * 40 for i in range(100)]  # 100 lines of 49 characters, no blank line
    f = tmp_path / "play.md"
    f.write_text("\n".join(lines), encoding="utf-8")
    recs = load_text(f, chars=500)
    texts = [r["text"] for _, r in recs]
    assert "\n".join(texts) == "\n".join(lines)  # nothing lost, nothing repeated
    assert all(len(t) <= 500 for t in texts) and len(texts) == 10  # 10 lines (490 characters) a record
    assert [n for n, _ in recs] == [1 + 10 * i for i in range(10)]


def test_one_line_longer_than_the_cut_stays_whole(tmp_path):
    f = tmp_path / "wide.txt"
    f.write_text("short\n" + "y" * 3000 + "\nshort again\n", encoding="utf-8")
    assert [len(r["text"]) for _, r in load_text(f)] == [5, 3000, 11]


@pytest.mark.parametrize("content, why", [(b"", "holds no text"), (b"\n \n\n", "holds no text"), (b"caf\xe9\n", "not UTF-8")])
def test_empty_or_undecodable_text_is_one_data_error(tmp_path, content, why):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=why) as e:
        load_records(f)
    assert "\n" not in str(e.value)


def test_calibration_reads_a_text_file(smollm2, tmp_path):
    from surgeon.model.calibration import load_calibration_data

    f = tmp_path / "cal.txt"
    f.write_text("The river runs to the sea.\n\nWater boils at one hundred degrees Celsius at sea level.\n", encoding="utf-8")
    d = load_calibration_data(str(f), smollm2)
    assert len(d.input_ids) == 2 and d.tokens == sum(len(x) for x in d.input_ids) > 10


def test_calibration_reads_a_file_only_as_far_as_its_token_budget(smollm2, tmp_path):
    """A big JSONL (or text) is not read whole for a few hundred tokens: a line past the budget that is
    not JSON is never reached (it was, and failed the run, when every record was loaded first)."""
    from surgeon.model.calibration import load_calibration_data

    f = tmp_path / "big.jsonl"
    f.write_text("".join('{"text": "The river runs to the sea through the valley."}\n' for _ in range(50)) + "not json\n", encoding="utf-8")
    d = load_calibration_data(str(f), smollm2, max_tokens=64)
    assert d.tokens == 64
    t = tmp_path / "big.txt"
    t.write_text("A paragraph of plain text.\n\n" * 50 + "caf\xe9".encode("latin-1").decode("latin-1"), encoding="latin-1")
    assert load_calibration_data(str(t), smollm2, max_tokens=32).tokens == 32  # the undecodable tail is never read
