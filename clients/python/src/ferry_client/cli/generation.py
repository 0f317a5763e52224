"""`ferry generate` (one prompt, streamed to stdout) and `ferry chat` (an interactive conversation)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

from ferry.inference.v1 import inference_pb2
from ferry.models.v1 import models_pb2

from ferry_client import Client
from ferry_client.cli.base import (
    CliError,
    Exit,
    as_dict,
    describe_error,
    open_client,
    print_json,
    stderr,
    target_of,
)
from ferry_client.cli.models import list_models, resource
from ferry_client.errors import FerryError, NotFound

# A generation may run for minutes; the ordinary deadline (--timeout) is for quick calls.
GENERATION_DEADLINE_SECONDS = 600.0
FINISH = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_CANCELLED: "cancelled",
}
CHAT_HELP = (
    "/model NAME  talk to another model (the conversation goes on)\n"
    "/model       say which model answers\n"
    "/models      list the models\n"
    "/reset       forget the conversation\n"
    "/exit        leave (or Ctrl-D); Ctrl-C stops an answer"
)


def add_sampling_options(command: argparse.ArgumentParser, max_tokens: int) -> None:
    command.add_argument(
        "--model", "-m", help="model id (default: $FERRY_MODEL, else a ready instruction-tuned chat model)"
    )
    command.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        help=f"longest answer, in tokens (default: {max_tokens})",
    )
    command.add_argument("--temperature", type=float, help="sampling temperature (default: the model's)")
    command.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    command.add_argument("--system", help="a system message first (chat models)")


def add_parsers(groups: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    generate = groups.add_parser(
        "generate", parents=[common], help="generate from a prompt (argument or stdin), streamed to stdout"
    )
    generate.add_argument("prompt", nargs="?", help="the prompt; '-' or nothing reads it from stdin")
    add_sampling_options(generate, max_tokens=256)
    generate.add_argument("--stop", action="append", default=[], help="stop sequence (repeat for several)")
    generate.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message, rendered with the model's chat template",
    )
    generate.add_argument(
        "--request-id", default="", help="request id (AIP-155); a retry with it is answered once"
    )
    generate.set_defaults(run=run_generate)

    chat = groups.add_parser("chat", parents=[common], help="talk to a model; answers stream as they come")
    add_sampling_options(chat, max_tokens=512)
    chat.set_defaults(run=run_chat)


def sampling(args: argparse.Namespace) -> inference_pb2.SamplingParams:
    params = inference_pb2.SamplingParams(max_tokens=args.max_tokens, stop=getattr(args, "stop", []))
    if args.temperature is not None:
        params.temperature = args.temperature
    if args.seed is not None:
        params.seed = args.seed
    return params


# Model ids that say they were tuned to follow instructions (SmolLM2-Instruct, Gemma's `-it`, `-chat`).
INSTRUCTION_TUNED = re.compile(r"(?:^|[-_.])(?:instruct|it|chat)(?:$|[-_.])", re.IGNORECASE)


def default_model(client: Client, capability: str) -> str:
    """$FERRY_MODEL, else the server's best chat choice among the ready models (see `pick_model`)."""
    if os.environ.get("FERRY_MODEL"):
        return os.environ["FERRY_MODEL"]
    return pick_model(list_models(client), capability)


def pick_model(models: Iterable[models_pb2.Model], capability: str) -> str:
    """The ready model that serves `capability` and is the best one to talk to: one with a chat
    template first, an instruction-tuned one (by its id) before a base model, then the listing's
    order. The models API declares no default model, so this is the client's choice (docs/cli.md)."""
    ready = [
        (index, model)
        for index, model in enumerate(models)
        if model.state == models_pb2.Model.STATE_READY and capability in model.capabilities
    ]
    if not ready:
        raise CliError(f"no ready model serves {capability}: pick one with --model (see `ferry models list`)")

    def rank(entry: tuple[int, models_pb2.Model]) -> tuple[bool, bool, int]:
        index, model = entry
        model_id = model.model_id or model.name.removeprefix("models/")
        return (not model.chat_template, not INSTRUCTION_TUNED.search(model_id), index)

    best = min(ready, key=rank)[1]
    return best.model_id or best.name.removeprefix("models/")


def close(stream: Any) -> None:
    """Ends a stream early: the server cancels the generation and frees the engine slot."""
    for method in ("close", "cancel"):
        if hasattr(stream, method):
            getattr(stream, method)()
            return


class Answer:
    """One streamed generation written to `out` as its pieces come."""

    def __init__(self) -> None:
        self.text = ""
        self.finish_reason = "cancelled"
        self.completion_tokens = 0
        self.started = time.monotonic()

    def stream(self, pieces: Iterable[inference_pb2.GenerateStreamResponse], out: Any) -> None:
        for piece in pieces:
            if piece.text:
                out.write(piece.text)
                out.flush()
                self.text += piece.text
            if piece.finish_reason:
                self.finish_reason = FINISH.get(piece.finish_reason, "stop")
                self.completion_tokens = piece.usage.completion_tokens

    def summary(self) -> str:
        return f"[{self.finish_reason}, {self.completion_tokens} tokens, {time.monotonic() - self.started:.1f} s]"


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt not in (None, "-"):
        return str(args.prompt)
    if args.prompt is None and sys.stdin.isatty():
        raise CliError("give a prompt, or pipe one on stdin", Exit.USAGE)
    return sys.stdin.read()


def run_generate(args: argparse.Namespace) -> Exit:
    prompt = read_prompt(args)
    if not prompt.strip():
        raise CliError("the prompt is empty", Exit.USAGE)
    with open_client(args) as client:
        model = args.model or default_model(client, "chat" if args.chat else "completion")
        request = inference_pb2.GenerateRequest(
            model=resource(model), request_id=args.request_id, sampling=sampling(args)
        )
        if args.chat or args.system:
            messages = [inference_pb2.ChatMessage(role="system", content=args.system)] if args.system else []
            messages.append(inference_pb2.ChatMessage(role="user", content=prompt))
            request.messages.messages.extend(messages)
        else:
            request.prompt = prompt
        if args.json:
            print_json(as_dict(client.inference.Generate(request, timeout=GENERATION_DEADLINE_SECONDS)))
            return Exit.OK
        answer = Answer()
        pieces = client.inference.GenerateStream(request, timeout=GENERATION_DEADLINE_SECONDS)
        try:
            answer.stream(pieces, sys.stdout)
        except KeyboardInterrupt:
            raise CliError("interrupted: the generation was cancelled", Exit.INTERRUPTED) from None
        finally:
            close(pieces)
            if answer.text and not answer.text.endswith("\n"):
                sys.stdout.write("\n")
                sys.stdout.flush()
        if stderr.is_terminal:
            stderr.print(answer.summary(), style="dim")
    return Exit.OK


# -- chat ------------------------------------------------------------------------------------------


class Chat:
    def __init__(self, client: Client, args: argparse.Namespace, model: str) -> None:
        self.client = client
        self.args = args
        self.model = model
        self.history: list[inference_pb2.ChatMessage] = []
        self.target = target_of(args)

    def reset(self) -> None:
        self.history = []
        if self.args.system:
            self.history.append(inference_pb2.ChatMessage(role="system", content=self.args.system))

    def say(self, text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def error(self, err: FerryError) -> None:
        self.say(f"ferry: {describe_error(err, self.target)}")

    def switch(self, name: str) -> None:
        try:
            model = self.client.models.GetModel(models_pb2.GetModelRequest(name=resource(name)))
        except NotFound:
            self.say(f"ferry: no model {name!r}; /models lists them")
            return
        except FerryError as err:
            self.error(err)
            return
        if model.state != models_pb2.Model.STATE_READY:
            state = models_pb2.Model.State.Name(model.state).removeprefix("STATE_").lower()
            self.say(f"ferry: {name} is {state}, not ready; still talking to {self.model}")
            return
        self.model = model.model_id or name
        self.say(f"now talking to {self.model}")

    def models(self) -> None:
        try:
            for model in list_models(self.client):
                state = models_pb2.Model.State.Name(model.state).removeprefix("STATE_").lower()
                mark = "*" if model.model_id == self.model else " "
                self.say(f"{mark} {model.model_id}  {state}  {','.join(model.capabilities)}")
        except FerryError as err:
            self.error(err)

    def command(self, line: str) -> bool:
        """Handles a /command; False to leave."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/model":
            if rest:
                self.switch(rest)
            else:
                self.say(f"talking to {self.model}")
        elif name == "/models":
            self.models()
        elif name == "/reset":
            self.reset()
            self.say("conversation forgotten")
        elif name == "/help":
            self.say(CHAT_HELP)
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def turn(self, text: str) -> None:
        asked = inference_pb2.ChatMessage(role="user", content=text)
        request = inference_pb2.GenerateRequest(
            model=resource(self.model),
            messages=inference_pb2.Messages(messages=[*self.history, asked]),
            sampling=sampling(self.args),
        )
        answer = Answer()
        pieces = None
        try:
            pieces = self.client.inference.GenerateStream(request, timeout=GENERATION_DEADLINE_SECONDS)
            answer.stream(pieces, sys.stdout)
            self.say("")
        except KeyboardInterrupt:
            self.say("\n[stopped]")
        except FerryError as err:
            if answer.text:
                self.say("")
            self.error(err)
            return
        finally:
            if pieces is not None:
                close(pieces)
        # What the person saw is what the model said, also when they stopped it.
        self.history += [asked, inference_pb2.ChatMessage(role="assistant", content=answer.text)]

    def loop(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self.say(f"ferry chat with {self.model} at {self.target}: /help for commands, Ctrl-D to leave")
        while True:
            try:
                line = input("you> ").strip()
            except KeyboardInterrupt:
                self.say("")
                continue
            except EOFError:
                self.say("")
                return
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.turn(line)


def run_chat(args: argparse.Namespace) -> Exit:
    with open_client(args) as client:
        chat = Chat(client, args, args.model or default_model(client, "chat"))
        chat.reset()
        chat.loop()
    return Exit.OK
