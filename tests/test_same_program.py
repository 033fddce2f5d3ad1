"""benchmarks/same_program.py: equal programs compare equal, different ones do not."""

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks import same_program

ROOT = Path(__file__).resolve().parents[1]


def _hlo(f, *args) -> str:
    return jax.jit(f).lower(*args).compile().as_text()


def test_normalise_ignores_names_and_sees_a_changed_op():
    x = jnp.ones((8, 8))

    def first(a):
        return jnp.tanh(a @ a) + 1.0

    def second(a):  # the same computation under another name, from another source line
        return jnp.tanh(a @ a) + 1.0

    def changed(a):
        return jax.nn.sigmoid(a @ a) + 1.0

    assert same_program.normalise(_hlo(first, x)) == same_program.normalise(_hlo(second, x))
    assert same_program.normalise(_hlo(first, x)) != same_program.normalise(_hlo(changed, x))


def test_the_trainers_programs_of_one_tree_compare_equal_and_two_routes_do_not():
    cases = [dict(cell="lstm", impl=impl, dtype="float32", size="tiny", devices=1) for impl in ("fused", "scan")]
    with tempfile.TemporaryDirectory() as cache:
        first = same_program.programs(ROOT, cases, Path(cache), devices=1)
        again = same_program.programs(ROOT, cases[:1], Path(cache), devices=1)
    fused, scan = (first[same_program.key(c)] for c in cases)
    assert "hlo" in fused and "hlo" in scan, (fused.get("error"), scan.get("error"))
    assert same_program.compare(fused, again[same_program.key(cases[0])])["same"] is True
    row = same_program.compare(fused, scan)  # the fused loop and the autodiff scan: other programs
    assert row["same"] is False and row["changed_lines"] > 0 and row["first_changes"]


def test_a_case_a_commit_cannot_build_is_reported():
    case = dict(cell="no-such-cell", impl="fused", dtype="float32", size="tiny", devices=1)
    with tempfile.TemporaryDirectory() as cache:
        got = same_program.programs(ROOT, [case], Path(cache), devices=1)
    row = same_program.compare(got[same_program.key(case)], got[same_program.key(case)])
    assert row["same"] is None and "no-such-cell" in row["error"]
