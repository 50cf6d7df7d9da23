"""Retraining adapters from recorded feedback (later issues).

Reads the completion log and writes only through the adapter registry.
"""
