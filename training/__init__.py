"""Retraining adapters from recorded feedback (later issues): reads the completion log, writes only through the registry."""
