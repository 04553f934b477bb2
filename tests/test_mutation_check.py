"""scripts/mutation_check.py: mutants are planted in a copy, found wherever their snippet moved, and
reported stale when it is gone (no test run here: the check itself is run by hand, see docs/testing.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mutation_check.py"


@pytest.fixture(scope="module")
def mc():
    spec = importlib.util.spec_from_file_location("mutation_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture
def tree(tmp_path):
    """A fake ``src/`` with the function in a sub-package, as after a restructuring."""
    src = tmp_path / "src"
    (src / "ragkit" / "losses").mkdir(parents=True)
    (src / "ragkit" / "__init__.py").write_text("")
    (src / "ragkit" / "losses" / "__init__.py").write_text("")
    (src / "ragkit" / "losses" / "sequence.py").write_text(
        "def nll(ll, doc):\n    x = 1\n    return -(ll + doc).logsumexp(1)\n"
    )
    (src / "ragkit" / "other.py").write_text("y = 2\nz = 2\n")
    return src


def _mutant(mc, edits):
    return mc.Mutant("m", "losses: nll", tuple(edits), ("tests/conftest.py",))


def test_plants_the_snippet_wherever_it_lives(mc, tree):
    mutant = _mutant(mc, [("return -(ll + doc).logsumexp(1)", "return -ll.logsumexp(1)")])
    locations, problem = mc.plant(tree, mutant)
    assert problem is None
    assert locations == [str(Path("ragkit/losses/sequence.py")) + ":3"]
    assert (tree / "ragkit/losses/sequence.py").read_text().endswith("    return -ll.logsumexp(1)\n")
    assert (tree / "ragkit/other.py").read_text() == "y = 2\nz = 2\n"


def test_several_edits_in_one_file(mc, tree):
    mutant = _mutant(mc, [("x = 1", "x = 0"), ("(ll + doc)", "(ll - doc)")])
    _, problem = mc.plant(tree, mutant)
    assert problem is None
    assert (tree / "ragkit/losses/sequence.py").read_text() == (
        "def nll(ll, doc):\n    x = 0\n    return -(ll - doc).logsumexp(1)\n"
    )


@pytest.mark.parametrize(
    "edit,message",
    [
        (("ll.sum(2)", "ll"), "not found"),
        (("= 2", "= 3"), "found 2 times"),
        (("x = 1", "x = = 1"), "does not compile"),
        (("x = 1", "x = 1"), "itself"),
    ],
)
def test_stale_or_bad_edits_are_reported_and_leave_the_tree_alone(mc, tree, edit, message):
    before = {p: p.read_text() for p in tree.rglob("*.py")}
    _, problem = mc.plant(tree, _mutant(mc, [edit]))
    assert problem is not None and message in problem
    assert {p: p.read_text() for p in tree.rglob("*.py")} == before


def test_run_mutant_never_touches_the_working_tree(mc, tmp_path, monkeypatch):
    """A stale mutant stops before any test runs; the repository's own source is never edited."""
    source = mc.REPO / "src" / "ragkit" / "modeling_rag.py"
    before = source.read_text()
    missing = mc.Mutant("gone", "nowhere", (("no such snippet in ragkit", "x"),), ("tests/conftest.py",))
    result = mc.run_mutant(tmp_path, missing, timeout=1)
    assert result.status == "stale" and "not found" in result.detail
    absent_test = mc.Mutant("t", "nowhere", (("a", "b"),), ("tests/no_such_file.py",))
    assert mc.run_mutant(tmp_path, absent_test, timeout=1).status == "stale"
    assert source.read_text() == before


def test_union_of_selections_runs_each_test_once(mc):
    tests = ["a.py", "b.py::t1", "a.py::t2", "b.py::t1", "c.py::t3", "a.py"]
    assert mc._union(tests) == ["a.py", "b.py::t1", "c.py::t3"]


def test_table_is_well_formed(mc):
    mc._check_table(mc.MUTANTS)
    names = {m.name for m in mc.MUTANTS}
    # The bugs the check exists for stay in the table.
    assert {
        "seq-exclude-bos-ignored",
        "retrieval-last-chunk-dropped",
        "finetune-max-combined-length-ignored",
        "trainer-accumulation-divisor",
        "token-grad-branch-prior-detached",
    } <= names


def test_optional_tests_run_only_when_their_file_exists(mc):
    tests = ("?tests/no_such_file.py", "?tests/conftest.py", "tests/conftest.py::x")
    assert mc._selected(tests) == ["tests/conftest.py", "tests/conftest.py::x"]
    assert mc._missing_tests(tests) == []
    assert mc._missing_tests(("tests/no_such_file.py",)) == ["tests/no_such_file.py"]


def test_mutants_are_checked_by_fast_unit_tests_only(mc):
    # The demo, the commands' end-to-end runs and the example scripts take minutes and catch a bug far
    # from its cause: each mutant must be killed by a unit test of the function it breaks.
    slow = (
        "test_demo.py",
        "test_finetune_and_eval.py",
        "test_examples.py",
        "test_finetuning.py",
        "test_gpu.py",
    )
    for mutant in mc.MUTANTS:
        for test in mutant.tests:
            assert not test.lstrip("?").split("::")[0].endswith(slow), f"{mutant.name}: {test}"
            assert mc._exists(test), f"{mutant.name}: {test} does not exist"
