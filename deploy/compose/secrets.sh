#!/bin/sh
# Creates the secret files compose.yaml mounts, with random values, unless they already exist.
# They stay out of git (secrets/.gitignore). The directory is private to you; the files themselves
# must be readable by the containers' unprivileged users (postgres, ferry), so they are 0644.
set -eu
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir"
chmod 0700 "$dir"
for name in postgres_password service_token bootstrap_admin_key master_key nats_internal_password nats_client_password triton_secret; do
    file="$dir/$name"
    if [ -s "$file" ]; then
        echo "kept    $file"
        continue
    fi
    # API keys start with fry_ (services/common/tokens.py), which secret scanners and people recognise.
    prefix=""
    [ "$name" = bootstrap_admin_key ] && prefix="fry_"
    # 32 random bytes as URL-safe text: no characters that need quoting in a URL, a shell or YAML.
    { printf '%s' "$prefix"; head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'; } > "$file"
    chmod 0644 "$file"
    echo "created $file"
done
