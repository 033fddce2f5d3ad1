import os
from pathlib import Path

import pytest

SHARED_NLTK = Path(__file__).resolve().parents[1].parent / "shared" / "nltk_data"
if "NLTK_DATA" not in os.environ and SHARED_NLTK.is_dir():  # the checkout's ../shared, as in CI
    os.environ["NLTK_DATA"] = str(SHARED_NLTK)


def nltk_state_union_available() -> bool:
    """True when NLTK can find the state_union corpus (CI points NLTK_DATA at ../shared/nltk_data)."""
    try:
        from nltk.corpus import state_union

        return len(state_union.fileids()) > 0
    except (LookupError, OSError):
        return False


needs_nltk_state_union = pytest.mark.skipif(
    not nltk_state_union_available(),
    reason="NLTK's state_union data not found (set NLTK_DATA, e.g. to ../shared/nltk_data)",
)


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    """A small real-text folder corpus: three documents of plain English."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    base = ("The state of our union is strong. We will work together for the good of the nation, "
            "and we will keep the promises we made to the people.\n")
    for i in range(3):
        (folder / f"{1990 + i}-speech.txt").write_text(base * (6 + i))
    return folder



@pytest.fixture(autouse=True, scope="session")
def _session_cache_dir(tmp_path_factory):
    """The measured dispatch and set-up choices go to a cache folder of this test session (its
    subprocesses too), not the user's ~/.cache/lstm_jax: a test run neither reads choices measured
    elsewhere nor leaves its own behind. A cache folder given from outside is kept."""
    if "LSTM_JAX_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["LSTM_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("lstm_jax_cache"))
    yield
    del os.environ["LSTM_JAX_CACHE_DIR"]
