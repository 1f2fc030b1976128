"""Question / answer data sets from JSONL, JSON or Parquet files (docs/data.md).

``read_dataset`` returns one ``{"question": str, "answer": str, "answer_text": str, ...}`` per row:
``question`` and ``answer_text`` are the row's question and answer fields as written, ``answer``
the *reference answer* graders compare with (``reference_from_text``), and the row's other columns
are kept under their own names. The arithmetic task's own files (``{"question", "answer"}`` JSONL)
read back unchanged.

Formats, by file suffix:

* ``.jsonl`` / ``.ndjson``: one JSON object per line (blank lines skipped);
* ``.json``: a list of objects, or an object holding that list under one of ``LIST_KEYS``
  (``data``, ``rows``, ``examples``, ...); a ``.json`` file that is really JSON lines reads as JSONL;
* ``.parquet``: read with ``pyarrow``.

Fields: the first of ``QUESTION_FIELDS`` / ``ANSWER_FIELDS`` that the first row has (names compared
case-insensitively), or the ones given. A row without them is refused with a ValueError that names
the row and the columns it has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

QUESTION_FIELDS = ("question", "problem", "prompt", "input")
ANSWER_FIELDS = ("answer", "final_answer", "solution", "target")
"""Searched in this order: a short ``answer`` / ``final_answer`` wins over a worked ``solution``."""
LIST_KEYS = ("data", "rows", "examples", "instances", "items", "questions", "problems", "test", "train")
"""Keys under which a ``.json`` object may hold its list of rows."""
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}

_GSM8K_MARK = "####"
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces kept;
    None when there is none or its braces never close."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def reference_from_text(answer: Any) -> str:
    """The reference answer in a data set's answer field: after the last ``####`` (GSM8K, thousands
    commas dropped: ``#### 1,000`` → ``1000``), else the content of the last ``\\boxed{}`` (MATH),
    else the answer as given (stripped)."""
    text = str(answer).strip()
    if _GSM8K_MARK in text:
        return _THOUSANDS_RE.sub("", text.rsplit(_GSM8K_MARK, 1)[1].strip())
    boxed = last_boxed(text)
    return text if boxed is None else boxed


def _pick(keys: list[str], given: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    if given is not None:
        if given not in keys:
            raise ValueError(f"{where}: no {what} field {given!r}; the columns are {keys}")
        return given
    lower = {k.lower(): k for k in reversed(keys)}  # first spelling wins
    for name in candidates:
        if name in lower:
            return lower[name]
    raise ValueError(f"{where}: found no {what} field (looked for {', '.join(candidates)}); the columns are {keys}; "
                     f"name it with --{what}-field")


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                where = f"{path}:{line_no}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not a JSON object ({e})") from None


def _json(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise ValueError(f"{path}: not JSON ({e})") from None
        yield from _jsonl(path)  # JSON lines saved as .json
        return
    if isinstance(data, dict):
        key = next((k for k in LIST_KEYS if isinstance(data.get(k), list)), None)
        if key is None:
            raise ValueError(f"{path}: a JSON object must hold its rows as a list under one of {list(LIST_KEYS)}; "
                             f"it has keys {list(data)}")
        data = data[key]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}: row {i}", row


def _parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path}: row {i}", row
            i += 1


def _raw_rows(path: Path) -> Iterator[tuple[str, Any]]:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown data set format {path.suffix!r}; use one of {sorted(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"no data set at {path}")
    return {"jsonl": _jsonl, "json": _json, "parquet": _parquet}[kind](path)


def read_dataset(path: str | Path, question_field: str | None = None, answer_field: str | None = None,
                 limit: int | None = None) -> list[dict]:
    """The first ``limit`` rows (all when None) of a JSONL, JSON or Parquet data set as
    ``{"question", "answer", "answer_text", <other columns>}``; see the module docstring."""
    path = Path(path)
    rows: list[dict] = []
    fields: tuple[str, str] | None = None
    for where, raw in islice(_raw_rows(path), limit):
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object with a question and an answer, got {type(raw).__name__}")
        keys = list(raw)
        if fields is None:
            fields = (_pick(keys, question_field, QUESTION_FIELDS, "question", where),
                      _pick(keys, answer_field, ANSWER_FIELDS, "answer", where))
        q_field, a_field = fields
        missing = [f for f in fields if raw.get(f) is None]
        if missing:
            raise ValueError(f"{where}: no {missing[0]!r} field; this row has {keys}")
        question, answer = raw[q_field], raw[a_field]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: the question ({q_field!r}) must be non-empty text, got {question!r:.80}")
        if isinstance(answer, (dict, list)):
            raise ValueError(f"{where}: the answer ({a_field!r}) must be text or a number, got {type(answer).__name__}")
        reference = reference_from_text(answer)
        if not reference:
            raise ValueError(f"{where}: the answer ({a_field!r}) gives an empty reference answer: {str(answer)[-80:]!r}")
        rows.append({**raw, "question": question, "answer": reference, "answer_text": str(answer)})
    return rows
