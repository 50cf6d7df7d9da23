"""Every Redis key loragate uses, built by one function each, so the key space is read in one place."""

from __future__ import annotations

PREFIX = "loragate"


def api_key(key_hash: str) -> str:
    """Hash of one API key's record: tenant, name, created. Only the sha256 of a key is stored."""
    return f"{PREFIX}:apikey:{key_hash}"


def tenant_keys(tenant: str) -> str:
    """Set of key hashes that belong to a tenant."""
    return f"{PREFIX}:tenant:{tenant}:keys"
