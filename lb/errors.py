"""Errors of the control plane, each carrying the HTTP status the API answers with.

    XlbError (500)
     ├── InvalidInput (422)       bad address, port, weight, family combination, ...
     ├── NotFound (404)           unknown VIP or backend
     ├── Conflict (409)           duplicate VIP or backend
     │   ├── IncompatiblePins     pinned maps differ from the configured data plane
     │   └── ForeignProgram       another XDP program is attached to the interface
     ├── LimitReached (409)       a configured limit (VIPs, backends, ring) is full
     ├── PreconditionFailed (412) If-Match generation mismatch
     └── KernelError (503)        a bpf(2)/netlink call failed; errno translated here
         ├── BccUnavailable       BCC's Python module or kernel headers are missing
         └── NotApplied           the start could not bring the maps to the stored state:
                                  changes are refused until it can

Routes never build error JSON: api/ renders any XlbError as application/problem+json.
"""

from __future__ import annotations


class XlbError(Exception):
    """Base of every error the control plane raises on purpose."""

    status: int = 500
    #: Short, stable machine name used as the problem "type" suffix.
    kind: str = "internal"

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class InvalidInput(XlbError):
    """Input breaks a rule; `field` names the offending field."""

    status = 422
    kind = "invalid-input"


class NotFound(XlbError):
    """The named VIP or backend does not exist."""

    status = 404
    kind = "not-found"


class Conflict(XlbError):
    """The object already exists, or the change contradicts existing state."""

    status = 409
    kind = "conflict"


class IncompatiblePins(Conflict):
    """Pinned maps differ from what the program declares; the message says how to proceed."""

    kind = "incompatible-pins"


class ForeignProgram(Conflict):
    """An XDP program that is not ours is attached; replacing it needs replace_foreign."""

    kind = "foreign-program"


class LimitReached(XlbError):
    """A configured limit is reached; the message names the limit."""

    status = 409
    kind = "limit-reached"


class PreconditionFailed(XlbError):
    """The caller's If-Match generation is not the current one."""

    status = 412
    kind = "precondition-failed"


class KernelError(XlbError):
    """A kernel call failed; the message carries the translated errno."""

    status = 503
    kind = "kernel"


class BccUnavailable(KernelError):
    """BCC cannot be imported or cannot compile the data plane."""

    kind = "bcc-unavailable"


class UnsupportedKernel(KernelError):
    """The running kernel lacks a BPF feature the data plane needs, or its verifier refused a
    program; the message is one line naming what is missing and what is supported."""

    kind = "unsupported-kernel"


class NotApplied(KernelError):
    """The maps could not be brought to the stored state when the daemon started: a change
    would be stored but not applied, so changes are refused (503) until a retry succeeds."""

    kind = "not-applied"
