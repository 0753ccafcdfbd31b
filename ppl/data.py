"""Data binding: CSV / JSON files and `--set` values -> arrays checked against
the model's `data` declarations.

Stage: (data declarations from the AST, file paths, --set pairs) -> `DataSet`
(numpy arrays by name, dimension sizes by symbol, level labels).

Decisions (also in README.md):
- CSV has a header row and is read by column name; unknown columns are ignored.
  A column that appears in several CSV files is taken from the first.
- JSON is Stan/posteriordb style: names to scalars or (nested) arrays.
- `level[N] of K`: labels that are all whole numbers within 1..K, where K is
  already given (JSON or --set), are used as they are.  Otherwise the distinct
  labels are sorted (numerically when all are numbers, else as strings) and
  numbered 1..K in that order; K is bound to their count.
- `from "pattern"` gathers, in file order, every CSV column whose name matches
  the glob pattern (fnmatch, case-sensitive); a JSON file or object that has the
  declaration's own name gives the matrix whole instead.
- A dimension symbol is bound by the first source that fixes it (scalars in
  JSON / --set first, then data in declaration order); every later use must agree.
- Before a file is read, its first SNIFF_BYTES are looked at: a spreadsheet
  (.xlsx/.ods/.xls), a compressed or binary file, UTF-16 text, or a table
  separated by ';' or tabs (perhaps with decimal commas) is refused with what to
  do instead.  A CSV with decimal commas *and* ',' separators cannot be told
  apart reliably and is not guessed at.
- A CSV over FAST_CSV_BYTES is streamed (`_stream_columns`): only the columns the
  declarations take, chunk by chunk, into one preallocated array each; its faults
  are located and ordered as the careful whole-file reader (`_read_csv`) does.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Dict, List, Optional, Sequence

import numpy as np

from .errors import Diagnostic, PplError, Source, Span, UsageError, did_you_mean, read_source
from .frontend import ast as A
from .frontend.rows import lead_symbol

_NUMERIC_BASES = {"real", "int"}


@dataclass
class DataSet:
    values: Dict[str, np.ndarray] = field(default_factory=dict)
    dims: Dict[str, int] = field(default_factory=dict)
    dim_origin: Dict[str, str] = field(default_factory=dict)
    levels: Dict[str, List[str]] = field(default_factory=dict)
    filled: List[str] = field(default_factory=list)     # names filled in by `fill_missing`
    rows: Optional["RowShare"] = None   # a data-parallel fit where each process read its own rows


# ---- reading files -----------------------------------------------------------
@dataclass
class _Csv:
    path: str
    source: Source
    header: List[str]
    columns: Dict[str, int]
    rows: List[List[str]]
    lines: List[int]              # file line of each row (a streamed file: of its faulty rows, by row)
    stream: Optional["_Stream"] = None     # a large file: header read, needed columns streamed (rows unread)

    def cell_span(self, row: int, col: int) -> Span:
        line = self.lines[row]
        text = self.source.line(line)
        start = 1
        parts = text.split(",")
        for p in parts[:col]:
            start += len(p) + 1
        width = len(parts[col]) if col < len(parts) else 1
        return Span(self.source, line, start, line, start + max(1, width))

    def header_span(self, col: int) -> Span:
        return _Csv.cell_span(_HeaderView(self), 0, col)


class _HeaderView:
    def __init__(self, t: _Csv):
        self.source, self.lines = t.source, [1]


@dataclass
class _Json:
    path: str
    source: Source
    obj: dict

    def key_span(self, key: str) -> Span:
        text = self.source.text
        i = text.find(json.dumps(key))
        if i < 0:
            return Span(self.source, 1, 1, 1, 2)
        line = text.count("\n", 0, i) + 1
        col = i - (text.rfind("\n", 0, i) + 1) + 1
        return Span(self.source, line, col, line, col + len(json.dumps(key)))


def _fail(span: Optional[Span], msg: str, path: Optional[str] = None):
    raise PplError([Diagnostic(span, msg, path)])


def _read_text(path: str) -> Source:
    src = read_source(path, "data")
    text = src.text
    if "\0" in text:
        before = text[: text.index("\0")]
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        _fail(Span(Source(path, text), line, col, line, col + 1), "a NUL byte in a text data file")
    return Source(path, text)


def _read_csv(path: str, src: Source) -> _Csv:
    if not src.text.strip():
        _fail(None, "the file is empty (a CSV needs a header row)", path)
    reader = csv.reader(io.StringIO(src.text), strict=True)
    rows, lines = [], []
    start = 1                     # file line where the next record starts
    try:
        header = next(reader)
        header_line = start = reader.line_num
        start += 1
        for r in reader:
            start = reader.line_num + 1
            if not r or (len(r) == 1 and not r[0].strip()):
                continue   # blank line
            rows.append(r)
            lines.append(reader.line_num)
    except csv.Error as e:
        text = src.line(start)
        col = text.find('"') + 1 or 1
        msg = "a quoted field is not closed before the end of the file" if "end of data" in str(e) \
            else f"malformed CSV: {e}"
        _fail(Span(src, start, col, start, col + 1), msg)
    header = [h.strip() for h in header]
    t = _Csv(path, src, header, {}, rows, lines)
    for j, h in enumerate(header):
        if not h:
            _fail(_Csv.cell_span(_HeaderView(t), 0, j), f"column {j + 1} has an empty name in the header")
        if h in t.columns:
            _fail(_Csv.cell_span(_HeaderView(t), 0, j), f"column '{h}' appears twice in the header")
        t.columns[h] = j
    n = len(header)
    for i, r in enumerate(rows):
        if len(r) != n:
            line = lines[i]
            _fail(Span(src, line, 1, line, max(2, len(src.line(line)) + 1)),
                  f"row {i + 1} has {len(r)} field{'s' if len(r) != 1 else ''}, but the header has {n}")
    if not rows:
        _fail(Span(src, header_line, 1, header_line, 2), "the file has a header but no rows")
    return t


def _read_json(path: str, src: Source) -> _Json:
    try:
        obj = json.loads(src.text, parse_constant=lambda c: float(c))
    except json.JSONDecodeError as e:
        _fail(Span(src, e.lineno, e.colno, e.lineno, e.colno + 1), f"invalid JSON: {e.msg}")
    except RecursionError:
        _fail(None, "invalid JSON: nested too deeply", path)
    if not isinstance(obj, dict):
        _fail(Span(src, 1, 1, 1, 2), "a JSON data file must hold an object of names to values")
    return _Json(path, src, obj)


FAST_CSV_BYTES = 1 << 20         # larger CSV files are streamed (below: the careful reader, whole)
STREAM_CHUNK_BYTES = 8 << 20     # one chunk of a streamed file (the bounded buffer beyond the data)


class _SparseSource(Source):
    """The few lines of a streamed file that messages quote (the header, faulty rows)."""

    def __init__(self, path: str, lines: Dict[int, str]):
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "text", "")
        object.__setattr__(self, "quoted", lines)

    def line(self, lineno: int) -> str:
        return self.quoted.get(lineno, "").rstrip("\r")


@dataclass
class _Need:
    """One declaration's columns of a streamed CSV: its array, filled chunk by chunk, and the first
    fault of each kind the careful reader would report (a cell that is no finite number, a
    non-integer for an int, a violation per literal bound), as (row, column, cell text, value)."""
    decl: A.DataDecl
    cols: List[int]
    out: Optional[np.ndarray] = None
    bad: Optional[tuple] = None
    nonint: Optional[tuple] = None
    bounds: List = field(default_factory=list)       # (key, limit, first violation or None)


@dataclass
class _Stream:
    header_line: int              # file line of the header's last physical line
    body: int                     # byte offset where the rows start
    end: Optional[int] = None     # byte offset where they end (None: the end of the file; a row range)
    needs: Dict[str, _Need] = field(default_factory=dict)
    rows: int = 0
    plain: bool = False           # a row range: a quote anywhere sends the file to the whole-file reader


class _Fallback(Exception):
    """The stream met what only the careful whole-file reader reports exactly (bad UTF-8, a NUL byte,
    malformed quoting)."""


def _read_csv_head(path: str) -> Optional[_Csv]:
    """A large CSV's header only (its rows are streamed by `_stream_columns` once the declarations say
    which columns they need); None where the careful reader must read it whole (a header it would
    refuse, a file that is not a CSV table)."""
    try:
        with open(path, "rb") as f:
            head = f.read(min(STREAM_CHUNK_BYTES, 1 << 16))
            while b"\n" not in head:
                more = f.read(1 << 16)
                if not more:
                    return None
                head += more
        cut = head.index(b"\n") + 1
        bom = 3 if head.startswith(b"\xef\xbb\xbf") else 0
        first = head[bom:cut].decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if '"' in first or "\0" in first or not first.strip() or first.lstrip().startswith("{"):
        return None
    header = [h.strip() for h in first.rstrip("\r\n").split(",")]
    if not all(header) or len(set(header)) != len(header):
        return None
    src = _SparseSource(path, {1: first.rstrip("\n")})
    return _Csv(path, src, header, {h: j for j, h in enumerate(header)}, [], {}, stream=_Stream(1, cut))


def _blocks(path: str, start: int, end: Optional[int] = None):
    """The file's bytes from `start` (to `end`: a row range) in blocks of STREAM_CHUNK_BYTES at most."""
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start if end is not None else None
        while left is None or left > 0:
            b = f.read(STREAM_CHUNK_BYTES if left is None else min(STREAM_CHUNK_BYTES, left))
            if not b:
                return
            if left is not None:
                left -= len(b)
            yield b


def _count_lines(path: str, start: int, end: Optional[int] = None) -> int:
    n, last = 0, b"\n"
    for b in _blocks(path, start, end):
        n += b.count(b"\n")
        last = b[-1:]
    return n + (last != b"\n")


def _chunks(path: str, start: int, end: Optional[int] = None):
    """(text, bytes) pieces of the file from `start` (to `end`), each ending at a line end outside quotes."""
    rest = b""
    for b in _blocks(path, start, end):
        buf = rest + b
        cut = buf.rfind(b"\n") + 1
        while cut and buf.count(b'"', 0, cut) % 2:        # a quoted field spans the cut: move it on
            cut = buf.rfind(b"\n", 0, cut - 1) + 1
        if not cut:
            rest = buf
            continue
        yield buf[:cut]
        rest = buf[cut:]
    if rest:
        yield rest


def _stream_columns(c: _Csv, needs: List[_Need]) -> None:
    """Parse the needed columns of a large CSV chunk by chunk into preallocated float64 arrays: numpy's
    C parser for plain chunks, the csv module (as the careful reader) for a chunk with quotes, a row of
    the wrong width, a blank line or a cell that is not a number.  A row of the wrong width raises here,
    as the careful reader does; cell faults are kept on their `_Need` for the binder to report in the
    careful reader's order.  Raises _Fallback where only the careful reader's messages are exact."""
    st = c.stream
    n_cols = len(c.header)
    use = sorted({j for nd in needs for j in nd.cols})
    pos = {j: k for k, j in enumerate(use)}
    upper = _count_lines(c.path, st.body, st.end)
    for nd in needs:
        shape = (upper,) if nd.decl.pattern is None else (upper, len(nd.cols))
        nd.out = np.empty(shape, dtype=np.float64)
        nd.bounds = [(b.key, _literal(b.value), None) for b in nd.decl.type.bounds
                     if b.key in ("lower", "upper") and _literal(b.value) is not None]
    line0, row0, width_fault = st.header_line + 1, 0, None
    for raw in _chunks(c.path, st.body, st.end):
        if b"\0" in raw or (st.plain and b'"' in raw):
            raise _Fallback
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Fallback from None
        got = None if b'"' in raw else _plain_chunk(raw, text, n_cols, use, line0)
        if got is None:
            vals, bad, cells, wf = _careful_chunk(text, line0, row0, n_cols, use)
            width_fault = width_fault or wf
        else:
            vals, bad, cells = got
        n = vals.shape[0]
        for nd in needs:
            _record(nd, vals[:, [pos[j] for j in nd.cols]], row0, bad, cells, c, pos)
        row0 += n
        line0 += raw.count(b"\n")
    if width_fault:
        line, i, k, text = width_fault
        c.source.quoted[line] = text
        _fail(Span(c.source, line, 1, line, max(2, len(c.source.line(line)) + 1)),
              f"row {i + 1} has {k} field{'s' if k != 1 else ''}, but the header has {n_cols}")
    if row0 == 0:
        _fail(Span(c.source, st.header_line, 1, st.header_line, 2), "the file has a header but no rows")
    st.rows = row0
    for nd in needs:
        nd.out = nd.out[:row0]


def _plain_chunk(raw: bytes, text: str, n_cols: int, use: List[int], line0: int):
    """numpy's parser on a chunk with no quotes whose every line has the header's width; None when the
    careful path must look (a blank line, a row of another width, a cell that is not a finite number)."""
    a = np.frombuffer(raw, dtype=np.uint8)
    ends = np.flatnonzero(a == 10)
    if not raw.endswith(b"\n"):
        ends = np.append(ends, len(a))
    commas = np.flatnonzero(a == 44)
    per_line = np.diff(np.searchsorted(commas, ends), prepend=0)
    starts = np.concatenate([[0], ends[:-1] + 1])
    if np.any(per_line != n_cols - 1) or np.any(ends - starts <= (1 if n_cols == 1 else 0)):
        return None
    if not use:
        return np.empty((len(ends), 0)), {}, None
    try:
        vals = np.loadtxt(io.StringIO(text), delimiter=",", usecols=use, dtype=np.float64, ndmin=2,
                          comments=None, quotechar=None)
    except ValueError:
        return None
    if vals.shape[0] != len(ends) or not np.isfinite(vals).all():
        return None

    def cell(r: int, j: int):
        line = raw[starts[r]:ends[r]].decode("utf-8").rstrip("\r")
        return line, line.split(",")[j], line0 + r
    return vals, {}, cell


def _careful_chunk(text: str, line0: int, row0: int, n_cols: int, use: List[int]):
    """The careful reader's rules on one chunk: csv records (blank lines skipped), the first row of the
    wrong width, and each used cell as `float` reads it (NaN, with its text, where it is not a finite
    number)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    vals, lines, texts, bad, width_fault = [], [], [], {}, None
    try:
        for r in reader:
            if not r or (len(r) == 1 and not r[0].strip()):
                continue
            i = len(vals)
            if len(r) != n_cols:
                if width_fault is None:
                    ln = line0 + reader.line_num - 1
                    width_fault = (ln, row0 + i, len(r), text.split("\n")[reader.line_num - 1])
                vals.append([math.nan] * len(use))
            else:
                row = []
                for k, j in enumerate(use):
                    x = r[j]
                    try:
                        v = float(x)
                    except ValueError:
                        v = math.nan
                    if not math.isfinite(v):
                        bad[(i, j)] = x
                        v = math.nan
                    row.append(v)
                vals.append(row)
            lines.append(reader.line_num)
            texts.append(r)
    except csv.Error:
        raise _Fallback from None
    split = None

    def cell(i: int, j: int):
        nonlocal split
        if split is None:
            split = text.split("\n")
        return split[lines[i] - 1].rstrip("\r"), texts[i][j], line0 + lines[i] - 1
    arr = np.asarray(vals, dtype=np.float64).reshape(len(vals), len(use))
    return arr, bad, cell, width_fault


def _record(nd: _Need, block: np.ndarray, row0: int, bad: dict, cell, c: _Csv, pos) -> None:
    """Keep, for one declaration, the first fault of each kind in this chunk (if none earlier)."""
    flat = block.reshape(block.shape[0], -1)

    if nd.out.ndim == 2:
        nd.out[row0:row0 + block.shape[0]] = block
    else:
        nd.out[row0:row0 + block.shape[0]] = block[:, 0]

    def keep(i: int, k: int, value: float):
        j = nd.cols[k]
        line_text, x, line = cell(i, j)
        return (row0 + i, j, x, value, line, line_text)
    if nd.bad is None and bad:
        first = min(((i, nd.cols.index(j)) for (i, j) in bad if j in nd.cols), default=None)
        if first is not None:
            nd.bad = keep(first[0], first[1], math.nan)
    if nd.bad is not None:
        return
    fin = np.isfinite(flat)
    if nd.nonint is None and nd.decl.type.base == "int":
        hit = np.flatnonzero(fin & (flat != np.round(flat)))
        if hit.size:
            i, k = divmod(int(hit[0]), flat.shape[1])
            nd.nonint = keep(i, k, float(flat[i, k]))
    for b, (key, lim, first) in enumerate(nd.bounds):
        if first is None:
            hit = np.flatnonzero(fin & ((flat < lim) if key == "lower" else (flat > lim)))
            if hit.size:
                i, k = divmod(int(hit[0]), flat.shape[1])
                nd.bounds[b] = (key, lim, keep(i, k, float(flat[i, k])))


# ---- files that are not what ppl reads (spreadsheets, other separators, binary) ----
SNIFF_BYTES = 8192               # detection looks at the head of a file only (large files stay fast)


def _sniff(path: str, ext: str) -> None:
    """Refuse, with what to do instead, a file ppl cannot read as CSV / JSON: a spreadsheet, compressed
    or binary data, UTF-16 text, a ';'- or tab-separated table.  Reads the first SNIFF_BYTES only;
    a file that cannot be opened is left to the reader (which reports it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
            complete = not f.read(1)
    except OSError:
        return
    msg = _binary_kind(head, path)
    if msg:
        _fail(None, msg, path)
    if ext != ".json":
        _separator(path, head, complete)


def _binary_kind(head: bytes, path: str) -> Optional[str]:
    """A message for a head of bytes that is not UTF-8 text, or None (text, perhaps with a stray bad byte,
    which the text reader locates)."""
    if head.startswith(b"PK\x03\x04"):
        if b"xl/" in head:
            return "this is an Excel workbook, not a CSV file; export it as CSV (File > Save As > CSV)"
        if b"opendocument.spreadsheet" in head:
            return "this is an OpenDocument spreadsheet, not a CSV file; export it as CSV (File > Save As > CSV)"
        return "this is a zip archive, not a CSV file; unzip it and give the CSV inside"
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return "this is an Excel workbook (.xls), not a CSV file; export it as CSV (File > Save As > CSV)"
    if head.startswith(b"\x1f\x8b"):
        return "this is a gzip-compressed file; decompress it first (gunzip)"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or _utf16_without_bom(head):
        out = shlex.quote(os.path.splitext(path)[0] + "_utf8.csv")
        return (f"this file is UTF-16 text; ppl reads UTF-8: convert it with "
                f"iconv -f UTF-16 -t UTF-8 {shlex.quote(path)} > {out}")
    if not head:
        return None
    controls = sum(head.count(b) for b in _CONTROL_BYTES)
    if controls > max(1, len(head) // 200):
        return "this is not a text file; ppl reads CSV or JSON text"
    text = head.decode("utf-8", "replace")
    bad = text.count("\ufffd") - head.decode("utf-8", "ignore").count("\ufffd")
    if bad > max(8, len(text) // 10):
        return "this file is not UTF-8 text (another encoding, or binary); save it as UTF-8 ('CSV UTF-8')"
    return None


def _utf16_without_bom(head: bytes) -> bool:
    """Mostly ASCII text with a NUL byte after (or before) every character."""
    if len(head) < 8:
        return False
    for enc, zeros in (("utf-16-le", head[1::2]), ("utf-16-be", head[0::2])):
        if zeros.count(0) > len(zeros) * 0.9:
            text = head[: len(head) // 2 * 2].decode(enc, "replace")
            if sum(c.isprintable() or c.isspace() for c in text) > 0.9 * len(text):
                return True
    return False


_CONTROL_BYTES = [bytes([b]) for b in range(32) if b not in (9, 10, 11, 12, 13, 27)]


def _separator(path: str, head: bytes, complete: bool) -> None:
    """A table with ';' or tab between fields (and perhaps ',' as the decimal mark): a located error at the
    header's first separator, or at the first decimal comma."""
    text = head.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if not complete:
        lines = lines[:-1]                     # the last line may be cut short
    lines = [ln.rstrip("\r") for ln in lines]
    first = next((k for k, ln in enumerate(lines) if ln.strip()), None)
    if first is None:
        return
    header = lines[first]
    for sep, word in ((";", "';'-separated"), ("\t", "tab-separated")):
        fields = _fields(header, sep)
        if sum(1 for f in fields if f.strip()) < 2 or len(_fields(header, ",")) > 1:
            continue
        src = Source(path, text)
        dec = None
        for k in range(first + 1, len(lines)):
            cells = _fields(lines[k], sep)
            j = next((j for j, c in enumerate(cells) if _DECIMAL_COMMA.match(c.strip())), None)
            if j is not None:
                dec = (k, j)
                break
        q = shlex.quote(path)
        out = shlex.quote(os.path.splitext(path)[0] + "_fixed.csv")
        tr_sep = "\\t" if sep == "\t" else sep
        if dec is None:
            col = header.index(sep) + 1
            _fail(Span(src, first + 1, col, first + 1, col + 1),
                  f"this file looks {word}; ppl reads ','-separated files: convert it with "
                  f"tr '{tr_sep}' ',' < {q} > {out}")
        k, j = dec
        parts = lines[k].split(sep)           # columns as written (quotes and all)
        col = sum(len(c) + 1 for c in parts[:j]) + 1 if j < len(parts) else 1
        width = len(parts[j]) if j < len(parts) else 1
        _fail(Span(src, k + 1, col, k + 1, col + max(1, width)),
              f"this file looks {word} with decimal commas; ppl reads ','-separated files with '.' decimals: "
              f"convert it with tr ',{tr_sep}' '.,' < {q} > {out}")


_DECIMAL_COMMA = re.compile(r"^[-+]?\d*,\d+([eE][-+]?\d+)?$")


def _fields(line: str, sep: str) -> List[str]:
    try:
        return next(csv.reader([line], delimiter=sep), [])
    except csv.Error:
        return line.split(sep)


def _read(path: str):
    ext = os.path.splitext(path)[1].lower()
    _sniff(path, ext)
    try:
        big = ext != ".json" and os.path.getsize(path) > FAST_CSV_BYTES
    except OSError:
        big = False
    if big:
        head = _read_csv_head(path)
        if head is not None:
            return head
    src = _read_text(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json" or (ext != ".csv" and src.text.lstrip().startswith("{")):
        return _read_json(path, src)
    return _read_csv(path, src)


# ---- converting values -------------------------------------------------------
def parse_sets(sets: Sequence[str]) -> Dict[str, float]:
    """`--set NAME=VALUE` pairs -> {name: finite number}; a malformed pair is a usage error (exit 2)."""
    out: Dict[str, float] = {}
    for s in sets:
        k, eq, v = s.partition("=")
        k = k.strip()
        if not eq or not k:
            raise UsageError(f"--set {s!r} is not NAME=VALUE")
        try:
            val = float(v)
        except ValueError:
            raise UsageError(f"--set {k}={v}: {v!r} is not a number") from None
        if not math.isfinite(val):
            raise UsageError(f"--set {k}={v}: the value must be a finite number")
        out[k] = val
    return out


class _Binder:
    def __init__(self, decls: Sequence[A.DataDecl], files: Sequence[str], sets: Sequence[str], dim_symbols,
                 objects: Sequence[dict] = (), tables=None):
        self.decls = list(decls)
        self.sets: Dict[str, float] = parse_sets(sets)
        self.tables = list(tables or [])         # (read already: a process's row range, `_range_table`)
        for p in (files if tables is None else ()):   # in order: a file's faults come before a later file is read
            t = _read(p)
            self.tables.append(self._stream(t) if isinstance(t, _Csv) and t.stream is not None else t)
        self.tables += [_from_object(o, i) for i, o in enumerate(objects)]
        self.csvs = [t for t in self.tables if isinstance(t, _Csv)]
        self.jsons = [t for t in self.tables if isinstance(t, _Json)]
        self.out = DataSet()
        self.dim_symbols = set(dim_symbols)

    # dimension symbols -----------------------------------------------------
    def bind(self, sym: str, n: int, origin: str, span: Optional[Span], path: Optional[str] = None):
        d = self.out
        if sym in d.dims and d.dims[sym] != n:
            _fail(span, f"{origin} gives {sym} = {n}, but {d.dim_origin[sym]} gives {sym} = {d.dims[sym]}", path)
        if sym not in d.dims:
            d.dims[sym] = n
            d.dim_origin[sym] = origin

    def bind_scalars(self):
        declared = {d.name for d in self.decls}
        for j in self.jsons:
            for k, v in j.obj.items():
                if k in self.dim_symbols and k not in declared:
                    self._bind_scalar(k, v, f"'{k}' in {j.path}", j.path, j.key_span(k))
        for k, v in self.sets.items():
            if k in self.dim_symbols and k not in declared:
                self._bind_scalar(k, v, f"--set {k}", "--set")

    def _bind_scalar(self, k, v, origin, path, span=None):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < 0:
            _fail(span, f"the size {k} must be a non-negative whole number, got {json.dumps(v)}", path)
        self.bind(k, int(v), origin, None, path)

    # one declaration ---------------------------------------------------------
    def has(self, d: A.DataDecl) -> bool:
        """Some file, object or --set gives `d`."""
        if d.pattern is not None and not any(d.name in j.obj for j in self.jsons):
            return any(fnmatchcase(h, d.pattern) for c in self.csvs for h in c.header)
        return any(d.name in j.obj for j in self.jsons) or any(d.name in c.columns for c in self.csvs) \
            or d.name in self.sets

    def load(self, d: A.DataDecl):
        t = d.type
        if d.pattern is not None and not any(d.name in j.obj for j in self.jsons):   # (JSON: the matrix by name)
            return self._load_pattern(d)
        for j in self.jsons:
            if d.name in j.obj:
                return self._load_json(d, j)
        for c in self.csvs:
            if d.name in c.columns:
                if not t.dims:
                    _fail(d.name_span, f"'{d.name}' is declared a scalar, but {c.path} has it as a column; "
                          f"give a scalar in JSON or with --set {d.name}=VALUE")
                if len(t.dims) != 1:
                    _fail(d.name_span, f"'{d.name}' has {len(t.dims)} dimensions; a CSV column gives one "
                          f"(use `from \"pattern\"` to gather several columns)")
                return self._load_column(d, c)
        if d.name in self.sets:
            if t.dims:
                _fail(d.name_span, f"'{d.name}' is an array; --set gives only scalars")
            return self._finish(d, np.asarray(self.sets[d.name]), None, "--set",
                                lambda i: (None, f"{d.name}={self.sets[d.name]:g}"))
        where = []
        for c in self.csvs:
            where.append(f"{c.path} has columns " + ", ".join(c.header[:8]) + (" ..." if len(c.header) > 8 else ""))
        for j in self.jsons:
            where.append(f"{j.path} has keys " + ", ".join(list(j.obj)[:8]) + (" ..." if len(j.obj) > 8 else ""))
        options = [h for c in self.csvs for h in c.header] + [k for j in self.jsons for k in j.obj] + list(self.sets)
        hint = did_you_mean(d.name, options)
        if not self.tables and not self.sets:
            msg = f"no data given for '{d.name}'"
        else:
            msg = f"no column or key named '{d.name}'{hint}" + ((" (" + "; ".join(where) + ")") if where else "")
        _fail(d.name_span, msg)

    def _stream(self, t: _Csv) -> _Csv:
        """Stream the columns of a large CSV that the declarations will take from it (numbers only: a
        column of level labels, or a stream that meets what only the careful reader reports exactly,
        sends the file to the careful reader, whole)."""
        prior = [x for x in self.tables if isinstance(x, _Csv)]
        needs = []
        for d in self.decls:
            if d.pattern is not None:
                if len(d.type.dims) != 2 or any(fnmatchcase(h, d.pattern) for x in prior for h in x.header):
                    continue
                cols = [j for j, h in enumerate(t.header) if fnmatchcase(h, d.pattern)]
            else:
                if d.name not in t.columns or len(d.type.dims) != 1 or any(d.name in x.columns for x in prior):
                    continue
                cols = [t.columns[d.name]]
            if not cols:
                continue
            if d.type.base not in _NUMERIC_BASES:
                return _read_csv(t.path, _read_text(t.path))
            needs.append(_Need(d, cols))
        try:
            _stream_columns(t, needs)
        except _Fallback:
            return _read_csv(t.path, _read_text(t.path))
        t.stream.needs = {nd.decl.name: nd for nd in needs}
        return t

    def _streamed(self, d: A.DataDecl, c: _Csv, origin: str) -> np.ndarray:
        """A streamed declaration's array; its faults reported as the careful reader would, in its order
        (a cell that is no finite number, a non-integer, the sizes, the bounds)."""
        nd = c.stream.needs[d.name]

        def where_of(f):
            row, j, _, _, line, text = f
            c.lines[row] = line
            c.source.quoted[line] = text
            return lambda i: (c.cell_span(row, j), f"row {row + 1}, column '{c.header[j]}'")
        for f in (nd.bad, nd.nonint):
            if f is not None:
                self._convert(d, [f[2]], where_of(f))
        self._bind_dims(d, nd.out.shape, origin, c.path, c.header_span(nd.cols[0]))
        for _, _, f in nd.bounds:
            if f is not None:
                self._finish(d, np.asarray([f[3]]), None, c.path, where_of(f))
        return nd.out

    def _fast(self, d: A.DataDecl, c: _Csv, cols) -> Optional[np.ndarray]:
        """Values from a streamed table (faults raised as located errors), or None: the careful path."""
        if c.stream is None or d.name not in c.stream.needs:
            return None
        what = f"column '{d.name}'" if d.pattern is None else f"columns matching \"{d.pattern}\""
        return self._streamed(d, c, f"{what} in {c.path}")

    def _careful(self, c: _Csv) -> _Csv:
        """Swap a streamed table for the careful reader's (which locates every fault)."""
        if c.stream is None:
            return c
        slow = _read_csv(c.path, _read_text(c.path))
        self.csvs[self.csvs.index(c)] = slow
        return slow

    def _load_column(self, d: A.DataDecl, c: _Csv):
        j = c.columns[d.name]
        arr = self._fast(d, c, j)
        if arr is not None:
            self._bind_dims(d, arr.shape, f"column '{d.name}' in {c.path}", c.path, None)
            return self._finish(d, arr, None, c.path, None)
        c = self._careful(c)
        cells = [r[j] for r in c.rows]
        arr, labels = self._convert(d, cells, lambda i: (c.cell_span(i, j), f"row {i + 1}, column '{d.name}'"))
        self._bind_dims(d, arr.shape, f"column '{d.name}' in {c.path}", c.path, c.header_span(j))
        return self._finish(d, arr, labels, c.path, lambda i: (c.cell_span(i, j), f"row {i + 1}, column '{d.name}'"))

    def _load_pattern(self, d: A.DataDecl):
        t = d.type
        if len(t.dims) != 2:
            _fail(t.span, f"`from \"{d.pattern}\"` gathers columns into a matrix; declare '{d.name}' with two dimensions, "
                  "like real[N, D]")
        for c in self.csvs:
            cols = [j for j, h in enumerate(c.header) if fnmatchcase(h, d.pattern)]
            if not cols:
                continue
            arr = self._fast(d, c, cols)
            if arr is not None:
                self._bind_dims(d, arr.shape, f"columns matching \"{d.pattern}\" in {c.path}", c.path, None)
                return self._finish(d, arr, None, c.path, None)
            c = self._careful(c)
            cells = [[r[j] for j in cols] for r in c.rows]
            flat = [x for row in cells for x in row]
            ncol = len(cols)

            def where(i, c=c, cols=cols, ncol=ncol):
                r, k = divmod(i, ncol)
                return c.cell_span(r, cols[k]), f"row {r + 1}, column '{c.header[cols[k]]}'"
            arr, labels = self._convert(d, flat, where)
            arr = arr.reshape(len(cells), ncol)
            self._bind_dims(d, arr.shape, f"columns matching \"{d.pattern}\" in {c.path}", c.path,
                           c.header_span(cols[0]))
            return self._finish(d, arr, labels, c.path, where)
        for j in self.jsons:
            if d.name in j.obj:
                return self._load_json(d, j)
        names = [h for c in self.csvs for h in c.header]
        _fail(d.name_span, f"no CSV column matches \"{d.pattern}\"" +
              (f" (columns: {', '.join(names[:10])})" if names else " (no CSV file was given)"))

    def _load_json(self, d: A.DataDecl, j: _Json):
        v = j.obj[d.name]
        t = d.type

        span = j.key_span(d.name)

        def where(i):
            return span, f"key '{d.name}'" + (f", element {i + 1}" if t.dims else "")
        arr = self._json_array(d, v, j)
        if arr.ndim != len(t.dims):
            _fail(span, f"key '{d.name}' has {arr.ndim} dimension{'s' if arr.ndim != 1 else ''}, "
                  f"but the model declares {len(t.dims)}")
        flat = list(arr.reshape(-1))
        conv, labels = self._convert(d, flat, where, raw_json=True)
        conv = conv.reshape(arr.shape)
        self._bind_dims(d, conv.shape, f"key '{d.name}' in {j.path}", j.path, span)
        return self._finish(d, conv, labels, j.path, where)

    def _json_array(self, d, v, j: _Json) -> np.ndarray:
        def shape_of(x, depth=0):
            if isinstance(x, list):
                subs = [shape_of(e, depth + 1) for e in x]
                if any(s != subs[0] for s in subs):
                    _fail(j.key_span(d.name), f"key '{d.name}' is a ragged array (rows of different lengths)")
                return (len(x),) + (subs[0] if subs else ())
            if isinstance(x, dict):
                _fail(j.key_span(d.name), f"key '{d.name}' holds an object; expected a number or an array")
            return ()
        shp = shape_of(v)
        arr = np.empty(shp, dtype=object)
        if shp == ():
            arr[()] = v
        else:
            flat = []

            def rec(x):
                if isinstance(x, list):
                    for e in x:
                        rec(e)
                else:
                    flat.append(x)
            rec(v)
            arr = np.array(flat + [None], dtype=object)[:-1].reshape(shp)
        return arr

    def _convert(self, d: A.DataDecl, cells, where, raw_json=False):
        """cells (strings, or JSON scalars) -> (float array, level labels or None)."""
        base = d.type.base
        if base == "level":
            labels = []
            for i, x in enumerate(cells):
                if x is None or (isinstance(x, str) and not x.strip()) or isinstance(x, (list, dict)):
                    span, w = where(i)
                    _fail(span, f"{w}: {'empty cell' if not raw_json else 'null'} where a level label is expected")
                if isinstance(x, float) and x == int(x):
                    x = int(x)
                labels.append(str(x).strip())
            return self._levels(d, labels, where)
        try:
            if raw_json:
                if any(isinstance(x, (str, bool)) or x is None for x in cells):
                    raise ValueError
                arr = np.asarray(cells, dtype=np.float64)
            else:
                arr = np.asarray(cells, dtype=np.float64) if cells else np.zeros(0)
        except (ValueError, TypeError):
            arr = None
        if arr is None or not np.all(np.isfinite(arr)):
            for i, x in enumerate(cells):
                span, w = where(i)
                if raw_json:
                    if x is None:
                        _fail(span, f"{w}: null is not a number")
                    if isinstance(x, bool):
                        if base == "int":
                            continue
                        _fail(span, f"{w}: {json.dumps(x)} is not a number")
                    if isinstance(x, str):
                        _fail(span, f"{w}: {json.dumps(x)} is not a number")
                    v = float(x)
                else:
                    if not x.strip():
                        _fail(span, f"{w}: empty cell")
                    try:
                        v = float(x)
                    except ValueError:
                        _fail(span, f"{w}: {x.strip()!r} is not a number")
                if not math.isfinite(v):
                    _fail(span, f"{w}: {str(x).strip()!r} is not a finite number (NaN and inf are not data)")
            if arr is None:
                arr = np.asarray([float(x) for x in cells], dtype=np.float64)
        if base == "int":
            bad = np.nonzero(arr != np.round(arr))[0]
            if bad.size:
                i = int(bad[0])
                span, w = where(i)
                _fail(span, f"{w}: {str(cells[i]).strip()!r} is not an integer, but '{d.name}' is declared int")
        return arr, None

    def _levels(self, d: A.DataDecl, labels: List[str], where):
        k_sym = d.type.levels.value if d.type.levels else None
        uniq = sorted(set(labels))
        try:
            nums = {u: float(u) for u in uniq}
            uniq = sorted(uniq, key=lambda u: nums[u])
            numeric = True
        except ValueError:
            numeric = False
        k_known = self.out.dims.get(k_sym) if isinstance(k_sym, str) else (k_sym if isinstance(k_sym, int) else None)
        if numeric and k_known is not None and all(nums[u] == int(nums[u]) and 1 <= nums[u] <= k_known for u in uniq):
            arr = np.asarray([int(nums[x]) for x in labels], dtype=np.float64)
            return arr, [str(i) for i in range(1, k_known + 1)]
        code = {u: i + 1 for i, u in enumerate(uniq)}
        arr = np.asarray([code[x] for x in labels], dtype=np.float64)
        if isinstance(k_sym, int) and len(uniq) > k_sym:
            span, w = where(labels.index(uniq[-1]))
            _fail(span, f"{w}: '{d.name}' has {len(uniq)} distinct labels, more than the {k_sym} declared")
        if isinstance(k_sym, str):
            if k_known is not None and len(uniq) != k_known:
                _fail(d.type.span, f"'{d.name}' has {len(uniq)} distinct labels, but {k_sym} = {k_known} "
                      f"({self.out.dim_origin[k_sym]}); labels that are whole numbers 1..{k_sym} are used as they are")
            self.bind(k_sym, len(uniq), f"the labels of '{d.name}'", d.type.span)
        return arr, uniq

    def _bind_dims(self, d: A.DataDecl, shape, origin: str, path: str, span: Optional[Span] = None):
        for dim, n in zip(d.type.dims, shape):
            if isinstance(dim.value, int):
                if dim.value != n:
                    _fail(dim.span, f"{origin} has size {n}, but the model declares {dim.value}")
            else:
                self.bind(dim.value, n, origin, span, path)

    def _finish(self, d: A.DataDecl, arr: np.ndarray, labels, origin: str, where):
        for b in d.type.bounds:
            lim = _literal(b.value)
            if lim is None:
                continue   # non-literal bounds are checked by the checker
            flat = arr.reshape(-1)
            bad = np.nonzero(flat < lim if b.key == "lower" else flat > lim)[0] if b.key in ("lower", "upper") else []
            if len(bad):
                i = int(bad[0])
                span, w = where(i)
                v = arr.reshape(-1)[i]
                sign = ">=" if b.key == "lower" else "<="
                _fail(span, f"{w}: {v:g} violates the bound {b.key}={lim:g} of '{d.name}' (must be {sign} {lim:g})",
                      origin if span is None else None)
        if not d.type.dims and d.type.base in _NUMERIC_BASES | {"level"} and d.name in self.dim_symbols:
            v = float(arr)
            if v != int(v) or v < 0:
                _fail(d.name_span, f"'{d.name}' is used as a size but its value is {v:g}")
            self.bind(d.name, int(v), f"'{d.name}' from {origin}", d.name_span)
        self.out.values[d.name] = arr
        if labels is not None:
            self.out.levels[d.name] = labels


def _literal(e: A.Expr) -> Optional[float]:
    if isinstance(e, A.Num):
        return float(e.value)
    if isinstance(e, A.Neg) and isinstance(e.operand, A.Num):
        return -float(e.operand.value)
    return None


def _from_object(obj: dict, i: int) -> _Json:
    """A Python mapping of names to numbers / arrays, treated like a JSON file."""
    plain = {str(k): (v.tolist() if hasattr(v, "tolist") else list(v) if isinstance(v, (tuple, range)) else v)
             for k, v in obj.items()}
    path = f"<data {i + 1}>"
    return _Json(path, Source(path, json.dumps(plain, default=str)), plain)


# ---- a data-parallel fit: each process reads its own rows (ppl.dist) ---------------------------
RANK_FIELD = "{rank}"           # in a data path: each process reads its own file (the rank in its name)


@dataclass(frozen=True)
class RowShare:
    """This process holds rows [lo, hi) (0-based) of the n rows of the whole data; `how` says how it
    read them (for messages and the run record)."""
    lo: int
    hi: int
    n: int
    how: str


def _group():
    """(rank, world, the dist module) of this process's group, or None (torch-free when there is none)."""
    import sys
    d = sys.modules.get("ppl.dist")
    g = d.current() if d is not None else None
    return (g.rank, g.world, d) if g is not None else None


def _line_start(f, pos: int, body: int, size: int) -> int:
    """The first line start at or after byte `pos` of the rows (which start at `body`)."""
    if pos <= body:
        return body
    f.seek(pos - 1)
    at = pos - 1
    while True:
        b = f.read(1 << 16)
        if not b:
            return size
        i = b.find(b"\n")
        if i >= 0:
            return at + i + 1
        at += len(b)


def _range_table(path: str, decls: Sequence[A.DataDecl], rank: int, world: int) -> Optional[_Csv]:
    """Rank `rank`'s share of a CSV's rows: its bytes split evenly over the processes, each cut moved on
    to the next line start, and the columns the declarations take parsed from that range only.  None
    where a byte range cannot be read alone (then every process reads the whole file): a JSON file, a
    header the fast reader refuses, level labels (their set must be the whole data's), a quote, bytes
    that are not UTF-8, any fault in a cell (located exactly by the whole-file reader), no rows here."""
    if path.lower().endswith(".json"):
        return None
    try:
        size = os.path.getsize(path)
    except OSError:
        return None
    t = _read_csv_head(path)
    if t is None:
        return None
    needs = []
    for d in decls:
        if d.pattern is not None:
            cols = [j for j, h in enumerate(t.header) if fnmatchcase(h, d.pattern)]
            if cols and len(d.type.dims) != 2:
                return None
        else:
            cols = [t.columns[d.name]] if d.name in t.columns else []
            if cols and len(d.type.dims) != 1:
                return None
        if not cols:
            continue
        if d.type.base not in _NUMERIC_BASES:
            return None
        needs.append(_Need(d, cols))
    st = t.stream
    span = size - st.body
    with open(path, "rb") as f:
        start = _line_start(f, st.body + span * rank // world, st.body, size)
        end = _line_start(f, st.body + span * (rank + 1) // world, st.body, size) if rank + 1 < world else size
    st.body, st.end, st.plain = start, end, True
    if end <= start:
        return None
    try:
        _stream_columns(t, needs)
    except (_Fallback, PplError):
        return None
    if any(nd.bad is not None or nd.nonint is not None or any(b[2] is not None for b in nd.bounds)
           for nd in needs):
        return None
    st.needs = {nd.decl.name: nd for nd in needs}
    return t


def _own_rows(decls, files, sets, dim_symbols, objects, group) -> Optional[DataSet]:
    """Each process's own rows, bound as the whole data would be but for the rows (the row dimension is
    the whole data's N, from one all-gather of the row counts), or None: every process reads the whole
    data (and takes its share of the rows later).  `{rank}` in a path: each process reads its own
    file(s); one CSV: each reads its byte range (`_range_table`)."""
    rank, world, d = group
    per_file = any(RANK_FIELD in f for f in files)
    sym = lead_symbol(decls)
    if per_file:
        if sym is None:
            raise UsageError(f"a data path with {RANK_FIELD} gives each process its own rows, but this model's "
                             f"data have no row axis (a leading dimension shared by the data declarations)")
        mine = [f.replace(RANK_FIELD, str(rank)) for f in files]
        b = _Binder(decls, mine, sets, dim_symbols, objects)
        how = f"its own file ({', '.join(mine)})"
    else:
        if len(files) != 1 or objects or sym is None:
            return None
        t = _range_table(files[0], decls, rank, world)
        ok = t is not None and all(nd.decl.type.dims[0].value == sym for nd in t.stream.needs.values())
        if not all(d.all_gather_object(ok)):
            return None
        b = _Binder(decls, files, sets, dim_symbols, objects, tables=[t])
        how = f"a row range of {files[0]}"
    _bind_all(b, decls, None)
    ds = b.out
    n = ds.dims.get(sym)
    if n is None:
        raise UsageError(f"no data gives the rows ({sym}) of this process's share ({how})")
    others = {k: v for k, v in ds.dims.items() if k != sym}
    every = d.all_gather_object((n, others, ds.levels))
    (_, dims0, levels0) = every[0]            # every process compares with the first: one message for all
    for r, (_, dims, levels) in enumerate(every[1:], 1):
        for k in sorted(set(dims) | set(dims0)):
            if dims.get(k) != dims0.get(k):
                raise UsageError(f"the processes' data disagree on {k}: process 0's rows give {dims0.get(k)}, "
                                 f"process {r}'s give {dims.get(k)}; every process's rows must give the same sizes")
        for k in sorted(set(levels) | set(levels0)):
            if levels.get(k) != levels0.get(k):
                decl = next(x for x in decls if x.name == k)
                _fail(decl.type.span, f"'{k}' has other level labels in process {r}'s rows than in process "
                      f"0's; labels are numbered over the whole data, so give every process's file the "
                      f"same labels, or integer codes 1..K with K given (--set K=...)")
    counts = [e[0] for e in every]
    lo = sum(counts[:rank])
    ds.dims[sym] = sum(counts)
    ds.rows = RowShare(lo, lo + n, sum(counts), how)
    return ds


def _bind_all(b: "_Binder", decls, fill_missing) -> None:
    b.bind_scalars()
    fill_missing = fill_missing or {}
    deferred = []
    for d in decls:
        if d.name in fill_missing and not b.has(d):
            deferred.append(d)
            continue
        b.load(d)
    for d in deferred:
        shape = []
        for dim in d.type.dims:
            n = dim.value if isinstance(dim.value, int) else b.out.dims.get(dim.value)
            if n is None:
                _fail(d.name_span, f"no data for '{d.name}', and no other data gives its size {dim.value}")
            shape.append(n)
        b.out.values[d.name] = np.full(tuple(shape), float(fill_missing[d.name]))
        b.out.filled.append(d.name)
    for k, v in b.sets.items():
        if k in b.dim_symbols and k not in b.out.dims and v == int(v):
            b.bind(k, int(v), f"--set {k}", None, "--set")


def load_data(decls: Sequence[A.DataDecl], files: Sequence[str], sets: Sequence[str] = (),
              dim_symbols=(), objects: Sequence[dict] = (), fill_missing: Optional[Dict[str, float]] = None,
              own_rows: bool = True) -> DataSet:
    """Read every file, then bind each declaration in source order.  `fill_missing` (name -> value):
    declarations that may be absent (the observed columns of data for prediction), filled with that
    value in the shape the other data give.  In a data-parallel fit (ppl.dist) each process reads only
    its own rows where it can (`_own_rows`; the DataSet's `rows` says which), unless not `own_rows`
    (a model with encoders: q's draws encode every row on every process)."""
    group = _group()
    if group is None and any(RANK_FIELD in f for f in files):
        raise UsageError(f"a data path with {RANK_FIELD} gives each process of a data-parallel fit its own file; "
                         f"this fit runs in one process: use --procs W (or torchrun), or name one file")
    if group is not None and not own_rows and any(RANK_FIELD in f for f in files):
        raise UsageError(f"a model with encoders (amortize) reads the whole data on every process of a data-parallel "
                         f"fit (q's draws encode every row); name one file, not a {RANK_FIELD} pattern")
    if group is not None and not fill_missing and own_rows:
        ds = _own_rows(decls, files, sets, dim_symbols, objects, group)
        if ds is not None:
            return ds
    b = _Binder(decls, files, sets, dim_symbols, objects)
    _bind_all(b, decls, fill_missing)
    return b.out
