"""Thin HTTP handlers: authenticate, validate, hand on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

if TYPE_CHECKING:
    from gateway.app import Services


def services(request: Request) -> Services:
    """The app's services, built in its lifespan."""
    return request.app.state.services  # type: ignore[no-any-return]
