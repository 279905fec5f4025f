"""Mermaid state diagrams generated from the transition tables (used by docs/protocol.md)."""

from __future__ import annotations

from .states import ASSIGNMENT_TRANSITIONS, TASK_TRANSITIONS, AssignmentState, TaskStatus

#: The states each kind of thing is created in: a task pending; an assignment offered, or
#: queued when every instance of its service is busy.
STARTS = {
    "tasks": (TaskStatus.PENDING,),
    "assignments": (AssignmentState.OFFERED, AssignmentState.QUEUED),
}


def state_diagrams() -> str:
    """Both diagrams as Markdown code blocks; ``tests/test_docs.py`` keeps the docs in sync."""
    blocks = []
    for table, starts in ((TASK_TRANSITIONS, STARTS["tasks"]), (ASSIGNMENT_TRANSITIONS, STARTS["assignments"])):
        lines = ["```mermaid", "stateDiagram-v2", *(f"    [*] --> {start.value}" for start in starts)]
        for state, moves in table.items():
            for trigger, target in moves.items():
                lines.append(f"    {state.value} --> {target.value}: {trigger.value}")
            if not moves:
                lines.append(f"    {state.value} --> [*]")
        lines.append("```")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
