"""The error family, at the ground floor: every module of infllm/ and data/ raises these and imports nothing
else from here, so no import circle can form around them.

Each message names the field, file or shape at fault and what was expected.
"""
from __future__ import annotations


class InfllmError(Exception):
    """Base of the errors infllm raises for bad input (config, data, checkpoints)."""


class ConfigError(InfllmError, ValueError):
    """A config value that cannot work; the message names the field (`trainer.seq_len: ...`)."""


class DataError(InfllmError, ValueError):
    """Bad data input (a missing or unreadable path, an empty corpus, a mismatched shard, a bad document
    under on_bad_document=error): the message names the file, field or setting and what was expected."""


class CheckpointError(InfllmError, RuntimeError):
    """A checkpoint that cannot be resumed from (missing, partial, corrupt, or written by another model,
    world size or engine); the message names the checkpoint and the file."""
