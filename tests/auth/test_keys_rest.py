"""Key management over REST (`/api/v1/keys`), as an operator's script would do it."""

from __future__ import annotations

import pytest

from tests.stack import RunningStack

pytestmark = pytest.mark.stack


def test_create_list_revoke_over_rest(stack: RunningStack) -> None:
    with stack.http() as admin:
        created = admin.post(
            "/api/v1/keys",
            json={"display_name": "rest-made", "scopes": ["inference"], "ttl": "3600s"},
        )
        assert created.status_code == 200, created.text
        key = created.json()
        assert key["secret"].startswith("fry_") and key["state"] == "STATE_ACTIVE"
        assert key["expire_time"]  # the ttl became an expiry

        # The secret is shown once: never in a later answer, not even as an empty field.
        listed = admin.get("/api/v1/keys").json()["keys"]
        assert any(k["name"] == key["name"] for k in listed)
        assert all("secret" not in k for k in listed)
        assert "secret" not in admin.get(f"/api/v1/{key['name']}").json()

        with stack.http(key["secret"]) as user:
            assert user.get("/v1/models").status_code == 200
            revoked = admin.post(f"/api/v1/{key['name']}:revoke", json={})
            assert revoked.status_code == 200 and revoked.json()["state"] == "STATE_REVOKED"
            # Refused within the revocation bound (auth.cache_seconds: an edge lease of the key ends).
            stack.within_revocation_bound(lambda: user.get("/v1/models").status_code == 401)

        bad = admin.post("/api/v1/keys", json={"display_name": "x", "scopes": ["root"]})
        assert bad.status_code == 400 and "key.scopes" in bad.text
