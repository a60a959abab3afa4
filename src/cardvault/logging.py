"""Logging: structlog, JSON in production, console in development, and a scrubber.

Every line passes through :func:`scrub_card_data` last before rendering (on structlog's
lines only the level and the time, which the chain writes itself from the method's name
and the clock, are added after it), so that no log line can hold a card number or a
CVC, whoever wrote it:

* any string (or integer) holding a 13–19 digit Luhn-valid run, with or without spaces
  or dashes, has the run replaced (``[REDACTED CARD NUMBER]``), at any depth of nesting;
* any field whose name says it is a CVC or a card number (``cvc``, ``cvv``,
  ``card[cvc]``, ``security_code``, ``number`` …) has its value replaced outright, since a
  3-digit CVC cannot be recognised by its shape;
* exception tracebacks are rendered to text *before* the scrubber runs, so a card number
  in an exception message is caught too.

The standard library's loggers (uvicorn, asyncio …) are routed through the same chain.
structlog's own loggers (every line cardvault writes, the access line of each request
among them) do not go through the standard library: their chain renders the line and
writes it to the same stream, under the same lock, as the standard library's handler
(:class:`_LineWriter`). Going through ``logging`` made a ``LogRecord`` (two, with the
formatter's copy), looked up the caller's frame and ran the chain in the formatter: 120-170
µs per access line on the project's benchmark machine, several times the chain itself.
The level, the chain and the stream are the process's current configuration, read at
each line, so that loggers cached before :func:`configure_logging` follow it.

A request id is bound per request (:func:`bind_request_id`) and appears on every line
written while that request is handled, with whatever else the request's handlers add
(:func:`bind_request_fields`): the fields live in one dict per request, held by a
context variable, which :func:`merge_request_fields` copies onto each line. (structlog's
own ``bind_contextvars`` keeps a context variable per field, and its merge copies the
whole context on every line: several times the cost, on every request's access line.)
"""

from __future__ import annotations

import json
import json.encoder
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from cardvault.cards.luhn import PAN_MIN_DIGITS, redact_card_numbers

__all__ = [
    "REDACTED",
    "add_line_tap",
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


#: Field names already judged: the same few dozen names are on every line. Bounded, as
#: a name can come from a caller (a form's parameter names logged as a mapping).
_NAME_VERDICTS: dict[str, bool] = {}
_MAX_NAME_VERDICTS = 4096


def _is_sensitive_name(name: object) -> bool:
    if not isinstance(name, str):
        return False
    verdict = _NAME_VERDICTS.get(name)
    if verdict is None:
        verdict = bool(_SENSITIVE_NAME.search(name))
        if len(_NAME_VERDICTS) < _MAX_NAME_VERDICTS:
            _NAME_VERDICTS[name] = verdict
    return verdict


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


#: An integer inside these bounds is written with fewer than PAN_MIN_DIGITS characters.
_SHORT_INT = 10 ** (PAN_MIN_DIGITS - 2)


def scrub_card_data(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: remove card numbers and CVCs from every field."""
    verdicts = _NAME_VERDICTS
    for key, value in event_dict.items():  # values replaced in place: no key added
        sensitive = verdicts.get(key)
        if sensitive is None:
            sensitive = _is_sensitive_name(key)
        if sensitive:
            event_dict[key] = REDACTED
            continue
        # What _scrub_value does, without its call for the common short values.
        kind = type(value)
        if kind is str:
            if len(value) >= PAN_MIN_DIGITS:
                event_dict[key] = redact_card_numbers(value)
        elif kind is int:
            if not -_SHORT_INT < value < _SHORT_INT:
                event_dict[key] = _scrub_value(value)
        elif value is not None and kind is not bool and kind is not float:
            event_dict[key] = _scrub_value(value)
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


_STACK_INFO = structlog.processors.StackInfoRenderer(additional_ignores=[__name__])


def _extras(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    """structlog's StackInfoRenderer, format_exc_info and UnicodeDecoder in one
    processor, the first two called only for a line that asks for them."""
    if "stack_info" in event_dict:
        event_dict = _STACK_INFO(logger, name, event_dict)
    if "exc_info" in event_dict:
        # Tracebacks become text here, so the scrubber after this sees them.
        event_dict = structlog.processors.format_exc_info(logger, name, event_dict)
    for key, value in event_dict.items():
        if isinstance(value, bytes):
            event_dict[key] = value.decode("utf-8", "replace")
    return event_dict


def _line_processors(fields: Mapping[str, Any] | None = None) -> list[Processor]:
    """structlog's own chain, up to the renderer: the shared one with the scrubber, and
    the level and the time after it (values the chain makes itself, which the scrubber
    need not read on every line; either would overwrite a field of the same name)."""
    return [
        merge_request_fields,
        *([_process_fields(fields)] if fields else []),
        structlog.stdlib.add_logger_name,
        _extras,
        scrub_card_data,
        structlog.stdlib.add_log_level,
        _utc_timestamp,
        _tap_line,
    ]


#: What :func:`add_line_tap` registered: each is handed every line structlog writes,
#: scrubbed and stamped, before it is rendered.
_TAPS: list[Callable[[Mapping[str, Any]], None]] = []


def add_line_tap(tap: Callable[[Mapping[str, Any]], None]) -> Callable[[], None]:
    """Hand ``tap`` every line cardvault's structlog loggers write from now on (after
    the scrubber, with its level and time: what is rendered), in the thread that logs
    it; it must be quick and must not log. Returns the function that removes it. The
    vault's request log (``cardvault logs tail``) is one. A tap that raises loses its
    line, never the log's."""
    _TAPS.append(tap)

    def remove() -> None:
        if tap in _TAPS:
            _TAPS.remove(tap)

    return remove


def _tap_line(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: the line to every tap of :func:`add_line_tap`."""
    for tap in _TAPS:
        try:
            tap(event_dict)
        except Exception:  # noqa: S112 (a tap never costs the line its writing)
            continue
    return event_dict


#: The second :func:`_utc_timestamp` last wrote, and its text: one tuple, replaced whole,
#: so that a thread never reads one second's number with another's text.
_last_second: tuple[int, str] = (-1, "")


def _utc_timestamp(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog's ``TimeStamper(fmt="iso", utc=True)``: ``timestamp`` as
    ``2026-12-07T11:26:19.123456Z``, with the date and time of the second formatted
    once per second rather than by a ``datetime`` on every line. (The microseconds are
    always written, where ``datetime.isoformat`` leaves them out when they are 0.)"""
    global _last_second
    second, nanos = divmod(time.time_ns(), 1_000_000_000)
    cached, text = _last_second
    if second != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    event_dict["timestamp"] = f"{text}.{nanos // 1000:06d}Z"
    return event_dict


#: What structlog's JSONRenderer writes (``json.dumps`` with its defaults), with one
#: encoder made once instead of one per line. The scrubber before it has turned every
#: value it does not know into text, so the fallback is repr() alone.
_LINE_JSON = json.JSONEncoder(default=repr)
#: The C encoder ``_LINE_JSON.encode`` makes anew for every call, made once (with the
#: same settings: ASCII only, ", " and ": ", repr for what JSON has no type for). It
#: keeps no record of the containers it is in (``check_circular``): a line's values
#: are the scrubber's copies, nested at most 13 deep, so none contains itself.
_C_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)  # (not in typeshed)
_LINE_ENCODER = (
    _C_ENCODER(
        None, repr, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    if _C_ENCODER is not None
    else None
)


def _render_json(event_dict: Any, **_kw: Any) -> str:
    if _LINE_ENCODER is None or type(event_dict) is not dict:
        return _LINE_JSON.encode(event_dict)
    return "".join(_LINE_ENCODER(event_dict, 0))


#: The level of each method name of a structlog logger.
_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "msg": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


class _Output:
    """What structlog's loggers do with a line, as :func:`configure_logging` last said:
    the lowest level written, the chain (ending with the scrubber and the renderer), and
    the handler whose stream and lock the line shares with the standard library's."""

    level: int = logging.INFO
    chain: tuple[Processor, ...] = ()
    handler: logging.StreamHandler[TextIO] | None = None


_OUTPUT = _Output()


def _run_chain(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
    """structlog's only processor once configured: drop a line below the level, else run
    the current chain (see :class:`_Output`)."""
    if _METHOD_LEVELS.get(method_name, logging.INFO) < _OUTPUT.level:
        raise structlog.DropEvent
    result: Any = event_dict
    for processor in _OUTPUT.chain:
        result = processor(logger, method_name, result)
    return result


class _LineWriter:
    """The logger structlog wraps: writes each rendered line to the configured handler's
    stream, holding the handler's lock, and flushes it, as ``logging.StreamHandler``
    does. Like the standard library, a line that cannot be written is dropped rather
    than failing the request that logged it."""

    __slots__ = ("name",)

    def __init__(self, name: str | None = None, *_args: Any) -> None:
        self.name = name or "root"

    def _write(self, line: str) -> None:
        handler = _OUTPUT.handler
        if handler is None:
            return
        lock = handler.lock
        try:
            if lock is not None:
                lock.acquire()
            try:
                stream = handler.stream
                stream.write(line + "\n")
                stream.flush()
            finally:
                if lock is not None:
                    lock.release()
        except Exception:
            return

    debug = info = msg = warning = warn = error = exception = critical = fatal = _write
    log = _write


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
        structlog.processors.JSONRenderer(serializer=_render_json)
        if use_json
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    shared = _shared_processors(fields)
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)

    handler = logging.StreamHandler(stream or sys.stderr)
    # The scrubber runs last before the renderer on every line: structlog's (the chain
    # below) and the standard library's (the formatter) alike.
    _OUTPUT.level = numeric_level
    _OUTPUT.chain = (*_line_processors(fields), renderer)
    _OUTPUT.handler = handler
    structlog.configure(
        processors=[_run_chain],
        logger_factory=_LineWriter,
        # Every level method of the wrapper passes its line on; _run_chain filters by
        # the current level.
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
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
    """A structlog logger, named ``name`` (the ``logger`` field of its lines)."""
    return structlog.get_logger(name)


def bind_request_id(request_id: str, *, origin: str | None = None) -> None:
    """Start a request's fields with ``request_id`` (and ``origin``, the client's
    address, when given): they are on every line logged in the current context (and
    the tasks it starts) from now on."""
    if origin is None:
        _REQUEST_FIELDS.set({"request_id": request_id})
    else:
        _REQUEST_FIELDS.set({"request_id": request_id, "origin": origin})


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
