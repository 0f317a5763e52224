"""The `ferry` command without a stack: its command line (exit 2) and an unreachable target (exit 3),
in-process through `main()` (what the console script calls), each failure one line on stderr."""

from __future__ import annotations

from pathlib import Path

import pytest
from ferry_client.cli import main

from launcher.ports import free_ports

USAGE, UNAVAILABLE = 2, 3


@pytest.fixture(autouse=True)
def no_ambient_ferry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("FERRY_API_KEY", "FERRY_TARGET", "FERRY_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FERRY_HOME", str(tmp_path))  # no <home>/admin.key
    monkeypatch.setenv("FERRY_API_KEY", "fry_unused")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse's own exits (usage errors, --help)
        code = int(exit.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        ((), "required"),
        (("models", "frobnicate"), "frobnicate"),
        (("keys", "create", "--name", "x", "--scope", "everything"), "everything"),
        (("keys", "create", "--name", "x", "--scope", "read", "--ttl", "soon"), "30d"),
        (("audit", "list", "--limit", "0"), "positive"),
        (("generate", "x", "--max-tokens", "many"), "many"),
    ],
)
def test_bad_command_lines_exit_2(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], said: str
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == USAGE
    assert said in err.strip().splitlines()[-1]


def test_empty_prompt_exits_2_before_sending(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    code, _, err = run(capsys, "generate", "-", "--model", "m", "--target", "127.0.0.1:1")
    assert code == USAGE and err.strip() == "ferry: the prompt is empty"


def test_help_names_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "exit codes" in out and "3 ferry unreachable" in out


def test_unreachable_target_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    (nowhere,) = free_ports(1)
    target = f"127.0.0.1:{nowhere}"
    for argv in (("models", "list"), ("status",), ("--json", "keys", "list")):
        code, out, err = run(capsys, *argv, "--target", target, "--timeout", "10")
        assert code == UNAVAILABLE, (argv, err)
        assert out == ""  # not half a table, not half a document
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ferry: UNAVAILABLE") and target in lines[0]


def test_without_model_the_instruction_tuned_chat_model_answers() -> None:
    from ferry.models.v1 import models_pb2
    from ferry_client.cli.base import CliError
    from ferry_client.cli.generation import pick_model

    ready, loading = models_pb2.Model.STATE_READY, models_pb2.Model.STATE_LOADING

    def model(
        model_id: str, *capabilities: str, template: str = "", state: models_pb2.Model.State.ValueType = ready
    ) -> models_pb2.Model:
        return models_pb2.Model(
            name=f"models/{model_id}",
            model_id=model_id,
            state=state,
            capabilities=capabilities,
            chat_template=template,
        )

    shipped = [  # as ListModels lists them: alphabetically
        model("all-minilm-l6-v2", "embedding"),
        model("gemma-3-270m", "completion", "chat", template="{{ m }}"),
        model("smollm2-135m-instruct", "completion", "chat", template="{{ m }}"),
    ]
    assert pick_model(shipped, "chat") == "smollm2-135m-instruct"
    assert pick_model(shipped, "completion") == "smollm2-135m-instruct"
    # A chat template counts before the name; the listing's order decides between equals.
    assert pick_model([model("a-instruct", "chat"), model("b", "chat", template="t")], "chat") == "b"
    assert (
        pick_model([model("x-it", "chat", template="t"), model("y-chat", "chat", template="t")], "chat")
        == "x-it"
    )
    # Only ready models that serve the capability; the first ready one when none looks tuned.
    assert (
        pick_model([model("z-instruct", "chat", template="t", state=loading), *shipped[:2]], "chat")
        == "gemma-3-270m"
    )
    with pytest.raises(CliError, match="no ready model serves chat"):
        pick_model([shipped[0]], "chat")
