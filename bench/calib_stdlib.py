"""Calibration text that ships with every Python: the docstrings of ~100 standard-library modules and
their public classes and functions (technical English, PSF licence), as JSONL records {"text": ...}.

    python bench/calib_stdlib.py /tmp/stdlib_docs.jsonl
    python bench/bench_calibrate_cpu.py --calibrate /tmp/stdlib_docs.jsonl --modes kpm --skip-plain

Held out from bench/eval/general_text.txt (numpy's masked-array guide, CPython's licence history, the
Zen of Python: none of them is a docstring read here). The text depends on the Python version
(3.11.7 gave 313 records, 211,502 characters, 53,195 SmolLM2 tokens); surgeon.json records the hash
of the tokens actually used.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys

MODULES = ("argparse json collections functools itertools pathlib subprocess threading logging unittest email http.client csv "
           "datetime decimal fractions heapq random statistics string textwrap zipfile tarfile sqlite3 asyncio concurrent.futures "
           "dataclasses enum typing contextlib shutil tempfile urllib.parse xml.etree.ElementTree difflib calendar codecs locale "
           "gettext pickle copy pprint reprlib weakref abc numbers math cmath hashlib hmac secrets socket ssl select signal mmap "
           "struct array bisect queue sched glob fnmatch linecache filecmp gzip bz2 lzma configparser tomllib base64 binascii "
           "quopri html html.parser mimetypes mailbox wave colorsys turtle cmd shlex tkinter doctest pdb timeit trace tracemalloc "
           "gc inspect site ast dis tokenize keyword platform errno ctypes optparse getopt getpass curses io time os").split()


def docs(name: str) -> list[str]:
    try:
        mod = importlib.import_module(name)
    except Exception:  # noqa: BLE001 (a module this Python lacks, e.g. tkinter without Tk)
        return []
    out = [inspect.getdoc(mod) or ""]
    for attr, obj in list(vars(mod).items())[:60]:
        if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
            d = inspect.getdoc(obj)
            if d and len(d) > 200:
                out.append(d)
    return [d.strip()[:2000] for d in out if len(d.strip()) >= 200]


def main() -> None:
    with open(sys.argv[1], "w") as f:
        for name in MODULES:
            for d in docs(name):
                f.write(json.dumps({"text": d}) + "\n")


if __name__ == "__main__":
    main()
