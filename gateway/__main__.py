"""Gateway process: API keys (KeysService), authorization decisions (AuthService) and Envoy's ext_authz."""

from envoy.service.auth.v3 import external_auth_pb2_grpc
from ferry.auth.v1 import auth_pb2, auth_pb2_grpc
from ferry.keys.v1 import keys_pb2, keys_pb2_grpc

from gateway import ext_authz
from gateway.auth_service import AuthServicer
from gateway.authorizer import LocalAuthorizer
from gateway.bootstrap import ensure_bootstrap_key
from gateway.key_memory import KeyMemory
from gateway.keys import KeysServicer
from gateway.schema import MIGRATIONS
from gateway.store import KeyStore
from services.common.config import get_settings
from services.common.database import Database, serve_from_database
from services.common.secret_box import secret_box
from services.common.server import Runtime
from services.recording import Recorder
from services.recording.process import run_audited

KEYS_SERVICE = keys_pb2.DESCRIPTOR.services_by_name["KeysService"].full_name
AUTH_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name

authorizer = LocalAuthorizer(get_settings())


async def _setup(runtime: Runtime, recorder: Recorder) -> None:
    async def bootstrap(db: Database) -> None:
        # SERVING only once the bootstrap key is in place.
        await ensure_bootstrap_key(runtime.settings, KeyStore(db), authorizer, recorder)

    # Once ready, the gateway stays SERVING through a database outage: it answers key checks from
    # the keys it has seen (auth.stale_if_error_seconds), so generation stays in rotation.
    db = await serve_from_database(
        runtime,
        MIGRATIONS,
        on_ready=bootstrap,
        serving_while_down=True,
        on_reachable=lambda reachable: authorizer.set_degraded(not reachable, "database health check"),
    )
    store = KeyStore(db)
    authorizer.attach(store)
    # Every working key in this replica's outage memory, whichever replica checked it.
    memory = KeyMemory(authorizer, store)
    memory.start()
    runtime.on_stop.append(memory.stop)
    keys_pb2_grpc.add_KeysServiceServicer_to_server(
        KeysServicer(store, authorizer, recorder, secret_box(runtime.settings)), runtime.server
    )
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(authorizer), runtime.server)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        ext_authz.EnvoyAuthorizationServicer(authorizer, recorder), runtime.server
    )


if __name__ == "__main__":
    run_audited(
        "gateway",
        lambda s: s.gateway,
        _setup,
        service_names=[KEYS_SERVICE, AUTH_SERVICE, ext_authz.SERVICE],
        authorizer=authorizer,
    )
