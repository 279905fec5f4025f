"""Mermaid state diagrams generated from the transition tables (used by docs/protocol.md)."""

from __future__ import annotations

from .states import ASSIGNMENT_TRANSITIONS, TASK_TRANSITIONS


def state_diagrams() -> str:
    """Both diagrams as Markdown code blocks; ``tests/test_docs.py`` keeps the docs in sync."""
    blocks = []
    for table, start in ((TASK_TRANSITIONS, "pending"), (ASSIGNMENT_TRANSITIONS, "offered")):
        lines = ["```mermaid", "stateDiagram-v2", f"    [*] --> {start}"]
        for state, moves in table.items():
            for trigger, target in moves.items():
                lines.append(f"    {state.value} --> {target.value}: {trigger.value}")
            if not moves:
                lines.append(f"    {state.value} --> [*]")
        lines.append("```")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
