"""The ``ragkit`` command line: one sub-command per task, each defined next to the code it drives."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main"]

# sub-command -> module defining ``configure_parser(parser)`` and ``run(args) -> int``.
# Modules are imported only when their command runs, so ``ragkit --help`` stays fast.
_COMMANDS: dict[str, tuple[str, str]] = {
    "build-index": ("ragkit.retrieval.building", "embed a corpus and write a custom index"),
    "convert-legacy": ("ragkit.retrieval.legacy", "convert DPR's pickled legacy index to a pickle-free one"),
    "consolidate": ("ragkit.commands.consolidate", "build a RAG checkpoint from a question encoder and a generator"),
    "finetune": ("ragkit.commands.finetune", "fine-tune a RAG model on question/answer pairs"),
    "eval": ("ragkit.evaluation", "evaluate answers (EM, F1) or retrieval (precision@k)"),
    "demo": ("ragkit.demo", "index, train and answer end to end, offline"),
}


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one (still empty) sub-parser per command."""
    parser = argparse.ArgumentParser(prog="ragkit", description="Retrieval-augmented generation tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    command_parsers = {}
    for name, (module, help_text) in _COMMANDS.items():
        command_parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        command_parsers[name].set_defaults(_module=module)
    return parser, command_parsers


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ragkit`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, command_parsers = _build_parser()
    # Only the command that runs has its arguments (and its module) loaded.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in _COMMANDS:
        importlib.import_module(_COMMANDS[command][0]).configure_parser(command_parsers[command])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
