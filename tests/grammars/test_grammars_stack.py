"""The grammar registry on the real stack: create/get/list/update/delete over REST and gRPC with the
right scopes, etags (AIP-154), idempotent create (AIP-155), the engine's check of every grammar, audit
events, and generations constrained by a stored grammar (native and OpenAI APIs)."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Any

import grpc
import httpx
import pytest
from ferry.grammars.v1 import grammars_pb2, grammars_pb2_grpc
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from google.protobuf import field_mask_pb2

from services.common.errors import error_details
from tests.stack import RunningStack, keyed_channel

pytestmark = pytest.mark.stack

Grammar = grammars_pb2.Grammar
YES_NO = 'root ::= "yes" | "no"'
LARK_COLOR = 'start: "red" | "green" | "blue"'


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _create(http: httpx.Client, grammar_id: str, definition: str = YES_NO, **extra: Any) -> httpx.Response:
    body = {"syntax": "SYNTAX_GBNF", "definition": definition, **extra}
    return http.post("/api/v1/grammars", params={"grammar_id": grammar_id}, json=body)


def _violations(response: httpx.Response) -> dict[str, str]:
    """BadRequest field -> description, from a REST error body."""
    out: dict[str, str] = {}
    for detail in response.json().get("details", []):
        for violation in detail.get("fieldViolations", detail.get("field_violations", [])):
            out[violation["field"]] = violation["description"]
    return out


def _reason(response: httpx.Response) -> str:
    for detail in response.json().get("details", []):
        if "reason" in detail:
            return str(detail["reason"])
    return ""


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _events(http: httpx.Client, action: str, resource: str, count: int) -> list[dict[str, Any]]:
    """The audit events of `action` on `resource`, waiting (bounded) until `count` are delivered."""
    query: dict[str, str | int] = {
        "filter": f'action = "{action}" AND resource = "{resource}"',
        "page_size": 100,
    }
    deadline = time.monotonic() + 30
    while True:
        events: list[dict[str, Any]] = http.get("/api/v1/audit/events", params=query).json().get("events", [])
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.2)


def test_rest_lifecycle_with_etags_and_audit(stack: RunningStack) -> None:
    grammar_id = _id("yes-no")
    name = f"grammars/{grammar_id}"
    with stack.http() as http:
        created = _create(http, grammar_id, display_name="Yes or no", description="a one-word answer")
        assert created.status_code == 200, created.text
        grammar = created.json()
        assert grammar["name"] == name and grammar["syntax"] == "SYNTAX_GBNF"
        assert grammar["definition"] == YES_NO and grammar["display_name"] == "Yes or no"
        assert grammar["creator"] == stack.admin_principal
        assert grammar["etag"] and grammar["create_time"] and grammar["update_time"]

        assert http.get(f"/api/v1/{name}").json() == grammar
        listed = [
            g["name"] for g in http.get("/api/v1/grammars", params={"page_size": 1000}).json()["grammars"]
        ]
        assert name in listed

        # update_mask names what changes; the rest stays, and the etag moves on.
        renamed = http.patch(
            f"/api/v1/{name}",
            params={"update_mask": "display_name"},
            json={
                "display_name": "Yes/no",
                "definition": "ignored: not in the mask",
                "etag": grammar["etag"],
            },
        )
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["display_name"] == "Yes/no" and renamed.json()["definition"] == YES_NO
        assert renamed.json()["etag"] != grammar["etag"]
        assert _time(renamed.json()["update_time"]) > _time(grammar["update_time"])

        # The first etag is stale now: an update or a delete with it is refused, and changes nothing.
        stale = http.patch(
            f"/api/v1/{name}",
            params={"update_mask": "description"},
            json={"description": "lost update", "etag": grammar["etag"]},
        )
        assert stale.status_code == 409 and _reason(stale) == "ETAG_MISMATCH", stale.text
        refused = http.delete(f"/api/v1/{name}", params={"etag": grammar["etag"]})
        assert refused.status_code == 409 and _reason(refused) == "ETAG_MISMATCH", refused.text
        assert http.get(f"/api/v1/{name}").json() == renamed.json()

        deleted = http.delete(f"/api/v1/{name}", params={"etag": renamed.json()["etag"]})
        assert deleted.status_code == 200, deleted.text
        gone = http.get(f"/api/v1/{name}")
        assert gone.status_code == 404 and _reason(gone) == "GRAMMAR_NOT_FOUND"
        assert http.delete(f"/api/v1/{name}").status_code == 404

        # Every change is an audit event naming who made it.
        for action in ("grammar.create", "grammar.update", "grammar.delete"):
            events = _events(http, action, name, 1)
            assert len(events) == 1, action
            assert events[0]["principal"] == stack.admin_principal
            assert events[0]["kind"] == "KIND_OPERATIONAL"


def test_grpc_lifecycle_and_pagination(stack: RunningStack) -> None:
    stub = grammars_pb2_grpc.GrammarsServiceStub(stack.channel())
    prefix = _id("page")
    names = []
    for i in range(5):
        made = stub.CreateGrammar(
            grammars_pb2.CreateGrammarRequest(
                grammar_id=f"{prefix}-{i}",
                grammar=Grammar(syntax=Grammar.Syntax.SYNTAX_GBNF, definition=YES_NO),
            ),
            timeout=60,
        )
        names.append(made.name)
    assert stub.GetGrammar(grammars_pb2.GetGrammarRequest(name=names[0]), timeout=10).definition == YES_NO

    # Pages of 2 walk every grammar once, in name order.
    seen: list[str] = []
    token = ""
    while True:
        page = stub.ListGrammars(grammars_pb2.ListGrammarsRequest(page_size=2, page_token=token), timeout=10)
        assert len(page.grammars) <= 2
        seen += [g.name for g in page.grammars]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert [n for n in seen if n.startswith(f"grammars/{prefix}")] == names
    with pytest.raises(grpc.RpcError) as bad_token:
        stub.ListGrammars(grammars_pb2.ListGrammarsRequest(page_token="not-a-token"), timeout=10)
    assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Update with a mask: only the masked field changes; a new definition is checked by the engine.
    current = stub.GetGrammar(grammars_pb2.GetGrammarRequest(name=names[1]), timeout=10)
    updated = stub.UpdateGrammar(
        grammars_pb2.UpdateGrammarRequest(
            grammar=Grammar(name=names[1], definition='root ::= "ok"', description="x", etag=current.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["definition"]),
        ),
        timeout=60,
    )
    assert (
        updated.definition == 'root ::= "ok"' and updated.description == "" and updated.etag != current.etag
    )
    with pytest.raises(grpc.RpcError) as stale:
        stub.UpdateGrammar(
            grammars_pb2.UpdateGrammarRequest(
                grammar=Grammar(name=names[1], display_name="late", etag=current.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            timeout=60,
        )
    assert stale.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.RpcError) as output_only:
        stub.UpdateGrammar(
            grammars_pb2.UpdateGrammarRequest(
                grammar=Grammar(name=names[1]), update_mask=field_mask_pb2.FieldMask(paths=["creator"])
            ),
            timeout=10,
        )
    assert output_only.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask" in output_only.value.details()

    for name in names:
        stub.DeleteGrammar(grammars_pb2.DeleteGrammarRequest(name=name), timeout=10)
    with pytest.raises(grpc.RpcError) as gone:
        stub.GetGrammar(grammars_pb2.GetGrammarRequest(name=names[0]), timeout=10)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_create_is_idempotent_by_request_id_and_ids_are_unique(stack: RunningStack) -> None:
    grammar_id = _id("retry")
    request_id = uuid.uuid4().hex
    with stack.http() as http:
        body = {"syntax": "SYNTAX_GBNF", "definition": YES_NO}
        params = {"grammar_id": grammar_id, "request_id": request_id}
        first = http.post("/api/v1/grammars", params=params, json=body)
        again = http.post("/api/v1/grammars", params=params, json=body)
        assert first.status_code == again.status_code == 200, again.text
        assert again.json() == first.json()
        # The same id from another request: it exists.
        other = http.post("/api/v1/grammars", params={"grammar_id": grammar_id}, json=body)
        assert other.status_code == 409 and _reason(other) == "GRAMMAR_ALREADY_EXISTS", other.text
        # Without an id, one is assigned.
        assigned = http.post("/api/v1/grammars", json=body)
        assert assigned.status_code == 200 and assigned.json()["name"].startswith("grammars/g-")
        assert len(_events(http, "grammar.create", f"grammars/{grammar_id}", 1)) == 1


def test_the_engine_refuses_a_broken_grammar_and_nothing_is_stored(stack: RunningStack) -> None:
    grammar_id = _id("broken")
    with stack.http() as http:
        started = time.monotonic()
        broken = _create(http, grammar_id, definition='root ::= ("yes" | "no"')
        elapsed = time.monotonic() - started
        assert broken.status_code == 400, broken.text
        assert _reason(broken) == "GRAMMAR_INVALID"
        violations = _violations(broken)
        assert "grammar.definition" in violations
        assert "parse" in violations["grammar.definition"].lower(), violations  # the engine's words
        assert http.get(f"/api/v1/grammars/{grammar_id}").status_code == 404
        print(f"refused broken GBNF at create in {elapsed * 1000:.0f} ms: {violations}")

        # A good grammar stays as it was when an update would break it.
        good = _create(http, grammar_id)
        assert good.status_code == 200, good.text
        refused = http.patch(
            f"/api/v1/grammars/{grammar_id}",
            params={"update_mask": "definition"},
            json={"definition": "root ::= ("},
        )
        assert refused.status_code == 400 and "grammar.definition" in _violations(refused), refused.text
        assert http.get(f"/api/v1/grammars/{grammar_id}").json() == good.json()

        # Lark: accepted when it compiles, refused when it does not.
        lark = http.post(
            "/api/v1/grammars",
            params={"grammar_id": _id("lark")},
            json={"syntax": "SYNTAX_LARK", "definition": LARK_COLOR},
        )
        assert lark.status_code == 200 and lark.json()["syntax"] == "SYNTAX_LARK", lark.text
        bad_lark = http.post(
            "/api/v1/grammars", json={"syntax": "SYNTAX_LARK", "definition": "start: undefined_rule"}
        )
        assert bad_lark.status_code == 400 and "grammar.definition" in _violations(bad_lark), bad_lark.text


def test_validation_names_the_field(stack: RunningStack) -> None:
    with stack.http() as http:
        cases = [
            ({"grammar_id": "Bad_Id"}, {"syntax": "SYNTAX_GBNF", "definition": YES_NO}, "grammar_id"),
            ({}, {"definition": YES_NO}, "grammar.syntax"),
            ({}, {"syntax": "SYNTAX_GBNF", "definition": "  "}, "grammar.definition"),
            ({"request_id": "bad id!"}, {"syntax": "SYNTAX_GBNF", "definition": YES_NO}, "request_id"),
        ]
        for params, body, field in cases:
            reply = http.post("/api/v1/grammars", params=params, json=body)
            assert reply.status_code == 400 and field in _violations(reply), (field, reply.text)
        assert http.get("/api/v1/grammars/Not_An_Id").status_code == 400


def test_scopes_read_and_inference_read_admin_changes(stack: RunningStack) -> None:
    grammar_id = _id("scoped")
    name = f"grammars/{grammar_id}"
    with stack.http() as admin:
        assert _create(admin, grammar_id).status_code == 200
    for scope in ("read", "inference"):
        with stack.http(stack.create_key([scope])) as http:
            assert http.get(f"/api/v1/{name}").status_code == 200, scope
            assert http.get("/api/v1/grammars").status_code == 200, scope
            assert _create(http, _id("nope")).status_code == 403, scope
            patch = http.patch(
                f"/api/v1/{name}", params={"update_mask": "description"}, json={"description": "x"}
            )
            assert patch.status_code == 403, scope
            assert http.delete(f"/api/v1/{name}").status_code == 403, scope
    with stack.http() as admin:
        assert admin.get(f"/api/v1/{name}").json()["description"] == ""
    # On the service's own port too (the same check for direct gRPC callers).
    read_key = stack.create_key(["read"])
    with keyed_channel(stack.service_targets["grammars"], read_key) as channel:
        stub = grammars_pb2_grpc.GrammarsServiceStub(channel)
        assert stub.GetGrammar(grammars_pb2.GetGrammarRequest(name=name), timeout=10).name == name
        with pytest.raises(grpc.RpcError) as denied:
            stub.DeleteGrammar(grammars_pb2.DeleteGrammarRequest(name=name), timeout=10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_generation_naming_a_stored_grammar_follows_it(stack: RunningStack) -> None:
    grammar_id = _id("answer")
    name = f"grammars/{grammar_id}"
    model = stack.settings.triton.default_model
    key = stack.create_key(["inference"])
    with stack.http() as admin:
        assert _create(admin, grammar_id).status_code == 200
    with stack.http(key) as http:
        for temperature in (0.0, 1.0):
            native = http.post(
                f"/api/v1/models/{model}:generate",
                json={
                    "prompt": "Is the sky blue? Answer:",
                    "sampling": {"max_tokens": 8, "temperature": temperature, "seed": 7},
                    "constraint": {"grammar": name},
                },
            )
            assert native.status_code == 200, native.text
            assert native.json()["text"] in ("yes", "no"), native.json()
        chat = http.post(
            "/v1/chat/completions",
            json={
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "Is water wet?"}],
                "max_tokens": 8,
                "grammar": {"name": name},
            },
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"] in ("yes", "no"), chat.json()
        completion = http.post(
            "/v1/completions",
            json={"model": model, "prompt": "Is it?", "max_tokens": 8, "grammar": {"name": name}},
        )
        assert completion.status_code == 200, completion.text
        assert completion.json()["choices"][0]["text"] in ("yes", "no"), completion.json()
    with keyed_channel(stack.grpc_target, key) as channel:
        answer = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            inference_pb2.GenerateRequest(
                model=f"models/{model}",
                prompt="Is it?",
                sampling=inference_pb2.SamplingParams(max_tokens=8),
                constraint=inference_pb2.OutputConstraint(grammar=name),
            ),
            timeout=60,
        )
        assert answer.text in ("yes", "no")

    # The stored grammar is what applies: after an update, the next request follows the new one.
    with stack.http() as admin:
        changed = admin.patch(
            f"/api/v1/{name}", params={"update_mask": "definition"}, json={"definition": 'root ::= "maybe"'}
        )
        assert changed.status_code == 200, changed.text
    with stack.http(key) as http:
        reply = http.post(
            f"/api/v1/models/{model}:generate",
            json={"prompt": "Is it?", "sampling": {"max_tokens": 8}, "constraint": {"grammar": name}},
        )
        assert reply.status_code == 200 and reply.json()["text"] == "maybe", reply.text

    # Deleted: NOT_FOUND for new requests, naming the caller's field, on every API.
    with stack.http() as admin:
        assert admin.delete(f"/api/v1/{name}").status_code == 200
    with stack.http(key) as http:
        native = http.post(
            f"/api/v1/models/{model}:generate",
            json={"prompt": "Is it?", "constraint": {"grammar": name}},
        )
        assert native.status_code == 404 and "constraint.grammar" in native.text, native.text
        chat = http.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "grammar": {"name": name}},
        )
        assert chat.status_code == 404 and "grammar.name" in chat.text, chat.text
    with keyed_channel(stack.grpc_target, key) as channel:
        with pytest.raises(grpc.RpcError) as missing:
            inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                inference_pb2.GenerateRequest(
                    model=f"models/{model}",
                    prompt="Hi",
                    constraint=inference_pb2.OutputConstraint(grammar=name),
                ),
                timeout=30,
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        details = error_details(missing.value)
        assert details["ErrorInfo"].reason == "GRAMMAR_NOT_FOUND"  # type: ignore[attr-defined]
        assert [v.field for v in details["BadRequest"].field_violations] == ["constraint.grammar"]  # type: ignore[attr-defined]
