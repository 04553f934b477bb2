"""The ``ragkit`` command line: a small dispatcher over the sub-commands of :mod:`ragkit.commands`.

Every command fails the same way: a user error (bad argument or file, missing input, a Hub that is
offline or out of reach) ends in one ``ragkit <cmd>: error: ...`` message on stderr and exit code 2,
without a traceback; ``--debug`` (or ``RAGKIT_DEBUG=1``) shows it. Anything else is a bug and keeps its
traceback. Options are accepted with underscores (as documented) or dashes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

__all__ = ["main"]

# sub-command -> (module defining ``configure_parser(parser)`` and ``run(args) -> int``, help).
# Modules are imported only when their command runs, so ``ragkit --help`` stays fast.
_COMMANDS: dict[str, tuple[str, str]] = {
    "build-index": ("ragkit.commands.build_index", "embed a corpus and write a custom index"),
    "convert-legacy": (
        "ragkit.commands.convert_legacy",
        "convert DPR's pickled legacy index to a pickle-free one",
    ),
    "consolidate": (
        "ragkit.commands.consolidate",
        "build a RAG checkpoint from a question encoder and a generator",
    ),
    "finetune": ("ragkit.commands.finetune", "fine-tune a RAG model on question/answer pairs"),
    "eval": ("ragkit.commands.eval", "evaluate answers (EM, F1) or retrieval (precision@k)"),
    "demo": ("ragkit.commands.demo", "index, train and answer end to end, offline"),
}
#: Lines of an error message shown (the rest is in the ``--debug`` traceback).
_MAX_ERROR_LINES = 8
_DEBUG_HELP = "show the full traceback of an error (also RAGKIT_DEBUG=1)"


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: a bad argument fails like the command does, in one line and a pointer to ``--help``.

    argparse's default prints the whole usage block (a dozen lines for ``eval``) before the message, which
    hides the one line that says what is wrong.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n  see `{self.prog} --help` for the options\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Help lines end with the default where there is one worth saying (not None/False, not said already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unsaid = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unsaid or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one (still empty) sub-parser per command."""
    parser = argparse.ArgumentParser(prog="ragkit", description="Retrieval-augmented generation tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    command_parsers = {}
    for name, (module, help_text) in _COMMANDS.items():
        command_parser = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog="Every option is also accepted with dashes in place of its underscores.",
            formatter_class=_HelpFormatter,
        )
        command_parser.set_defaults(_module=module)
        # Also after the command name; SUPPRESS keeps a top-level --debug/-v from being reset.
        command_parser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
        )
        command_parser.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages"
        )
        command_parsers[name] = command_parser
    return parser, command_parsers


def _other_spelling(option: str) -> str:
    """``--words-per-passage`` <-> ``--words_per_passage`` (the leading dashes kept)."""
    name = option[2:]
    swapped = name.replace("-", "_") if "-" in name else name.replace("_", "-")
    return "--" + swapped


def _normalize_spellings(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Rewrite options written with the other separator (dashes for underscores, or back) to the known one."""
    known = set(parser._option_string_actions)
    out = []
    for token in argv:
        if token == "--":
            out.extend(argv[len(out) :])
            break
        if token.startswith("--") and len(token) > 2:
            option, sep, value = token.partition("=")
            if option not in known and _other_spelling(option) in known:
                token = _other_spelling(option) + sep + value
        out.append(token)
    return out


def _hub_error_types() -> tuple[type[BaseException], ...]:
    """huggingface_hub's (and its HTTP client's) errors for Hub files that cannot be had."""
    types: list[type[BaseException]] = []
    try:
        from huggingface_hub import errors

        types += [errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled]
        types += [errors.EntryNotFoundError]
    except ImportError:
        pass
    for module_name, names in (
        ("httpx", ("TransportError", "HTTPStatusError")),
        ("requests", ("RequestException",)),
    ):
        module = sys.modules.get(module_name)
        types += [getattr(module, n) for n in names if module is not None and hasattr(module, n)]
    return tuple(types)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that come from what the user gave or from the environment, not from a bug in ragkit."""
    import pickle

    from .errors import RagkitError

    # ValueError covers bad values and file contents (JSON, Unicode); OSError missing files, permissions,
    # connections; ImportError a missing optional package.
    types = (RagkitError, ValueError, OSError, ImportError, pickle.UnpicklingError, *_hub_error_types())
    torch = sys.modules.get("torch")
    out_of_memory = getattr(torch, "OutOfMemoryError", None)
    return (*types, out_of_memory) if out_of_memory is not None else types


def _is_internal_import_error(err: BaseException) -> bool:
    """An import of ragkit's own modules failed: a broken installation or a bug, shown with its traceback."""
    from .errors import RagkitError

    if not isinstance(err, ImportError) or isinstance(err, RagkitError):
        return False
    return (err.name or "").split(".")[0] == "ragkit"


def _hint(err: BaseException) -> str:
    """What to do, for errors whose own message may not say it (the Hub's, out of memory)."""
    from .errors import RagkitError

    if isinstance(err, RagkitError):  # ragkit's own messages say what to do
        return ""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return "hint: lower the batch size (--eval_batch_size, --train_batch_size, --batch_size) or use --device cpu."
    hub = _hub_error_types()
    if hub and isinstance(err, hub):
        return (
            "hint: check the name (a Hub id like org/name, or a local directory) and your network; offline, set "
            "HF_HUB_OFFLINE=1 and use local files (for build-index: --encoder all-MiniLM-L6-v2)."
        )
    return ""


def _format_error(command: str, err: BaseException) -> str:
    """``ragkit <cmd>: error: <message>`` in a few lines, with a hint where the message lacks one."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    shown = lines[:_MAX_ERROR_LINES]
    if len(lines) > _MAX_ERROR_LINES:
        shown.append("... (run with --debug for the full message)")
    hint = _hint(err)
    if hint:
        shown.append(hint)
    return f"ragkit {command}: error: " + "\n  ".join(shown)


def _configure_logging(verbose: bool) -> None:
    """ragkit's INFO messages (DEBUG with -v); other libraries' only from WARNING (faiss's loader probes)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("ragkit").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ragkit`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, command_parsers = _build_parser()
    # Only the command that runs has its arguments (and its module) loaded.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in _COMMANDS:
        importlib.import_module(_COMMANDS[command][0]).configure_parser(command_parsers[command])
        at = argv.index(command) + 1
        argv = argv[:at] + _normalize_spellings(argv[at:], command_parsers[command])
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    debug = args.debug or os.environ.get("RAGKIT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE  # a command may switch downloads off once it finds no network
    try:
        module = importlib.import_module(args._module)
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"ragkit {args.command}: interrupted", file=sys.stderr)  # noqa: T201 (command output)
        return 130
    except _user_error_types() as err:
        if debug or _is_internal_import_error(err):
            raise
        print(_format_error(args.command, err), file=sys.stderr)  # noqa: T201 (command output)
        return 2
    finally:
        constants.HF_HUB_OFFLINE = offline


if __name__ == "__main__":
    sys.exit(main())
