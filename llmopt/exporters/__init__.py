"""Exporters: turn a resolved recipe and a local checkpoint into an artifact body."""
