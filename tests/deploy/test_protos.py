"""The protos are guarded like a public API: buf's style guide, and no breaking change for a client
built from an earlier version (tools/proto_guard.py; `make lint` runs the same checks)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tools import proto_guard

MODELS_PROTO = Path("ferry/models/v1/models.proto")
GET_MODEL_REQUEST = re.compile(r"(message GetModelRequest \{.*?\n\})", re.DOTALL)
NAME_FIELD = "string name = 1 [(google.api.field_behavior) = REQUIRED];"


@pytest.fixture
def protos(tmp_path: Path) -> Path:
    """A scratch copy of protos/ to edit."""
    return Path(shutil.copytree(proto_guard.PROTOS, tmp_path / "protos"))


@pytest.fixture
def baseline(protos: Path, tmp_path: Path) -> Path:
    """The descriptor set of today's protos: what yesterday's client was built from."""
    return proto_guard.descriptor_set(protos, tmp_path / "baseline.binpb")


def edit_get_model_request(protos: Path, field: str) -> None:
    """Replaces GetModelRequest's `name` field declaration with `field`."""
    path = protos / MODELS_PROTO
    text = path.read_text()
    block = GET_MODEL_REQUEST.search(text)
    assert block is not None, "GetModelRequest is where the test expects it"
    edited = block.group(1).replace(NAME_FIELD, field)
    assert edited != block.group(1), "GetModelRequest declares `name` as the test expects"
    path.write_text(text.replace(block.group(1), edited))


def test_every_proto_passes_buf_lint(tmp_path: Path) -> None:
    proto_guard.lint(proto_guard.descriptor_set(proto_guard.PROTOS, tmp_path / "current.binpb"))


def test_lint_refuses_what_the_style_guide_forbids(protos: Path, tmp_path: Path) -> None:
    # An enum whose zero value is not *_UNSPECIFIED: the kind of slip the guard exists for.
    (protos / MODELS_PROTO).write_text(
        (protos / MODELS_PROTO).read_text() + "\nenum Colour {\n  RED = 0;\n  BLUE = 1;\n}\n"
    )
    with pytest.raises(proto_guard.GuardError, match=r"COLOUR_UNSPECIFIED|should be prefixed"):
        proto_guard.lint(proto_guard.descriptor_set(protos, tmp_path / "edited.binpb"))


def test_renumbered_field_is_a_breaking_change(protos: Path, baseline: Path, tmp_path: Path) -> None:
    edit_get_model_request(protos, NAME_FIELD.replace("= 1 ", "= 7 "))
    with pytest.raises(proto_guard.GuardError, match="GetModelRequest"):
        proto_guard.breaking(proto_guard.descriptor_set(protos, tmp_path / "edited.binpb"), baseline)


def test_additive_change_is_not_breaking(protos: Path, baseline: Path, tmp_path: Path) -> None:
    # A new field with a fresh number, as ferry adds fields: old clients never send it.
    edit_get_model_request(protos, NAME_FIELD + "\n  string hint = 99;")
    proto_guard.breaking(proto_guard.descriptor_set(protos, tmp_path / "edited.binpb"), baseline)


def test_main_checks_the_tree_against_the_previous_commit(capsys: pytest.CaptureFixture[str]) -> None:
    assert proto_guard.main([]) == 0
    out = capsys.readouterr().out
    assert "buf lint:" in out
    assert "buf breaking:" in out
