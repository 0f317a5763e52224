#!/bin/sh
# Entry point of the ferry services image.
# Secrets arrive as files (Compose and Kubernetes secrets). For each NAME_FILE=/path among the FERRY_*,
# DATABASE_URL and PG* variables, NAME is set from the file's content unless NAME is already set, so no
# secret has to sit in compose.yaml or in `docker inspect`. Then the command runs as PID 1's replacement,
# so SIGTERM reaches the service and it drains.
set -eu

for name in $(env | sed -n 's/^\(FERRY_[A-Z0-9_]*\|DATABASE_URL\|PG[A-Z]*\)_FILE=.*/\1/p'); do
    file=$(printenv "${name}_FILE")
    if [ -z "$(printenv "$name" || true)" ]; then
        if [ ! -r "$file" ]; then
            echo "entrypoint: ${name}_FILE names $file, which cannot be read" >&2
            exit 1
        fi
        value=$(cat "$file")
        export "$name=$value"
    fi
done

exec "$@"
