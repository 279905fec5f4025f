from __future__ import annotations

from pathlib import Path

from taskhub.core.commands import COMMANDS
from taskhub.core.diagram import state_diagrams

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_protocol_doc_has_the_current_state_diagrams():
    text = (DOCS / "protocol.md").read_text()
    for block in state_diagrams().split("\n\n"):
        assert block in text


def test_protocol_doc_shows_every_command():
    text = (DOCS / "protocol.md").read_text()
    for name in COMMANDS:
        assert f'"type": "{name}"' in text, name
