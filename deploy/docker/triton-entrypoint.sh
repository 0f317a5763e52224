#!/bin/sh
# Entry point of ferry's Triton image. Triton answers everything but health only to callers that show
# the access secret (launcher/triton.py `restricted_flags`, docs/deploy.md): the secret comes from
# FERRY_TRITON__ACCESS_SECRET, or from the file FERRY_TRITON__ACCESS_SECRET_FILE names (a Compose or
# Kubernetes secret), and a `tritonserver` command gets the restricted-protocol flags appended. Without
# a secret it refuses to start (fail closed). Then NVIDIA's own entrypoint runs the command.
set -eu

PROTOCOLS=inference,metadata,model-config,model-repository,statistics,shared-memory,trace,logging
HEADER=ferry-triton-secret

secret="${FERRY_TRITON__ACCESS_SECRET:-}"
if [ -z "$secret" ] && [ -n "${FERRY_TRITON__ACCESS_SECRET_FILE:-}" ]; then
    if [ ! -r "$FERRY_TRITON__ACCESS_SECRET_FILE" ]; then
        echo "triton-entrypoint: FERRY_TRITON__ACCESS_SECRET_FILE names $FERRY_TRITON__ACCESS_SECRET_FILE, which cannot be read" >&2
        exit 1
    fi
    secret=$(cat "$FERRY_TRITON__ACCESS_SECRET_FILE")
fi
# The model processes (Triton's children) do not need it.
unset FERRY_TRITON__ACCESS_SECRET

if [ "${1:-}" = tritonserver ]; then
    if [ -z "$secret" ]; then
        echo "triton-entrypoint: no access secret (FERRY_TRITON__ACCESS_SECRET or _FILE): refusing to start a Triton anyone could use" >&2
        exit 1
    fi
    set -- "$@" "--grpc-restricted-protocol=$PROTOCOLS:$HEADER=$secret" "--http-restricted-api=$PROTOCOLS:$HEADER=$secret"
fi

if [ -x /opt/nvidia/nvidia_entrypoint.sh ]; then
    exec /opt/nvidia/nvidia_entrypoint.sh "$@"
fi
exec "$@"
