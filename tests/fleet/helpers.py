"""What a platform admin does for a provider, shared by the fleet tests."""

from __future__ import annotations

import httpx


async def create_provider(client: httpx.AsyncClient, admin: str, name: str) -> tuple[str, dict[str, str]]:
    """A provider and its key (shown once); returns its id and the key's auth header."""
    created = await client.post(
        "/api/admin/providers", json={"name": name}, headers={"Authorization": f"Bearer {admin}"}
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["key"].startswith("sk-prov-")
    return body["id"], {"Authorization": f"Bearer {body['key']}"}
