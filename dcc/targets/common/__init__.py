"""Helpers that every target shares (layout preflight and the advice it gives)."""
