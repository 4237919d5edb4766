"""The docs cannot drift from the CLI: every ``regablate ...`` command line in README.md and docs/ goes
through its command's parser (nothing trains: LightningCLI's subcommands with ``--print_config``, the
tools' parsers alone), and every relative link and anchor resolves. README.md stays short."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from regablate.cli import TOOLS, parse_command
from regablate.lightning_cli import build_cli

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 16 * 1024
FENCE = re.compile(r"^\s*```(\S*)\s*$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
SHELL_BLOCKS = ("bash", "sh", "shell", "console", "")


@dataclass(frozen=True)
class Command:
    """A command line written in a doc, and the error line the doc shows under it (if any)."""

    doc: Path
    line: int
    text: str
    error: str | None = None

    def __str__(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}: {self.text}"


def command_lines(doc: Path) -> list[Command]:
    """``regablate ...`` lines of the doc's code blocks (``$ `` prompts in output blocks, ``\\`` continuations),
    and inline code spans that are whole command lines (a tool and at least one argument, no ``...``)."""
    found: list[Command] = []
    lines = doc.read_text().splitlines()
    in_block, lang, pending, start = False, "", "", 0
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if fence:
            in_block, lang, pending = not in_block, fence.group(1), ""
            continue
        if not in_block:
            for span in re.findall(r"`([^`]+)`", line):
                if span.startswith("regablate ") and len(span.split()) > 2 and "..." not in span:
                    found.append(Command(doc, number, span))
            continue
        text = line.strip()
        if pending:
            text, start = f"{pending} {text}", start
        elif text.startswith("$ "):
            text, start = text[2:], number
        elif lang in SHELL_BLOCKS:
            start = number
        else:
            continue
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        text = text.split(" #", 1)[0].strip()
        if text.startswith("regablate ") and "..." not in text:
            following = lines[number].strip() if number < len(lines) else ""
            error = following.removeprefix("regablate: error: ") if following.startswith("regablate: error:") else None
            found.append(Command(doc, start, text, error))
    return found


COMMANDS = [command for doc in DOCS for command in command_lines(doc)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder like the repository's root, where the run folders the docs name exist (their ``config.yaml``)."""
    root = tmp_path_factory.mktemp("docs")
    for name in ("configs", "tests", "docs", "scripts", "data"):
        if (REPO / name).exists():
            (root / name).symlink_to(REPO / name)
    config = io.StringIO()
    with contextlib.redirect_stdout(config), pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--print_config"])
    for doc_command in COMMANDS:
        for token in shlex.split(doc_command.text):
            if token.startswith("runs/") and token.endswith("config.yaml"):
                (root / token).parent.mkdir(parents=True, exist_ok=True)
                (root / token).write_text(config.getvalue())
    return root


def test_the_docs_hold_commands_of_every_tool():
    tools = {shlex.split(command.text)[1] for command in COMMANDS}
    assert {"fit", "test", *TOOLS} <= tools, tools


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_documented_command_parses(command: Command, workdir: Path, monkeypatch):
    monkeypatch.chdir(workdir)
    argv = shlex.split(command.text)[1:]
    try:
        parse_command(argv)
    except Exception as err:
        message = " ".join(str(err).split())
        if command.error is None or command.error[:40] not in message:
            pytest.fail(f"{command}: {type(err).__name__}: {message[:400]}")


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(REPO)))
def test_every_relative_link_resolves(doc: Path):
    text = doc.read_text()
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no {path})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    slugs = set()
    for line in doc.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return slugs


def test_the_readme_is_short():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into a guide in docs/"
