"""Fuzz the audit-line parser, ``cardvault.audit.record.AuditRecord.from_line``.

The first byte of an input picks what the rest is:

``l``
    a line as read from ``audit.jsonl``, passed as it is;
``r``
    a line to *reseal* first: when it parses (stdlib ``json``) to an object with a
    ``hash``, the harness recomputes that hash and writes the object back in the log's
    compact form before passing it on. A mutated line almost never keeps a valid hash;
    this lets the fuzzer reach what ``from_line`` checks after the hash.

Any other first byte picks by its value modulo 2 (``l``, ``r``).
``CARDVAULT_FUZZ_MODES`` (``l`` or ``r``) fuzzes only that mode.

Properties (anything else is a finding):

* the only exception is :class:`~cardvault.audit.record.RecordInvalid`;
* an accepted line is exactly the record's ``line()`` (newline aside), and that line
  parses back to an equal record whose hash is its content's. (Not checked: that its
  strings encode to UTF-8. A ``\\ud800`` escape is accepted, as ``check_entry`` lets the
  writer record one; reading and writing agree on it.)
* an input takes at most ``CARDVAULT_FUZZ_SLOW_MS`` (100 ms).
"""

from __future__ import annotations

import json

import _harness


def load() -> None:
    import cardvault.audit.record  # noqa: F401


def _reseal(body: bytes) -> bytes:
    """``body`` with its hash recomputed, when it is an object that has one; else as it is."""
    from cardvault.audit.record import record_hash

    try:
        value = json.loads(body)
        if not isinstance(value, dict) or "hash" not in value:
            return body
        value["hash"] = record_hash(value)
        return json.dumps(value, separators=(",", ":")).encode("ascii")
    except (ValueError, TypeError, RecursionError):
        return body


def _one(data: bytes) -> None:
    from cardvault.audit.record import AuditRecord, RecordInvalid, record_hash

    if not data:
        return
    mode = {ord("l"): "l", ord("r"): "r"}.get(data[0]) or "lr"[data[0] % 2]
    if _harness.skip_mode(mode):
        return
    line = data[1:] if mode == "l" else _reseal(data[1:])
    try:
        with _harness.target():
            record = AuditRecord.from_line(line)
    except RecordInvalid:
        return
    except Exception as exc:
        _harness.unexpected(exc, "AuditRecord.from_line")
        return

    body = line[:-1] if line.endswith(b"\n") else line
    try:
        with _harness.target():
            written = record.line()
            again = AuditRecord.from_line(written)
            content_hash = record_hash(record.to_dict())
    except Exception as exc:
        _harness.unexpected(exc, "an accepted record's line()")
        return
    if written[:-1] != body or not written.endswith(b"\n"):
        _harness.finding("line-mismatch", "an accepted line is not the record's line()")
    if again != record:
        _harness.finding("roundtrip", "the record's line() parses to another record")
    if content_hash != record.hash:
        _harness.finding("hash-mismatch", "an accepted record's hash is not its content's")


def TestOneInput(data: bytes) -> None:
    _harness.timed(_one, data)


if __name__ == "__main__":
    _harness.main(TestOneInput, load, mode_bytes=1)
