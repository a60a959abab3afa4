"""Logging: structlog, JSON in production, console in development, and a scrubber.

Every line passes through :func:`scrub_card_data` last before rendering, so that no log
line can hold a card number or a CVC, whoever wrote it:

* any string (or integer) holding a 13–19 digit Luhn-valid run, with or without spaces
  or dashes, has the run replaced (``[REDACTED CARD NUMBER]``), at any depth of nesting;
* any field whose name says it is a CVC or a card number (``cvc``, ``cvv``,
  ``card[cvc]``, ``security_code``, ``number`` …) has its value replaced outright, since a
  3-digit CVC cannot be recognised by its shape;
* exception tracebacks are rendered to text *before* the scrubber runs, so a card number
  in an exception message is caught too.

The standard library's loggers (uvicorn, asyncio …) are routed through the same chain.

A request id is bound per request (:func:`bind_request_id`) and appears on every line
written while that request is handled, with whatever else the request's handlers add
(:func:`bind_request_fields`): the fields live in one dict per request, held by a
context variable, which :func:`merge_request_fields` copies onto each line. (structlog's
own ``bind_contextvars`` keeps a context variable per field, and its merge copies the
whole context on every line: several times the cost, on every request's access line.)
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from cardvault.cards.luhn import PAN_MIN_DIGITS, redact_card_numbers

__all__ = [
    "REDACTED",
    "bind_request_fields",
    "bind_request_id",
    "clear_request_context",
    "configure_logging",
    "get_logger",
    "merge_request_fields",
    "request_fields",
    "scrub_card_data",
    "scrub_text",
]

REDACTED = "[REDACTED]"

# Field names whose values are card data by definition. Matched case-insensitively on
# the whole name or on a bracketed part of it (``card[cvc]``), so that form-encoded
# parameter names are covered too.
_SENSITIVE_NAME = re.compile(
    r"(^|[\[_.\-])(cvc|cvc2|cvv|cvv2|cid|csc|security_?code|card_?number|pan|number|"
    r"card_cvc|card_number)(\]|$)",
    re.IGNORECASE,
)


def _is_sensitive_name(name: object) -> bool:
    return isinstance(name, str) and bool(_SENSITIVE_NAME.search(name))


def _scrub_value(value: Any, depth: int = 0) -> Any:
    if depth > 12:
        return REDACTED
    if isinstance(value, str):
        return redact_card_numbers(value) if len(value) >= PAN_MIN_DIGITS else value
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        text = str(value)
        return redact_card_numbers(text) if len(text) >= PAN_MIN_DIGITS else value
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if _is_sensitive_name(k) else _scrub_value(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub_value(v, depth + 1) for v in value]
    # Anything else is rendered by the renderer with repr(); scrub that text now.
    return _scrub_value(repr(value), depth + 1)


def scrub_card_data(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: remove card numbers and CVCs from every field."""
    for key in list(event_dict):
        if _is_sensitive_name(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub_value(event_dict[key])
    return event_dict


#: The fields of the request being handled (None outside a request). One dict per
#: request, made by bind_request_id: tasks the request starts share it.
_REQUEST_FIELDS: ContextVar[dict[str, Any] | None] = ContextVar(
    "cardvault_request_fields", default=None
)
_NO_FIELDS: Mapping[str, Any] = MappingProxyType({})


def merge_request_fields(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: the current request's fields, under the line's own."""
    fields = _REQUEST_FIELDS.get()
    if fields:
        # A copy: a thread the request started (asyncio.to_thread) may log while a task
        # of the same request adds a field.
        for key, value in fields.copy().items():
            event_dict.setdefault(key, value)
    return event_dict


def _process_fields(fields: Mapping[str, Any]) -> Processor:
    """structlog processor: fields of the process (a worker's number), on every line."""
    fixed = dict(fields)

    def add(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        for key, value in fixed.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add


def _shared_processors(fields: Mapping[str, Any] | None = None) -> list[Processor]:
    return [
        merge_request_fields,
        *([_process_fields(fields)] if fields else []),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        # Tracebacks become text here, so the scrubber below sees them.
        structlog.processors.format_exc_info,
        structlog.processors.UnicodeDecoder(),
    ]


def configure_logging(
    *,
    profile: str = "production",
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    fields: Mapping[str, Any] | None = None,
) -> None:
    """Configure structlog and the standard library's logging for a service process.
    ``fields`` are added to every line (a vault worker's ``worker`` number)."""
    use_json = fmt == "json" or (fmt == "auto" and profile != "development")
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    shared = _shared_processors(fields)
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)

    structlog.configure(
        # The scrubber runs once, in the formatter below, which every record passes
        # through, structlog's and the standard library's alike.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            scrub_card_data,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # uvicorn's access log would print raw request lines (a card number could ride in a
    # query string); cardvault writes its own, scrubbed, access line instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True


def get_logger(name: str | None = None) -> Any:
    """A structlog logger (bound, stdlib-backed)."""
    return structlog.stdlib.get_logger(name)


def bind_request_id(request_id: str) -> None:
    """Start a request's fields with ``request_id``: it is on every line logged in the
    current context (and the tasks it starts) from now on."""
    _REQUEST_FIELDS.set({"request_id": request_id})


def bind_request_fields(**fields: Any) -> None:
    """Add ``fields`` to the current request's lines (its access line included). Outside
    a request, start a set of fields for the current context."""
    current = _REQUEST_FIELDS.get()
    if current is None:
        _REQUEST_FIELDS.set(dict(fields))
    else:
        current.update(fields)


def request_fields() -> Mapping[str, Any]:
    """The current request's fields (empty outside a request). Read-only by contract."""
    return _REQUEST_FIELDS.get() or _NO_FIELDS


def clear_request_context() -> None:
    """Forget the current request's fields."""
    _REQUEST_FIELDS.set(None)


def scrub_text(text: str) -> str:
    """The scrubber for one text that is not a log line (an error's message): every
    card number in it replaced."""
    return redact_card_numbers(text) if len(text) >= PAN_MIN_DIGITS else text


def scrub_mapping(data: MutableMapping[str, Any]) -> dict[str, Any]:
    """The scrubber as a plain function, for places that are not log lines."""
    return dict(scrub_card_data(None, "", dict(data)))
