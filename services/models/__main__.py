"""Models service process: `python -m services.models`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ferry.models.v1 import models_pb2, models_pb2_grpc
from tritonclient.utils import InferenceServerException

from services.common import triton_client
from services.common.model_names import ModelNames
from services.common.server import Runtime
from services.models.restore import LoadedModels
from services.models.servicer import ModelsServicer
from services.recording import Recorder
from services.recording.process import run_audited

log = logging.getLogger(__name__)
SERVICE_NAME = models_pb2.DESCRIPTOR.services_by_name["ModelsService"].full_name
WATCH_INTERVAL_SECONDS = 1.0


async def watch_triton(runtime: Runtime, servicer: ModelsServicer) -> None:
    """The registry is only useful while Triton answers: health follows Triton's liveness. When Triton
    answers (first, or again after a crash), the model set is noted or restored before the service
    reports SERVING, so Envoy's /readyz stays false until the models loaded before the crash are back."""
    serving: bool | None = None
    while True:
        try:
            live = bool(await servicer.client.is_server_live(client_timeout=2.0))
        except InferenceServerException:
            live = False
        if live and not serving:
            try:
                await servicer.loaded.up()
            except Exception:  # Triton went away again mid-way: the next look tries once more
                log.exception("noting the models Triton has loaded failed")
                live = False
        elif not live:
            servicer.loaded.down()
        if live != serving:
            log.info("Triton is %s", "live" if live else "not answering")
            await runtime.set_serving(live)
            serving = live
        await asyncio.sleep(WATCH_INTERVAL_SECONDS)


async def setup(runtime: Runtime, recorder: Recorder) -> None:
    settings = runtime.settings
    client = triton_client.connect(settings.triton)
    servicer = ModelsServicer(client, ModelNames.of(settings), LoadedModels(client, recorder))
    models_pb2_grpc.add_ModelsServiceServicer_to_server(servicer, runtime.server)
    await runtime.set_serving(False)
    watcher = asyncio.create_task(watch_triton(runtime, servicer))

    async def stop() -> None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await servicer.client.close()

    runtime.on_stop.append(stop)


def main() -> None:
    # Every RPC (LoadModel and UnloadModel included, with principal, resource and outcome) is
    # audited through this process's recording spool.
    run_audited("models", lambda s: s.models, setup, service_names=[SERVICE_NAME])


if __name__ == "__main__":
    main()
