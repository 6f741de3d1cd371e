"""User-facing errors: one line that names the problem and the fix.

The CLI prints a `FedpitError` as a single line without a traceback; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class FedpitError(Exception):
    """A problem the user can fix (bad config, missing data, unknown model)."""


class ConfigError(FedpitError):
    """The configuration is invalid: unknown key, wrong type, out-of-range value."""


class DataError(FedpitError):
    """Input data is missing, empty or malformed, or too small for the requested setup."""


class ModelError(FedpitError):
    """The base model cannot be found or loaded."""


class ClientFailure(FedpitError):
    """A client's round failed (an exception, out of memory, a node that died) and too few replies
    were left to aggregate. Rounds already committed are intact: the run can be resumed."""
