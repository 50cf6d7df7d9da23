"""Thin HTTP handlers: authenticate, validate, hand on."""
