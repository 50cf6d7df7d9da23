"""What the registry knows about one adapter version, and how adapters are named."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "manifest.json"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class InvalidAdapter(ValueError):
    """An adapter (or its name) is refused; the message says why. Nothing was stored or loaded."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidAdapter(
            f"Invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
            param="name",
        )
    return name


MAX_VERSION = 999_999_999
"""The largest N of `name@N` (nine digits)."""


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """`name` (its pinned or latest version) or `name@version`."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        name, sep, version = text.partition("@")
        check_name(name)
        if not sep:
            return cls(name)
        if not (version.isascii() and version.isdigit() and len(version) <= 9) or not 1 <= int(version) <= MAX_VERSION:
            raise InvalidAdapter(f"Invalid adapter version in {text!r}: expected name@N with N >= 1.", param="version")
        return cls(name, int(version))

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


class Source(BaseModel):
    kind: Literal["uploaded", "trained"] = "uploaded"
    origin: str | None = Field(None, description="File or folder it was added from (uploads).")
    dataset: str | None = Field(None, description="Dataset it was trained from (trained adapters).")


class Manifest(BaseModel):
    name: str
    version: int
    base_model: str
    base_architecture: str
    rank: int
    alpha: float
    target_modules: list[str]
    dtype: str
    size_bytes: int
    files: dict[str, str] = Field(description="sha256 of every file, by file name.")
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source: Source = Field(default_factory=Source)
    metrics: dict[str, Any] = Field(default_factory=dict)
    tenant: str | None = Field(None, description="The tenant that owns it.")
    listed: bool = Field(
        True,
        description="False for a retraining candidate (and an upload, for the moment its tenant is checked): no "
        "client sees or calls it (only the tenant's `training` keys, by its exact name@V) until it is published.",
    )
    provenance: dict[str, Any] | None = Field(
        None, description="Where a trained version comes from: dataset hash, config, base, parent, eval metrics."
    )

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"
