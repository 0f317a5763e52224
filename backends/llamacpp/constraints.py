"""Checks a constraint before llama.cpp runs it.

llama.cpp compiles llguidance grammars (Lark, and JSON Schemas as `%json`) when a request's sampler is
set up, and when that fails it logs the error and generates UNCONSTRAINED: the caller would get text
that ignores the schema. So every llguidance grammar is compiled here first with the llguidance
library itself, and a failure is an INVALID_PARAMETER with its message. GBNF is left to llama.cpp,
whose parser fails the request cleanly. The inference service runs the same check before admission,
so callers hear of a bad schema without waiting for an engine slot.
"""

from __future__ import annotations

import re

import llguidance

from backends.llamacpp.contract import ConstraintKind, OutputConstraint


def constraint_problem(constraint: OutputConstraint) -> str | None:
    """Why the engine could not enforce `constraint`, or None when it can."""
    if constraint.kind is ConstraintKind.GBNF:
        return None
    try:
        problem: str = llguidance.LLMatcher.validate_grammar(constraint.engine_grammar())
    except Exception as exc:  # the library raises on inputs it cannot even read
        problem = str(exc)
    if not problem.strip():
        return None
    # The first line says what is wrong; the rest lists the grammar text with a caret.
    first = problem.strip().splitlines()[0]
    where = _POSITION.match(first)
    if where is None:
        return first
    rest = first[where.end() :]
    if constraint.kind is ConstraintKind.LARK:
        # Lines count from the caller's grammar, without the header line llama.cpp needs.
        return f"line {int(where['line']) - 1}, column {where['column']}: {rest}"
    return rest


# "at 2(8): " or "2(15): " in front of llguidance's messages.
_POSITION = re.compile(r"^(at )?(?P<line>\d+)\((?P<column>\d+)\):\s*")
