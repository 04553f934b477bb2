"""Every script in examples/ runs offline with --local (tiny random checkpoint, real code paths)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, expected",
    [
        ("generate", "Q: How many people live in Paris?\nA: "),
        ("use_own_knowledge_dataset", "indexed 16 passages (32 dims)"),
        ("consolidate_rag_checkpoint", "RAG checkpoint written to"),
        ("finetune_rag", "fine-tuned model written to"),
        ("eval_rag", "em: "),
    ],
)
def test_example_runs_locally(name, expected, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the examples import their shared `_local` helper
    assert _load(name).main(["--local"]) == 0
    out = capsys.readouterr().out
    assert expected in out
