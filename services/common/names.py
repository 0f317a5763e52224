"""Ids and resource names (AIP-122): the rules every service applies, written once.

A resource name is `{collection}/{id}`: `models/gemma-3-270m`, `transactions/{request id}`,
`keys/{key id}`, `grammars/{grammar id}`. Request ids double as transaction and audit event ids.
"""

from __future__ import annotations

import re

from services.common.errors import RpcError, invalid_argument

# What a client may send as `x-request-id`: kept end to end when it matches, else replaced.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REQUEST_ID_RULE = "1-128 characters of A-Z a-z 0-9 . _ : -"
# A model's id is its directory name in Triton's model repository.
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A grammar's id (AIP-122's recommended form): what `grammars/{grammar}` may hold.
GRAMMAR_ID = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")
GRAMMAR_ID_RULE = "1-63 characters of a-z 0-9 -, starting with a letter"

# A job's id (`jobs/{job}`): ferry makes them (a uuid4's hex), and they double as the request id of
# the job's generation.
JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}\Z")

MODELS, TRANSACTIONS, KEYS, GRAMMARS, JOBS = "models", "transactions", "keys", "grammars", "jobs"


def is_request_id(value: str) -> bool:
    return bool(REQUEST_ID.match(value))


def is_model_id(value: str) -> bool:
    return bool(MODEL_ID.match(value))


def model_name(model_id: str) -> str:
    """model id -> `models/{model}`."""
    return f"{MODELS}/{model_id}"


def resource_id(name: str, collection: str, pattern: re.Pattern[str], field: str = "name") -> str:
    """`{collection}/{id}` -> id; INVALID_ARGUMENT naming `field` for anything else."""
    if not name:
        raise invalid_argument(field, f"is required, in the form {collection}/{{id}}")
    prefix, slash, rid = name.partition("/")
    if prefix != collection or not slash or not pattern.match(rid):
        raise _malformed(name, collection, field)
    return rid


def model_id_from_name(name: str, field: str = "name", *, bare_id: bool = False) -> str:
    """`models/{model}` -> model id; with `bare_id`, a bare model id is accepted too (a convenience
    of the native inference API)."""
    if bare_id and name and is_model_id(name):
        return name
    return resource_id(name, MODELS, MODEL_ID, field)


def _malformed(name: str, collection: str, field: str) -> RpcError:
    return invalid_argument(field, f"'{name}' is not a name of the form {collection}/{{id}}")
