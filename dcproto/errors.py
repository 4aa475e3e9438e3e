"""The one exception tree of dcproto.

Every error dcproto raises derives from :class:`DcprotoError`:

* :class:`DcprotoError`
    * :class:`UsageError` -- you called dcproto wrong (local misuse)
        * :class:`ConfigurationError` -- a bad ``Distribute`` argument or project class
        * :class:`ResultsPathError` -- ``results_path`` cannot be created or written
        * :class:`UnknownUserError` -- no named server ("user") of that name
    * :class:`SerializationError` -- a class, item or value could not be pickled or unpickled
        * :class:`UnhashableItemError` -- an item cannot be a key of the results dict
        * :class:`UnsafeResult` -- a worker's value is of a type outside the allow-list
    * :class:`IdentityError` -- the server's key or certificate cannot be made or loaded
    * :class:`ConnectionFailed` -- the server cannot be reached or went away
        * :class:`AuthenticationFailed` -- the server refused our token
        * :class:`CertificateMismatch` -- the server is not the one whose certificate we pinned
    * :class:`PermissionDenied` -- our token's role, or a project's owner, does not allow that
    * :class:`ProtocolError` -- a frame broke the protocol
        * :class:`RemoteProtocolError` -- the peer sent something invalid
        * :class:`LocalProtocolError` -- we tried to send something invalid
        * :class:`FrameTooLarge` -- a frame exceeds the negotiated maximum size
    * :class:`ProjectError` -- a project ended without a full result
        * :class:`TaskFailed` -- user code raised, crashed or timed out (``reason``, ``attempts``)
        * :class:`ProjectCancelled` -- the project was cancelled
        * :class:`ProjectUnrunnable` -- no connected worker can run the project

Third-party exceptions (msgpack, pickling, OSError) are converted at the boundary with
``raise ... from`` so callers never need to catch a library's internals.
"""

from __future__ import annotations

from typing import Any


class DcprotoError(Exception):
    """Root of every error raised by dcproto."""


class UsageError(DcprotoError):
    """dcproto was called wrong by local code."""


class ConfigurationError(UsageError):
    """A ``Distribute`` argument or the project class is not usable."""


class ResultsPathError(UsageError):
    """The results directory cannot be created or written."""


class UnknownUserError(UsageError):
    """No named server ("user") has that name."""


class SerializationError(DcprotoError):
    """A class, item or return value could not be (un)pickled."""


class UnhashableItemError(SerializationError):
    """An item of the iterator cannot be used as a key of the results dict."""


class UnsafeResult(SerializationError):
    """A value from a worker holds a type outside the safe decoder's allow-list (the project
    did not opt in to ``trust_workers``). ``type_name`` names the refused type."""

    def __init__(self, message: str, *, type_name: str) -> None:
        super().__init__(message)
        self.type_name = type_name


class IdentityError(DcprotoError):
    """The server's TLS key or certificate cannot be made, read or used."""


class ConnectionFailed(DcprotoError):
    """The server cannot be reached, or the connection was lost."""


class AuthenticationFailed(ConnectionFailed):
    """The server refused the token we presented (unknown, revoked or wrong)."""


class CertificateMismatch(ConnectionFailed):
    """The server's certificate is not the pinned one: nothing was sent to it."""

    def __init__(self, message: str, *, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class PermissionDenied(DcprotoError):
    """The server refused a request because of our token's role or a project's owner."""


class ProtocolError(DcprotoError):
    """A frame or message broke the protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer sent a malformed frame or an unexpected message."""

    def __init__(self, message: str, *, code: str = "bad_message") -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to send a message that is invalid in the current state."""


class FrameTooLarge(RemoteProtocolError):
    """A frame's announced size is over the limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit}", code="too_large")
        self.size = size
        self.limit = limit


class ProjectError(DcprotoError):
    """A project ended without a complete result."""


class TaskFailed(ProjectError):
    """A task failed for good: user code raised, or its process crashed or timed out.

    ``reason`` is machine-readable (``"exception"``, ``"crash"``, ``"timeout"``,
    ``"load_error"``, ...), ``attempts`` counts how often the task was tried, ``item`` is
    the repr of the item that raised (when known) and ``remote_traceback`` the worker-side
    traceback text.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        attempts: int = 1,
        item: str | None = None,
        remote_traceback: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        text = message
        if item is not None:
            text += f"\n  item: {item}"
        if remote_traceback:
            text += "\n  remote traceback:\n" + remote_traceback.rstrip()
        super().__init__(text)
        self.reason = reason
        self.attempts = attempts
        self.item = item
        self.remote_traceback = remote_traceback
        self.details = details or {}


class ProjectCancelled(ProjectError):
    """The project was cancelled before it finished."""


class ProjectUnrunnable(ProjectError):
    """No connected worker can run the project (for instance, a module is missing)."""
