"""Reading the fenced code blocks of README.md and docs/*.md, and the markers that say how to test them.

A marker is an HTML comment on the line(s) just before a fence (blank lines between are allowed):

    <!-- doc-test: skip REASON -->        not run here (GPU, Ray cluster, multi-GB download); REASON required
    <!-- doc-test: hub-only -->           needs the Hub: run with HF_HUB_OFFLINE=1, it must fail fast with a
                                          short ragkit message (commands) or a ragkit error (Python)
    <!-- doc-test: setup NAME -->         makes files that later blocks of the same page use
    <!-- doc-test: needs NAME [NAME] -->  runs in the directory of the setup block(s) NAME, after them
    <!-- doc-test: expect TEXT -->        the output must contain TEXT
    <!-- doc-test: slow -->               a long run (marked ``slow``; CI still runs it)

Fences whose language is ``bash``/``sh``/``shell`` or ``python``/``py`` run; every other language
(``text``, ``console``, ``json``, ``toml``, ...) is an illustration and does not.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "REPO",
    "Block",
    "ci_install_commands",
    "doc_files",
    "read_blocks",
    "split_install_commands",
]

REPO = Path(__file__).resolve().parents[1]
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
MARKER_KINDS = {"skip", "hub-only", "setup", "needs", "expect", "slow"}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<body>.*?)\s*-->\s*$")


@dataclass
class Block:
    """One fenced code block of a Markdown page."""

    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    markers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def runner(self) -> str | None:
        return RUNNABLE.get(self.language)

    def marker(self, kind: str) -> str | None:
        """The argument of the first marker of that kind ('' when it has none), or None."""
        return next((arg for k, arg in self.markers if k == kind), None)

    def names(self, kind: str) -> list[str]:
        """Every name given to markers of that kind (``setup``, ``needs``)."""
        return [name for k, arg in self.markers if k == kind for name in arg.split()]


def doc_files() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _parse_marker(body: str, where: str) -> tuple[str, str]:
    kind, _, arg = body.partition(" ")
    if kind not in MARKER_KINDS:
        raise ValueError(
            f"{where}: unknown doc-test marker {kind!r} (known: {', '.join(sorted(MARKER_KINDS))})"
        )
    if kind in {"skip", "setup", "needs", "expect"} and not arg.strip():
        raise ValueError(f"{where}: the doc-test marker {kind!r} needs an argument")
    return kind, arg.strip()


def read_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of one page, with the markers written before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        if marker:
            pending.append(_parse_marker(marker.group("body"), f"{path.name}:{i + 1}"))
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence is None:
            if line.strip():
                pending = []  # a marker applies to the next fence only, across blank lines at most
            i += 1
            continue
        opening, indent = fence.group("fence"), len(fence.group("indent"))
        language = fence.group("info").strip().split(" ")[0].lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(
            rf"^ {{0,3}}{re.escape(opening[0])}{{{len(opening)},}}\s*$", lines[j]
        ):
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        blocks.append(Block(path, i + 1, language, "\n".join(body) + "\n", pending))
        pending = []
        i = j + 1
    return blocks


def ci_install_commands() -> set[str]:
    """The ``pip install`` commands CI runs on a fresh virtual environment (``.ci/run``), normalized."""
    commands = set()
    for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines():
        words = _words(line)
        if "pip" in words and "install" in words:
            commands.add(_normalize_install(words))
    return commands


def _normalize_install(words: list[str]) -> str:
    """``python -m pip install -q X`` and ``pip install X`` -> ``pip install X``."""
    after = words[words.index("install") + 1 :]
    return "pip install " + " ".join(w for w in after if w not in {"-q", "--quiet"})


def _words(command: str) -> list[str]:
    """Shell words of one command (comments dropped)."""
    try:
        return shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote or a trailing backslash: not an install line we can check
        return command.split()


def split_install_commands(code: str) -> tuple[list[str], str]:
    """Separate a bash block's ``pip install`` commands from the rest.

    Returns:
        The install commands (normalized) and the block without them (lines and ``&&`` chains kept).
    """
    installs: list[str] = []
    kept_lines = []
    for line in code.splitlines():
        parts = [p.strip() for p in line.split("&&")]
        rest = []
        for part in parts:
            words = _words(part) if part.startswith(("pip ", "python -m pip ")) else []
            if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
                installs.append(_normalize_install(words))
            else:
                rest.append(part)
        kept_lines.append(" && ".join(p for p in rest if p))
    return installs, "\n".join(kept_lines) + "\n"
