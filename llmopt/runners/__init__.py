"""Runners: load an artifact (or, for ``pytorch``, a checkpoint) and generate token ids."""
