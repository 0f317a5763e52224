#!/bin/sh
# Entry point of the ferry Envoy image: puts the service token into the configuration rendered at
# build time (it carries a placeholder: the token is the deployment's secret, never the image's), then
# hands over to the official entrypoint, which drops to the unprivileged `envoy` user.
# The token comes from FERRY_AUTH__SERVICE_TOKEN, or the file FERRY_AUTH__SERVICE_TOKEN_FILE names.
set -eu

# The paths and the next entrypoint are overridable for tests/deploy, which runs this script on the host.
template=${FERRY_ENVOY_TEMPLATE:-/ferry/home/run/envoy.yaml}
config_dir=${FERRY_ENVOY_CONFIG_DIR:-/tmp/ferry-envoy}
next_entrypoint=${FERRY_ENVOY_NEXT_ENTRYPOINT:-/docker-entrypoint.sh}
placeholder=FERRY_SERVICE_TOKEN_PLACEHOLDER

token=${FERRY_AUTH__SERVICE_TOKEN:-}
if [ -z "$token" ] && [ -n "${FERRY_AUTH__SERVICE_TOKEN_FILE:-}" ]; then
    if [ ! -r "$FERRY_AUTH__SERVICE_TOKEN_FILE" ]; then
        echo "envoy-entrypoint: FERRY_AUTH__SERVICE_TOKEN_FILE names $FERRY_AUTH__SERVICE_TOKEN_FILE, which cannot be read" >&2
        exit 1
    fi
    token=$(cat "$FERRY_AUTH__SERVICE_TOKEN_FILE")
fi
if [ -z "$token" ]; then
    echo "envoy-entrypoint: no service token (set FERRY_AUTH__SERVICE_TOKEN or FERRY_AUTH__SERVICE_TOKEN_FILE)" >&2
    exit 1
fi
# Only characters that need no quoting in YAML or sed (deploy/compose/secrets.sh makes such tokens).
case "$token" in
    *[!A-Za-z0-9_.-]*)
        echo "envoy-entrypoint: the service token may hold only A-Z a-z 0-9 _ . -" >&2
        exit 1
        ;;
esac

umask 077
mkdir -p "$config_dir"
sed "s/$placeholder/$token/g" "$template" > "$config_dir/envoy.yaml"
# The official entrypoint runs Envoy as ENVOY_UID (101) when started as root: let it read the file.
# And make its admin socket (owner only) in the run directory, beside the rendered file.
if [ "$(id -u)" = "0" ] && [ "$next_entrypoint" = /docker-entrypoint.sh ]; then
    chown -R "${ENVOY_UID:-101}" "$config_dir"
    chown "${ENVOY_UID:-101}" "$(dirname "$template")"
fi
exec "$next_entrypoint" envoy -c "$config_dir/envoy.yaml" "$@"
