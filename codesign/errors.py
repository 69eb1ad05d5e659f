"""One root exception, ``CodesignError``, and one subclass per stage.

Every error says what was wrong, where, and how to fix it: ``fix`` holds the suggestion so that
callers (the CLI, the server) can show it apart from the message.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BundleError",
    "CaptureError",
    "CodesignError",
    "ConfigError",
    "DeadlineError",
    "InputNameError",
    "InputShapeError",
    "InputTypeError",
    "InputValueError",
    "ModelRefError",
    "NumericsError",
    "OverloadError",
    "PassError",
    "RankLostError",
    "ReportError",
    "RequestError",
    "RequestTooLargeError",
    "RoutingError",
    "SearchError",
    "ShardingError",
    "SpecError",
    "TargetError",
    "WeightsError",
]


class CodesignError(Exception):
    """Root of every error codesign raises on purpose."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")


class SpecError(CodesignError):
    """A RequestSpec or a request batch does not match the model's inputs."""


class CaptureError(CodesignError):
    """torch.export could not capture the model (``original``: torch's own exception, for debugging)."""

    original: BaseException | None = None


class PassError(CodesignError):
    """A graph pass failed or broke the program."""


class NumericsError(PassError):
    """A pass or backend changed the outputs beyond its tolerance."""


class BackendError(CodesignError):
    """A backend cannot lower or run a program (missing dependency, unsupported target)."""


class BundleError(CodesignError):
    """A bundle is missing, tampered, truncated, foreign or from an incompatible version."""


class ConfigError(CodesignError):
    """A config failed to load (unknown class, wrong version, bad field)."""


class TargetError(CodesignError):
    """An unknown target name or an inconsistent hardware spec."""


class ModelRefError(CodesignError):
    """A model reference (``file.py:factory`` or an example name) cannot be resolved."""


class SearchError(CodesignError):
    """A search cannot start or resume (bad settings, a study made with other settings, storage)."""


class ShardingError(CodesignError):
    """Embedding tables cannot be placed on the devices (memory, options) or a plan does not match."""


class RequestError(CodesignError):
    """A scoring request (JSON on the wire, or a batch handed to the runtime) is malformed."""


class InputNameError(RequestError):
    """A scoring batch lacks an input the model takes, has one it does not, or nests them otherwise."""


class InputTypeError(RequestError):
    """An input is not a tensor, or has another dtype than the program was captured with."""


class InputShapeError(RequestError):
    """An input's shape or row count does not match the captured schema or the batch's offsets."""


class InputValueError(RequestError):
    """An input's values cannot be scored: ids outside their table, bad offsets, user rows that differ."""


class RequestTooLargeError(RequestError):
    """A request is over a size limit of the server (body, candidates, ids in a bag times candidates)."""


class RoutingError(CodesignError):
    """A router policy is invalid, or no variant can serve a request."""


class OverloadError(RoutingError):
    """The server's queues are full (or it is shutting down): the request was not admitted.

    ``retry_after_s`` is when the work queued now is predicted to have drained (HTTP ``Retry-After``).
    """

    def __init__(self, message: str, *, retry_after_s: float, fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.retry_after_s = retry_after_s


class RankLostError(RoutingError):
    """A rank of a sharded server's process group died, hung or failed a collective: the request
    was not scored (HTTP 503 naming the rank) and the server is not ready until the group is whole."""


class DeadlineError(CodesignError):
    """A request's budget (``context.budget_ms``) ran out before it was scored; it was shed unscored."""


class WeightsError(CodesignError):
    """A weight update does not fit the served model or failed its checks; nothing was changed."""


class ReportError(CodesignError):
    """A report input is missing, of an unknown kind, or unreadable."""
