"""Exceptions a user can cause. Each carries one clear line naming what is wrong."""

from __future__ import annotations


class FedmergeError(Exception):
    """Base class for every error fedmerge raises on purpose."""


class MergeError(FedmergeError, ValueError):
    """Task vectors, weights or options that a merging method cannot accept."""


class MergeOverflowError(MergeError):
    """A merge, or θ0 + λ·τ_merged, whose values leave the range of their dtype: the inputs were
    accepted, the result would not be finite."""


class ConfigError(FedmergeError, ValueError):
    """An experiment setting that is unknown, of the wrong type or out of range."""


class CheckpointError(FedmergeError, ValueError):
    """A checkpoint or task-vector file that is missing, unreadable or mismatched."""


class OutputError(FedmergeError):
    """Results that could not be written (a full disk, a path that became unwritable); nothing was
    left half-written."""


class FederationError(FedmergeError, RuntimeError):
    """A federated round that cannot finish: nodes missing, too few valid replies."""


class PluginError(ConfigError):
    """A plugin (entry point or file) that cannot be loaded or registers something unusable."""
