"""A stand-in for Triton's gRPC client in unit tests of the registry and the catalog: a repository of
models with states; a READY model has a config with metadata; load and unload change the state."""

from __future__ import annotations

from typing import Any

from tritonclient.utils import InferenceServerException


class TritonStub:
    def __init__(self, states: dict[str, str], live: bool = True) -> None:
        # model name -> READY / UNAVAILABLE / LOADING ...
        self.states = dict(states)
        self.live = live
        self.calls: list[tuple[str, str]] = []

    async def get_model_repository_index(self, as_json: bool) -> dict[str, Any]:
        self._answer()
        return {"models": [{"name": n, "state": s, "version": "1"} for n, s in self.states.items()]}

    async def is_model_ready(self, name: str) -> bool:
        self._answer()
        return self.states.get(name) == "READY"

    async def is_server_live(self, client_timeout: float | None = None) -> bool:
        self._answer()
        return True

    async def get_model_config(self, name: str, as_json: bool) -> dict[str, Any]:
        self._answer()
        if self.states.get(name) != "READY":
            raise InferenceServerException(f"model '{name}' is not loaded")
        params = {
            "context_length": "2048",
            "max_tokens": "512",
            "owned_by": f"owner-of-{name}",
            "n_parallel": "4",
            "family": f"family-of-{name}",
            "parameter_count": "135M",
            "quantization": "Q4_1",
            "capabilities": "completion,chat",
            "chat_template": "{{ messages }}",
        }
        return {
            "config": {
                "backend": "llamacpp",
                "parameters": {k: {"string_value": v} for k, v in params.items()},
            }
        }

    async def load_model(self, name: str) -> None:
        self._answer()
        self.calls.append(("load", name))
        self.states[name] = "READY"

    async def unload_model(self, name: str) -> None:
        self._answer()
        self.calls.append(("unload", name))
        self.states[name] = "UNAVAILABLE"

    def _answer(self) -> None:
        if not self.live:
            raise InferenceServerException("failed to connect to all addresses")
