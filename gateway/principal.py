"""Who is calling, once their key has been checked: a tenant's key with its role, or the global admin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["inference", "manage", "training"]
ROLES: tuple[Role, ...] = ("inference", "manage", "training")


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str | None
    """None for the global admin, who belongs to no tenant."""
    key_id: str | None
    role: Role | Literal["admin"]
    expires_at: float | None = None
    """Wall-clock time (time.time()) after which the key no longer works; None: never."""
    rpm: int | None = None
    """The key's own requests-per-minute limit, on top of its tenant's; None: only the tenant's."""
    tpm: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def sees_candidates(self) -> bool:
        """A `training` key (the retraining job's) may also call its tenant's unpublished candidates."""
        return self.role == "training"

    def can_manage(self, tenant: str) -> bool:
        """The global admin manages every tenant; a `manage` key only its own."""
        return self.is_admin or (self.role == "manage" and self.tenant == tenant)


ADMIN = Principal(tenant=None, key_id=None, role="admin")
