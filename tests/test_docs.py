"""The README and docs/ run as written: every offline code block runs, Hub-only ones fail fast and short.

Blocks are read by ``docs_helpers`` (its docstring lists the markers). Each runnable block is one test:
bash blocks run with ``bash -e`` in a temporary directory, Python blocks as a script there, with this
virtual environment's ``bin`` first on PATH and the Hub switched off (``HF_HUB_OFFLINE=1``). ``pip install``
lines are not re-run: each must be one that ``.ci/run`` runs on a fresh virtual environment, so CI checks
them on every run. Blocks with the same commands (the README's and the quickstart's ``ragkit demo``) run once.

Cheap checks of the text itself come first: fence languages, markers, install lines, flags against each
command's parser, links, and words that describe the project's history rather than the product.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from docs_helpers import REPO, Block, ci_install_commands, doc_files, read_blocks, split_install_commands

# A Hub-only command may take this much longer than the same command's ``--help`` (its start-up) to fail.
HUB_FAIL_SECONDS = 20.0
# A Hub-only command's message: at most this many lines (progress bars and log lines excluded).
HUB_MESSAGE_LINES = 8
BLOCK_TIMEOUT_S = 1800  # `ragkit demo` takes about 2 minutes on 2 idle cores, far longer on a loaded machine

ALL_BLOCKS: list[Block] = [b for path in doc_files() for b in read_blocks(path)]
RUNNABLE_BLOCKS = [b for b in ALL_BLOCKS if b.runner]


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _bin_dir(tmp_root: Path) -> Path:
    """A directory holding the ``ragkit`` command of this environment (a shim if the script is missing)."""
    venv_bin = Path(sys.executable).parent
    if (venv_bin / "ragkit").exists():
        return venv_bin
    # An editable install without its console script (e.g. installed before the entry point existed):
    # the same entry point, called through this interpreter.
    shim_dir = tmp_root / "bin"
    shim_dir.mkdir(exist_ok=True)
    shim = shim_dir / "ragkit"
    shim.write_text(f"#!{sys.executable}\nimport sys\nfrom ragkit.cli import main\nsys.exit(main())\n")
    shim.chmod(0o755)
    return shim_dir


def _environment(bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [src, env.get("PYTHONPATH", "")] if p)
    env.pop("RAGKIT_DEBUG", None)
    return env


def _script(block: Block) -> str:
    """What actually runs: the block's code minus its install commands (checked against CI instead)."""
    if block.runner == "python":
        return block.code
    _, rest = split_install_commands(block.code)
    return rest


def _run(
    block: Block, cwd: Path, env: dict[str, str], timeout: float = BLOCK_TIMEOUT_S
) -> subprocess.CompletedProcess:
    if block.runner == "python":
        script = cwd / f"_doc_block_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", _script(block)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _describe(result: subprocess.CompletedProcess) -> str:
    return f"exit code {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"


def _message_lines(text: str) -> list[str]:
    """Lines of a command's output that are its message (not progress bars or log records)."""
    log_line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
    return [
        line
        for line in text.replace("\r", "\n").splitlines()
        if line.strip() and not log_line.match(line) and "it/s]" not in line and "%|" not in line
    ]


def _commands(code: str) -> list[str]:
    """The commands of a bash block, continuation lines joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _groups() -> list[list[Block]]:
    """Runnable blocks to test, identical scripts without dependencies merged into one test."""
    groups: dict[str, list[Block]] = {}
    for block in RUNNABLE_BLOCKS:
        script = _script(block)
        body = "\n".join(_commands(script)) if block.runner == "bash" else script.strip()
        key = f"{block.runner}\n{body}" if not block.names("needs") else block.where
        if block.marker("hub-only") is not None or block.names("setup"):
            key = block.where
        groups.setdefault(key, []).append(block)
    return list(groups.values())


def _param(group: list[Block]):
    block = group[0]
    marks = []
    if block.marker("slow") is not None:
        marks.append(pytest.mark.slow)
    return pytest.param(group, id=" = ".join(b.where for b in group), marks=marks)


# ----------------------------------------------------------------------------------------------------
# The text
# ----------------------------------------------------------------------------------------------------


def test_the_docs_have_runnable_blocks():
    # Catches a reader that finds nothing (a broken fence pattern would make every test below vacuous).
    assert len(RUNNABLE_BLOCKS) >= 10, [b.where for b in ALL_BLOCKS]
    assert any(b.path.name == "README.md" and "ragkit demo" in b.code for b in RUNNABLE_BLOCKS)


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.where)
def test_every_fence_names_its_language(block):
    # An unlabelled fence leaves it unclear whether it is a command to run or an output sample.
    assert block.language, f"{block.where}: say the fence's language (bash, python, text, console, json, ...)"


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.where)
def test_markers_fit_their_block(block):
    if block.markers and not block.runner:
        pytest.fail(
            f"{block.where}: doc-test markers on a {block.language or 'plain'} block, which never runs"
        )
    page = [b for b in ALL_BLOCKS if b.path == block.path]
    for name in block.names("needs"):
        setups = [b for b in page if name in b.names("setup") and b.line < block.line]
        assert setups, f"{block.where}: needs {name!r}, but no earlier block of the page is 'setup {name}'"
    if block.runner and "pytest" in block.code:
        assert block.marker("skip") is not None, (
            f"{block.where}: a block that runs pytest cannot run inside the test suite; mark it "
            "'<!-- doc-test: skip the test suite itself -->'"
        )


@pytest.mark.parametrize("block", [b for b in RUNNABLE_BLOCKS if b.runner == "bash"], ids=lambda b: b.where)
def test_install_lines_are_what_ci_installs(block):
    # A runnable install line must be checked somewhere: CI runs exactly these on a fresh environment.
    installs, _ = split_install_commands(block.code)
    if block.marker("skip") is not None:
        return
    unknown = [c for c in installs if c not in ci_install_commands()]
    assert not unknown, (
        f"{block.where}: {unknown} is not an install .ci/run performs; use the clone install it runs "
        "(pip install torch==2.13.0, pip install -e \".[test]\") or mark the block 'skip REASON'"
    )


def test_no_install_of_the_unrelated_pypi_project():
    # ``ragkit`` on PyPI is someone else's package; the distribution is ragkit-torch.
    pattern = re.compile(r"pip install\s+(-\S+\s+)*['\"]?ragkit(?![-\w])")
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in doc_files()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found


_HISTORY = re.compile(
    r"(?i:\bsessions?\b)|\bthe seed\b(?! and)|\bseed's\b|\bseed example|(?<![Tt]ransformers )(?<!#)\bissue \d+"
    r"|\bearlier (?:runs of the project|versions of this page)|\bbefore the review\b|\bin the run before\b"
)


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_project_history_words(path):
    # The docs say what is true now; "session 3", "the seed's", "issue 5" describe how it was made.
    hits = [
        f"{n}: {line.strip()}"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _HISTORY.search(line) and "doc-test:" not in line
    ]
    assert not hits, hits


_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_paths_stay_in_the_repository(path):
    text = path.read_text(encoding="utf-8")
    problems = []
    for match in _LINK.finditer(text):
        target = match.group("target")
        if re.match(r"^[a-z]+://|^mailto:", target) or target.startswith("#"):
            continue
        file_part = target.split("#")[0]
        resolved = (path.parent / file_part).resolve()
        if not resolved.exists():
            problems.append(f"link to a missing file: {target}")
        elif REPO not in resolved.parents and resolved != REPO:
            problems.append(f"link outside the repository: {target}")
    problems += [f"path outside the repository: {m}" for m in re.findall(r"/work/\S+|\.\./shared\S*", text)]
    assert not problems, problems


def _command_flags() -> list[tuple[str, str, str]]:
    """(where, command, flag) for every ``ragkit <command> ... --flag`` written in the docs."""
    found = []
    for block in ALL_BLOCKS:
        if block.language not in ("bash", "sh", "shell", "console", "text", ""):
            continue
        for command_line in _commands(block.code):
            for part in re.split(r"&&|\|", command_line):
                words = part.split()
                if len(words) < 2 or words[0] != "ragkit" or words[1].startswith("-"):
                    continue
                for word in words[2:]:
                    if word.startswith("#"):
                        break
                    if word.startswith("--"):
                        found.append((block.where, words[1], word.split("=")[0]))
    for path in doc_files():  # inline code: `ragkit finetune --resume`
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for inline in re.findall(r"`ragkit ([a-z-]+)((?: [^`]*)?)`", line):
                found += [
                    (f"{path.relative_to(REPO)}:{n}", inline[0], w.split("=")[0])
                    for w in inline[1].split()
                    if w.startswith("--")
                ]
    return found


def test_docs_spell_flags_with_underscores():
    # One spelling in the docs (the commands accept both): --words_per_passage, not --words-per-passage.
    hyphenated = [f"{where}: ragkit {cmd} {flag}" for where, cmd, flag in _command_flags() if "-" in flag[2:]]
    assert not hyphenated, hyphenated


def test_every_documented_flag_is_accepted_by_its_command():
    import importlib

    from ragkit import cli

    _, parsers = cli._build_parser()
    known = {}
    for name, parser in parsers.items():
        importlib.import_module(cli._COMMANDS[name][0]).configure_parser(parser)
        known[name] = {opt for action in parser._actions for opt in action.option_strings}
    problems = []
    for where, command, flag in _command_flags():
        if command not in known:
            problems.append(f"{where}: no command 'ragkit {command}'")
        elif flag not in known[command] and flag != "--help":
            problems.append(f"{where}: 'ragkit {command}' has no {flag}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------------------
# Running the blocks
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doc_run_root():
    root = Path(tempfile.mkdtemp(prefix="ragkit-doc-tests-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


class _Pages:
    """Per page, the directory its setup blocks ran in and which of them ran."""

    def __init__(self, root: Path):
        self.root = root
        self.dirs: dict[Path, Path] = {}
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def shared_dir(self, page: Path) -> Path:
        if page not in self.dirs:
            self.dirs[page] = Path(tempfile.mkdtemp(prefix=page.stem + "-", dir=self.root))
        return self.dirs[page]

    def ensure(self, block: Block, env: dict[str, str]) -> None:
        """Run the setup blocks ``block`` needs (and theirs) once, in the page's directory."""
        page = [b for b in RUNNABLE_BLOCKS if b.path == block.path]
        for name in block.names("needs"):
            for setup in (b for b in page if name in b.names("setup") and b.line < block.line):
                if setup.where not in self.done:
                    self.ensure(setup, env)
                    self.done[setup.where] = _run(setup, self.shared_dir(block.path), env)
                result = self.done[setup.where]
                if result.returncode != 0:
                    pytest.fail(f"setup block {setup.where} ({name}) failed:\n{_describe(result)}")


@pytest.fixture(scope="module")
def pages(doc_run_root):
    return _Pages(doc_run_root)


@pytest.fixture(scope="module")
def doc_env(doc_run_root):
    return _environment(_bin_dir(doc_run_root))


_STARTUP: dict[str, float] = {}


def _startup_seconds(command: str, env: dict[str, str], cwd: Path) -> float:
    """Wall time of ``ragkit <command> --help`` here: the start-up a failing command pays anyway."""
    if command not in _STARTUP:
        start = time.monotonic()
        subprocess.run(["ragkit", command, "--help"], cwd=cwd, env=env, capture_output=True, timeout=600)
        _STARTUP[command] = time.monotonic() - start
    return _STARTUP[command]


def _check_hub_only(block: Block, cwd: Path, env: dict[str, str]) -> None:
    if block.runner == "python":
        start = time.monotonic()
        result = _run(block, cwd, env, timeout=600)
        elapsed = time.monotonic() - start
        assert result.returncode != 0, f"{block.where} needs the Hub but ran offline:\n{_describe(result)}"
        raised = re.findall(r"^([A-Za-z_][\w.]*): ", result.stderr, flags=re.M)
        assert raised and re.fullmatch(r"ragkit\.errors\.\w+", raised[-1]), (
            f"{block.where}: offline, it should raise one of ragkit.errors' types:\n{_describe(result)}"
        )
        start = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", "import ragkit"], cwd=cwd, env=env, capture_output=True, timeout=600
        )
        startup = time.monotonic() - start
        assert elapsed < startup + 2 * HUB_FAIL_SECONDS, (
            f"{block.where}: took {elapsed:.0f} s to fail offline"
        )
        return
    for command in _commands(block.code):
        words = command.split()
        assert words[0] == "ragkit", (
            f"{block.where}: hub-only bash blocks hold ragkit commands only: {command}"
        )
        startup = _startup_seconds(words[1], env, cwd)
        start = time.monotonic()
        result = subprocess.run(
            ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
        )
        elapsed = time.monotonic() - start
        output = result.stdout + result.stderr
        assert result.returncode != 0, (
            f"{block.where}: `{command}` needs the Hub but ran offline:\n{_describe(result)}"
        )
        assert "Traceback" not in output, (
            f"{block.where}: `{command}` offline prints a traceback:\n{_describe(result)}"
        )
        message = _message_lines(output)
        assert message and len(message) <= HUB_MESSAGE_LINES, (
            f"{block.where}: `{command}` offline should end in a short message:\n{_describe(result)}"
        )
        assert re.search(
            r"offline|HF_HUB_OFFLINE|network|connect|internet|reach", "\n".join(message), flags=re.I
        ), f"{block.where}: `{command}` offline should say the Hub is out of reach:\n{_describe(result)}"
        assert any(f"ragkit {words[1]}: error:" in line for line in message), (
            f"{block.where}: `{command}` offline should say 'ragkit {words[1]}: error: ...':\n{_describe(result)}"
        )
        assert elapsed < startup + HUB_FAIL_SECONDS, (
            f"{block.where}: `{command}` took {elapsed:.0f} s to fail offline (start-up {startup:.0f} s)"
        )


_GROUPS = _groups()


@pytest.mark.parametrize("group", [_param(g) for g in _GROUPS if g[0].marker("skip") is None])
def test_block_runs_as_written(group, pages, doc_env, doc_run_root):
    block = group[0]
    if block.marker("hub-only") is not None:
        pages.ensure(block, doc_env)
        shared = bool(block.names("needs"))
        cwd = pages.shared_dir(block.path) if shared else Path(tempfile.mkdtemp(dir=doc_run_root))
        _check_hub_only(block, cwd, doc_env)
        return
    if block.names("needs") or block.names("setup"):
        pages.ensure(block, doc_env)
        cwd = pages.shared_dir(block.path)
        if block.where in pages.done:  # a setup block another test already ran
            result = pages.done[block.where]
        else:
            result = _run(block, cwd, doc_env)
            pages.done[block.where] = result
    else:
        result = _run(block, Path(tempfile.mkdtemp(dir=doc_run_root)), doc_env)
    assert result.returncode == 0, f"{block.where} failed as written:\n{_describe(result)}"
    for expected in (arg for kind, arg in block.markers if kind == "expect"):
        assert expected in result.stdout + result.stderr, (
            f"{block.where}: output lacks {expected!r}:\n{_describe(result)}"
        )


def test_skipped_blocks_say_why():
    # A skip hides a block from the tests: each names its reason (GPU, Ray cluster, download size).
    bare = [
        b.where for b in RUNNABLE_BLOCKS if b.marker("skip") is not None and len(b.marker("skip").split()) < 2
    ]
    assert not bare, bare


def test_marker_parser_reads_what_it_should(tmp_path):
    # The reader itself: markers bind to the next fence only; indented fences and languages are read.
    page = tmp_path / "page.md"
    page.write_text(
        textwrap.dedent(
            """\
            <!-- doc-test: setup data -->
            <!-- doc-test: slow -->

            ```bash
            echo hi > x.txt
            ```

            Some text.

            ```python
            print(open("x.txt").read())
            ```
            <!-- doc-test: needs data -->
            ```sh
            cat x.txt
            ```

            1. A list item

               ```text
               output
               ```
            """
        )
    )
    blocks = read_blocks(page)
    assert [b.language for b in blocks] == ["bash", "python", "sh", "text"]
    assert blocks[0].names("setup") == ["data"] and blocks[0].marker("slow") == ""
    assert blocks[1].markers == []
    assert blocks[2].names("needs") == ["data"]
    assert blocks[3].code == "output\n"
    installs, rest = split_install_commands(
        'pip install torch==2.13.0 && pip install -e ".[test]" && ragkit demo\n'
    )
    assert (
        installs == ["pip install torch==2.13.0", "pip install -e .[test]"] and rest.strip() == "ragkit demo"
    )
