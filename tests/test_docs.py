"""The docs stay true: every pass and backend has its page, every example runs from its page as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from codesign.backends import backend_names
from codesign.passes import pass_names

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def _blocks(page: Path, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(page.read_text()) if kind == lang]


def _example_sections() -> dict[str, list[str]]:
    """examples.md: the example file each section is about (its heading names it) -> its bash commands."""
    sections: dict[str, list[str]] = {}
    for chunk in re.split(r"^## ", (DOCS / "examples.md").read_text(), flags=re.M)[1:]:
        named = re.search(r"`examples/(\w+)\.py`", chunk.splitlines()[0])
        assert named, f"examples.md section {chunk.splitlines()[0]!r} does not name its example file"
        commands = [
            line
            for kind, body in FENCE.findall(chunk)
            if kind == "bash"
            for line in body.splitlines()
            if line.strip()
        ]
        sections[named.group(1)] = commands
    return sections


def _venv_bin() -> str:
    """Commands are written for the README set-up (.venv); elsewhere run them with this interpreter's bin."""
    return ".venv/bin/" if (ROOT / ".venv" / "bin").is_dir() else str(Path(sys.executable).parent) + "/"


def test_every_pass_and_backend_has_a_page_with_its_generated_knob_table() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for folder, names in (("passes", pass_names()), ("backends", backend_names())):
        for name in names:
            page = DOCS / folder / f"{name}.md"
            assert page.is_file(), f"docs/{folder}/{name}.md is missing"
            assert f"{{{{ knobs: {name} }}}}" in page.read_text(), f"{page} lacks its knob table"
            assert f"{folder}/{name}.md" in nav, f"{page} is not in mkdocs.yml's nav"


def test_every_example_file_has_a_section_with_commands() -> None:
    sections = _example_sections()
    files = {p.stem for p in (ROOT / "examples").glob("*.py") if not p.stem.startswith("_")}
    assert set(sections) == files
    for name, commands in sections.items():
        assert commands, f"examples.md shows no command for examples/{name}.py"
        assert any(f"examples/{name}.py" in c or f"out/examples/{name}" in c for c in commands)


def _run_section(name: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for command in _example_sections()[name]:
        command = command.replace(".venv/bin/", _venv_bin())
        done = subprocess.run(
            ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, (
            f"`{command}` failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )


# each command is a fresh interpreter that captures and compiles (10-20 s a section, minutes for the demo):
# `make test-slow` runs every section; the fast suite checks the CLI through test_cli's in-process calls
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_example_sections()))
def test_documented_example_commands_run(name: str) -> None:
    _run_section(name)


# each page is a fresh interpreter that compiles its models (12-25 s): the other two in `make test-slow`
@pytest.mark.parametrize(
    "page",
    [
        "index.md",
        pytest.param("extending.md", marks=pytest.mark.slow),
        pytest.param("own-model.md", marks=pytest.mark.slow),
    ],
)
def test_python_snippets_run(page: str) -> None:
    """The self-contained Python blocks of these pages run in one interpreter, top to bottom."""
    code = "\n\n".join(_blocks(DOCS / page, "python"))
    assert code
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


LINK = re.compile(r"\]\(([^)\s]+)\)|`(\.\./[^`\s]+)`")


def test_no_link_or_path_in_the_docs_leaves_the_repository() -> None:
    """Markdown links and quoted relative paths resolve inside the checkout (a clone has nothing beside it)."""
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.rglob("*.md"))]
    outside = []
    for page in pages:
        for match in LINK.finditer(page.read_text()):
            target = (match.group(1) or match.group(2)).split("#")[0]
            if not target or re.match(r"[a-z]+:", target):  # anchors, http(s):, mailto:
                continue
            resolved = (page.parent / target).resolve()
            if ROOT not in resolved.parents and resolved != ROOT:
                outside.append(f"{page.relative_to(ROOT)}: {target}")
    assert not outside, outside
