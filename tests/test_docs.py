"""``docs/gen_protocol_tables.py --check`` passes on docs/protocol.md and catches drift in its
prose: another protocol version than the code's, or project ids called server-assigned."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from dcproto import protocol as p

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "gen_protocol_tables.py"
DOC = ROOT / "docs" / "protocol.md"
VERSION_LINE = re.compile(r"Protocol version: \*\*\d+\*\*")


def check(doc: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--doc", str(doc)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protocol_tables", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_doc_passes() -> None:
    result = check(DOC)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def _drifted(tmp_path: Path, edit: str) -> Path:
    text = DOC.read_text(encoding="utf-8")
    if edit == "version":
        assert VERSION_LINE.search(text), "the doc no longer states its protocol version"
        text = VERSION_LINE.sub(f"Protocol version: **{p.PROTOCOL_VERSION + 1}**", text, count=1)
    else:
        text = text.replace(
            "A project belongs to the identity that submitted it.",
            f"A project belongs to the identity that submitted it. {edit}",
            1,
        )
        assert edit in text
    copy = tmp_path / "protocol.md"
    copy.write_text(text, encoding="utf-8")
    return copy


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("version", f"the prose says protocol version {p.PROTOCOL_VERSION + 1}"),
        ("Project ids are server-assigned.", "project ids are creator-chosen"),
        ("The project id is assigned by the server.", "project ids are creator-chosen"),
        ("Each project_id is Server-Assigned at Submit.", "project ids are creator-chosen"),
    ],
)
def test_drift_in_a_copy_fails_the_check(tmp_path: Path, edit: str, message: str) -> None:
    result = check(_drifted(tmp_path, edit))
    assert result.returncode == 1
    assert message in result.stderr
    assert str(tmp_path / "protocol.md") in result.stderr  # it names the file it checked


def test_prose_problems_directly() -> None:
    """The same facts on a minimal doc, whatever else the real doc holds."""
    script = load_script()
    version = f"Protocol version: **{p.PROTOCOL_VERSION}**."
    good = f"# Protocol\n\n{version}\n\nTask ids are server-assigned.\n"
    assert script.prose_problems(good) == []
    assert script.prose_problems(good.replace(f"**{p.PROTOCOL_VERSION}**", "**1**"))
    assert script.prose_problems("no version here\n")
    bad = good + "\n| `project_id` | server-assigned id |\n"
    assert any("creator-chosen" in problem for problem in script.prose_problems(bad))
