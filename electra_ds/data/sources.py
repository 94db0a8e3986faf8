"""Text sources for the token cache: local files, a Hugging Face dataset, or the builtin offline corpus.

A source yields the corpus as a stream of ``(text, ends_document)`` chunks in a fixed order. Long documents
come in several chunks cut at line breaks (so tokenizing the pieces gives the same ids as the whole), which
keeps memory bounded for book-sized or larger documents. Every chunk sequence of one document ends with a
chunk whose ``ends_document`` is True, so documents can be numbered by the consumer.

Local files: ``.txt`` / ``.txt.gz`` (one document per file, or per blank-line separated paragraph block with
``doc_split="blank_lines"``), ``.jsonl`` / ``.jsonl.gz`` (one document per record, field ``text_field``),
``.parquet`` (one document per row of column ``text_field``), suffixes in any case; a directory means every such
file below it, in sorted order, except hidden ones (a name starting with "." in the path below the folder); files
with other suffixes are skipped with a warning and counted. Invalid UTF-8 (and a lone surrogate, which a JSON
escape can spell and no tokenizer can take) is replaced with U+FFFD and counted per file. In every
record format a null text is an empty document (counted as ``null_texts``); any other non-string value is an error.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import inspect
import json
import logging
import os
import re
import sys
import argparse
import sysconfig
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

BLOCK_BYTES = 1 << 16  # read size; also the largest chunk of a long document handed to the tokenizer
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
DOC_SPLITS = ("file", "blank_lines")
# The keyword arguments of `open_source` besides the spec: how a source is read.
SOURCE_OPTIONS = ("doc_split", "text_field", "strip_gutenberg", "hf_config", "hf_split")

_START = re.compile(r"^[ \t]*\*\*\*[ \t]*START OF\b.*$", re.MULTILINE | re.IGNORECASE)
_END = re.compile(r"^[ \t]*\*\*\*[ \t]*END OF\b.*$", re.MULTILINE | re.IGNORECASE)
# After a START marker, older books may end instead at an "End of (the) Project Gutenberg ..." line or at the old
# licence ("***START**THE SMALL PRINT!..."). Not before one: older etexts without START markers carry that licence
# ahead of the book. Not "The Project Gutenberg Etext of <title>": older books also open their text with that line.
_END_AFTER_START = re.compile(r"^[ \t]*(?:\*\*\*[ \t]*END OF\b|End of (?:the )?Project Gutenberg\b"
                              r"|\*+[ \t]*START[ \t]*\*+[ \t]*THE SMALL PRINT\b).*$",
                              re.MULTILINE | re.IGNORECASE)
_BLANK_LINES = re.compile(r"\n[^\S\n]*\n\s*")
_REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")
_UTF8_REPLACEMENT = _REPLACEMENT.encode("utf-8")

Chunk = tuple[str, bool]
Progress = Callable[[int], None]


class SourceError(ValueError):
    """The source is missing, unreadable or malformed; the message names the file (and line)."""


@dataclass
class SourceStats:
    """What one pass over a source saw."""

    files: int = 0
    documents: int = 0
    characters: int = 0
    invalid_utf8_replaced: int = 0
    files_with_invalid_utf8: list[str] = field(default_factory=list)
    gutenberg_without_markers: int = 0
    gutenberg_without_end: int = 0
    null_texts: int = 0
    builtin_files_skipped: int = 0
    unsupported_files_skipped: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Source(ABC):
    """Base class: a named, fingerprinted corpus that can be read any number of times."""

    spec: str = ""
    progress_unit: str = "doc"
    progress_total: int | None = None

    def __init__(self, *, strip_gutenberg: bool = False) -> None:
        self.strip_gutenberg = strip_gutenberg
        self.stats = SourceStats()

    @abstractmethod
    def fingerprint(self) -> str:
        """Identifies the content (without reading all of it); changes when the corpus changes."""

    @abstractmethod
    def _chunks(self, progress: Progress) -> Iterator[Chunk]:
        """The chunks, calling ``progress(n)`` as ``n`` more units of :attr:`progress_total` are done."""

    def chunks(self, progress: Progress | None = None) -> Iterator[Chunk]:
        """Yield ``(text, ends_document)`` over the whole corpus; resets :attr:`stats` first."""
        self.stats = SourceStats()
        for text, ends in self._chunks(progress or (lambda n: None)):
            self.stats.characters += len(text)
            self.stats.documents += ends
            yield text, ends

    def texts(self, max_chars: int | None = None) -> Iterator[str]:
        """The chunk texts only (for tokenizer training), stopping after about ``max_chars`` characters."""
        seen = 0
        for text, _ in self.chunks():
            yield text
            seen += len(text)
            if max_chars is not None and seen >= max_chars:
                return

    def _record(self, text: str, name: str) -> Iterator[Chunk]:
        """One record (jsonl line, parquet row, dataset item) as a document."""
        if self.strip_gutenberg:
            text = "".join(self._strip_blocks([text], name))
        pieces = list(_split_long(text))
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1

    def _strip_blocks(self, blocks: Iterable[str], name: str) -> Iterator[str]:
        """Drop the Project Gutenberg header (to the START marker line) and licence (from the end marker)."""
        started = False
        for i, block in enumerate(blocks):
            if i == 0:
                start = _START.search(block)
                if start is None:
                    self._note_unmarked(name)
                else:
                    block, started = block[start.end():], True
            end = (_END_AFTER_START if started else _END).search(block)
            if end is not None:
                yield block[:end.start()]
                return
            yield block
        if started:  # a text without START markers is counted once, as unmarked
            self._note_no_end(name)

    def _note_unmarked(self, name: str) -> None:
        self.stats.gutenberg_without_markers += 1
        log.warning("%s: no '*** START OF' Gutenberg marker found; kept the whole text", name)

    def _note_no_end(self, name: str) -> None:
        self.stats.gutenberg_without_end += 1
        log.warning("%s: no Gutenberg end marker ('*** END OF', 'End of the Project Gutenberg', ...) after the "
                    "START marker; kept everything to the end of the text", name)

    def _field_text(self, value: object, name: str, where: str) -> str:
        """The text of a record's `text_field` (record ``where`` of file ``name``): null is an empty document
        (counted); another non-string is refused; lone surrogates are replaced with U+FFFD (counted)."""
        if value is None:
            self.stats.null_texts += 1
            return ""
        if not isinstance(value, str):
            raise SourceError(f"{where}: field {self.text_field!r} holds {type(value).__name__} {value!r:.40}, not text "
                              "(choose the text field with --text_field)")
        if value.isascii():  # the common case, and free to tell
            return value
        value, bad = _SURROGATE.subn(_REPLACEMENT, value)
        if bad:
            self._note_invalid(bad, name, where, "lone surrogate (a \\uXXXX escape without its pair)")
        return value

    def _note_invalid(self, count: int, name: str, where: str, what: str) -> None:
        """Count ``count`` replacements with U+FFFD in file ``name``; warn at the first one of each file."""
        self.stats.invalid_utf8_replaced += count
        if name not in self.stats.files_with_invalid_utf8:
            self.stats.files_with_invalid_utf8.append(name)
            log.warning("%s: %s replaced with U+FFFD (first here; all counted in the cache manifest)", where, what)


def _split_long(text: str, limit: int = BLOCK_BYTES) -> Iterator[str]:
    """Cut ``text`` into pieces of at most about ``limit`` characters at line breaks (else spaces)."""
    if len(text) <= limit:
        yield text
        return
    begin = 0
    while len(text) - begin > limit:
        cut = text.rfind("\n", begin, begin + limit) + 1
        if cut <= begin:
            cut = text.rfind(" ", begin, begin + limit) + 1
        if cut <= begin:
            cut = begin + limit
        yield text[begin:cut]
        begin = cut
    yield text[begin:]


def _supported(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def _cut_point(data: bytes) -> int:
    """Where to end a block: after the last newline, else the last space, else at a UTF-8 boundary."""
    cut = data.rfind(b"\n") + 1 or data.rfind(b" ") + 1
    if cut:
        return cut
    i = len(data) - 1
    while i > 0 and len(data) - i < 4 and 0x80 <= data[i] < 0xC0:
        i -= 1
    lead = data[i]
    need = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return i if 0 < i and i + need > len(data) else len(data)


def _paragraphs(blocks: Iterable[str]) -> Iterator[Chunk]:
    """The documents of a text separated by blank lines, given in blocks: the same wherever the blocks end."""
    carry, open_doc = "", False  # open_doc: the first chunks of the document in `carry` went out already
    for block in blocks:
        text = carry + block
        # Trailing whitespace from its first line break on may be (the start of) blank lines that go on in the
        # next block: it waits there, and so does the document before it.
        hold = text.find("\n", len(text.rstrip()))
        if hold < 0:
            hold = len(text)
        *parts, carry = _BLANK_LINES.split(text[:hold])
        for part in parts:
            if part.strip() or open_doc:
                yield part, True
            open_doc = False
        tail = text[hold:]
        if tail.count("\n") >= 2:  # a blank line ends the document; whitespace after it only separates
            if carry.strip() or open_doc:
                yield carry, True
            carry, open_doc = "\n\n", False  # stands for the whole run, however long
            continue
        if len(carry) >= BLOCK_BYTES and (open_doc or not carry.isspace()):  # a long document goes out in pieces
            yield carry, False
            carry, open_doc = "", True
        carry += tail
    if carry.strip() or open_doc:  # no blank line is left in carry: the loop split or stood in for each
        yield carry, True


class LocalFiles(Source):
    """``.txt``, ``.txt.gz``, ``.jsonl``, ``.jsonl.gz`` and ``.parquet`` files, or folders of them."""

    progress_unit = "B"

    def __init__(self, path: str | os.PathLike, *, doc_split: str = "file", text_field: str = "text",
                 strip_gutenberg: bool = False) -> None:
        super().__init__(strip_gutenberg=strip_gutenberg)
        if doc_split not in DOC_SPLITS:
            raise SourceError(f"doc_split must be one of {DOC_SPLITS}, got {doc_split!r}")
        self.root = Path(path).expanduser().resolve()
        self.spec = str(self.root)
        self.doc_split, self.text_field = doc_split, text_field
        self.unsupported = 0  # files of other types in the folder, skipped
        self.files = self._list_files()
        self.progress_total = sum(f.stat().st_size for f in self.files)

    def _list_files(self) -> list[Path]:
        if not self.root.exists():
            raise SourceError(f"source not found: {self.root}")
        if self.root.is_file():
            if not _supported(self.root):
                raise SourceError(f"{self.root}: unsupported file type (use {', '.join(SUFFIXES)})")
            files = [self.root]
        else:
            found = sorted(p for p in self.root.rglob("*")
                           if not any(part.startswith(".") for part in p.relative_to(self.root).parts)
                           and p.is_file())
            files = [p for p in found if _supported(p)]
            skipped = [p for p in found if not _supported(p)]
            self.unsupported = len(skipped)
            if skipped:
                names = ", ".join(str(p.relative_to(self.root)) for p in skipped[:5])
                log.warning("%s: skipped %d file(s) of unsupported type (%s%s; supported: %s)", self.root,
                            len(skipped), names, ", ..." if len(skipped) > 5 else "", ", ".join(SUFFIXES))
            if not files:
                raise SourceError(f"no {', '.join(SUFFIXES)} files under {self.root}")
        for f in files:
            if not os.access(f, os.R_OK):
                raise SourceError(f"{f}: not readable (check its permissions)")
        return files

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.relative_to(self.root.parent)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def _chunks(self, progress: Progress) -> Iterator[Chunk]:
        self.stats.unsupported_files_skipped = self.unsupported
        for path in self.files:
            self.stats.files += 1
            name, suffix = str(path), path.name.lower()
            try:
                if suffix.endswith(PARQUET_SUFFIXES):
                    yield from self._parquet(path)
                    progress(path.stat().st_size)
                    continue
                with open(path, "rb") as raw:
                    stream = gzip.GzipFile(fileobj=raw) if suffix.endswith(".gz") else raw
                    if suffix.endswith(JSONL_SUFFIXES):
                        yield from self._jsonl(stream, raw, name, progress)
                    else:
                        yield from self._text(stream, raw, name, progress)
            except (OSError, EOFError, zlib.error) as e:
                raise SourceError(f"{name}: cannot read ({e})") from None

    def _decode(self, data: bytes, name: str, where: str | None = None) -> str:
        """UTF-8 text of ``data`` with invalid bytes replaced by U+FFFD and counted (``where``: file:line)."""
        text = data.decode("utf-8", errors="replace")
        if _REPLACEMENT in text:
            bad = text.count(_REPLACEMENT) - data.count(_UTF8_REPLACEMENT)
            if bad:
                self._note_invalid(bad, name, where or name, "invalid UTF-8")
        return text

    def _text_blocks(self, stream, raw, name: str, progress: Progress) -> Iterator[str]:
        carry, first, pos = b"", True, 0
        while True:
            new = stream.read(BLOCK_BYTES)
            data = carry + new
            if not data:
                break
            cut = _cut_point(data) if new else len(data)
            block, carry = data[:cut], data[cut:]
            text = self._decode(block, name).replace("\r\n", "\n")
            if first:
                text, first = text.removeprefix("\ufeff"), False
            now = raw.tell()
            progress(now - pos)
            pos = now
            yield text

    def _text(self, stream, raw, name: str, progress: Progress) -> Iterator[Chunk]:
        blocks = self._text_blocks(stream, raw, name, progress)
        if self.strip_gutenberg:
            blocks = self._strip_blocks(blocks, name)
        if self.doc_split == "file":
            previous = None
            for block in blocks:
                if previous is not None:
                    yield previous, False
                previous = block
            yield previous or "", True
            return
        yield from _paragraphs(blocks)

    def _jsonl(self, stream, raw, name: str, progress: Progress) -> Iterator[Chunk]:
        pos = 0
        for line_no, line in enumerate(stream, 1):
            if not line.strip():
                continue
            where = f"{name}:{line_no}"
            try:
                record = json.loads(self._decode(line, name, where).removeprefix("\ufeff"))
            except json.JSONDecodeError as e:
                raise SourceError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or self.text_field not in record:
                raise SourceError(f"{where}: no string field {self.text_field!r} (choose the field with --text_field)")
            yield from self._record(self._field_text(record[self.text_field], name, where), where)
            if line_no % 256 == 0:
                now = raw.tell()
                progress(now - pos)
                pos = now
        progress(raw.tell() - pos)

    def _parquet(self, path: Path) -> Iterator[Chunk]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SourceError(f"{path}: reading .parquet files needs `pip install pyarrow`") from None
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise SourceError(f"{path}: not a readable parquet file ({e})") from None
        if self.text_field not in pf.schema_arrow.names:
            raise SourceError(f"{path}: no column {self.text_field!r} (columns: {pf.schema_arrow.names}; "
                              "choose one with --text_field)")
        row = 0
        for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                row += 1
                where = f"{path} row {row}"
                yield from self._record(self._field_text(value, str(path), where), where)


class HubDataset(Source):
    """A Hugging Face dataset by name (downloaded and cached by ``datasets``), one document per record."""

    def __init__(self, name: str, *, config: str | None = None, split: str = "train",
                 text_field: str = "text", strip_gutenberg: bool = False) -> None:
        super().__init__(strip_gutenberg=strip_gutenberg)
        self.name, self.config, self.split, self.text_field = name, config, split, text_field
        self.spec = name if config is None else f"{name}:{config}"

    def fingerprint(self) -> str:
        return f"hf:{self.name}:{self.config}:{self.split}"

    @property
    def progress_total(self) -> int:  # records, known once the dataset is loaded (the progress bar asks first)
        return len(self.dataset)

    @functools.cached_property
    def dataset(self):
        try:
            import datasets
        except ImportError:
            raise SourceError(f"{self.name!r} is not a local path, and reading Hugging Face datasets needs "
                              "`pip install datasets`") from None
        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split)
        except Exception as e:  # network, missing dataset, bad config: all surface from deep inside datasets
            raise SourceError(f"cannot load Hugging Face dataset {self.spec!r} (split {self.split!r}): "
                              f"{type(e).__name__}: {e}. Offline? Use local files or 'builtin'.") from None
        if self.text_field not in ds.column_names:
            raise SourceError(f"dataset {self.spec!r} has no column {self.text_field!r} "
                              f"(columns: {ds.column_names}; choose one with --text_field)")
        return ds

    def _chunks(self, progress: Progress) -> Iterator[Chunk]:
        ds = self.dataset
        for start in range(0, len(ds), 1000):
            texts = ds[start:start + 1000][self.text_field]
            for i, value in enumerate(texts):
                where = f"dataset {self.spec}[{start + i}]"  # ds[i]: 0-based, as the dataset indexes it
                yield from self._record(self._field_text(value, f"dataset {self.spec}", where), where)
            progress(len(texts))


class Builtin(Source):
    """English text that ships with Python: the pydoc topic help and the docstrings of the stdlib sources.

    One document per pydoc topic and one per stdlib module (its module, class and function docstrings).
    About 2 MB of text; the content depends on the Python version, which is part of the fingerprint.
    """

    spec = "builtin"
    # a triple-quoted string opening the file or right after a line ending in ":" (def/class headers)
    _DOCSTRING = re.compile(r'(?:\A|:[ \t]*(?:#[^\n]*)?\n)(?:[ \t]*(?:#[^\n]*)?\n)*'
                            r'[ \t]*[rRuU]?("""|\'\'\')(.*?)\1', re.DOTALL)
    _SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3",
                  "turtledemo", "__pycache__"}

    def __init__(self, *, strip_gutenberg: bool = False) -> None:
        super().__init__(strip_gutenberg=strip_gutenberg)
        self.root = Path(sysconfig.get_paths()["stdlib"])
        self.modules = sorted(p for p in self.root.rglob("*.py")
                              if not self._SKIP_DIRS.intersection(p.relative_to(self.root).parts))
        self.progress_total = len(self.modules) + len(self._topics())

    @staticmethod
    def _topics() -> dict[str, str]:
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions leave pydoc_data out
            return {}
        return topics

    def fingerprint(self) -> str:
        return f"builtin:{sys.implementation.name}-{sys.version.split()[0]}:{len(self.modules)}"

    def _chunks(self, progress: Progress) -> Iterator[Chunk]:
        topics = self._topics()
        for name in sorted(topics):
            yield from self._record(topics[name], f"pydoc topic {name}")
            progress(1)
        for path in self.modules:
            self.stats.files += 1
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                self.stats.builtin_files_skipped += 1
                progress(1)
                continue
            docs = [inspect.cleandoc(m.group(2)) for m in self._DOCSTRING.finditer(source)]
            text = "\n\n".join(d for d in docs if d)
            if text:
                yield from self._record(text, str(path))
            progress(1)


def open_source(spec: str | os.PathLike, *, doc_split: str = "file", text_field: str = "text",
                strip_gutenberg: bool = False, hf_config: str | None = None,
                hf_split: str = "train") -> Source:
    """Resolve ``spec``: ``"builtin"``, an existing file or folder, else a Hugging Face dataset name."""
    text = os.fspath(spec)
    if text == "builtin":
        return Builtin(strip_gutenberg=strip_gutenberg)
    path = Path(text).expanduser()
    looks_local = (path.exists() or text.startswith((".", "/", "~")) or text.lower().endswith(SUFFIXES)
                   or text.count("/") > 1 or "\\" in text)
    if looks_local:
        return LocalFiles(path, doc_split=doc_split, text_field=text_field, strip_gutenberg=strip_gutenberg)
    return HubDataset(text, config=hf_config, split=hf_split, text_field=text_field,
                      strip_gutenberg=strip_gutenberg)


def add_source_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The command-line flags of `SOURCE_OPTIONS` (one definition for every launcher that reads a source)."""
    parser.add_argument("--doc_split", choices=DOC_SPLITS, default="file",
                        help="documents of local .txt files: whole files, or blocks separated by blank lines")
    parser.add_argument("--text_field", default="text", help="text field of .jsonl/.parquet/dataset records")
    parser.add_argument("--strip_gutenberg", action="store_true",
                        help="drop Project Gutenberg headers/licences (*** START OF / *** END OF markers, or an "
                             "older book's end lines)")
    parser.add_argument("--hf_config", help="Hugging Face dataset configuration")
    parser.add_argument("--hf_split", default="train", help="Hugging Face dataset split")


def source_options(args: argparse.Namespace) -> dict[str, object]:
    """The `open_source` keyword arguments parsed by `add_source_arguments`."""
    return {name: getattr(args, name) for name in SOURCE_OPTIONS}
