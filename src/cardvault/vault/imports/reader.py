"""Rows out of an import file's plaintext, fed in chunks: Stripe-style JSON lines or CSV
with a header. Pure (no I/O), so that memory stays flat: a reader holds at most one
line (one CSV record) that has not ended yet, and every size is bounded before work is
done on it.

What a file may be is in :class:`ImportLimits`. A file that breaks a rule of its
*structure* (a line past the limit, bytes that are not UTF-8, a line that is not a JSON
object, a CSV quote left open, a row without an external id, an external id that holds a
card number) raises :class:`ImportFileError` naming the line: such a file was not made
the way its format says, so none of it is imported. A row whose *card* is wrong (an
invalid number, an expired card) is the vault's to refuse row by row, exactly as the API
would (:mod:`cardvault.vault.imports.service`).

No message here ever holds text of the file: only line numbers, column names the
operator gave (``--map``) and the names of this module's fields.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from cardvault.cards import holds_card_number

__all__ = [
    "FIELDS",
    "FORMATS",
    "ImportFileError",
    "ImportLimits",
    "Row",
    "RowReader",
]

Format = Literal["jsonl", "csv"]
FORMATS: tuple[Format, ...] = ("jsonl", "csv")

#: The fields a row may give (CSV columns are mapped onto these; ``metadata.<key>``
#: columns too). Anything else in a row is ignored, never stored: a processor's file
#: may carry columns such as a CVC, which the vault must not keep.
_ADDRESS = ("line1", "line2", "city", "state", "postal_code", "country")
FIELDS = (
    "external_id",
    "number",
    "exp_month",
    "exp_year",
    "name",
    "email",
    "phone",
    *(f"address_{a}" for a in _ADDRESS),
    "customer",
)
#: Stripe's card objects spell two address fields their own way.
_STRIPE_ALIASES = {"address_zip": "address_postal_code", "id": "external_id"}
#: The same as :data:`FIELDS` for lookups, and each address field's row field name
#: (made once: these run for every row).
_FIELD_SET = frozenset(FIELDS)
_ADDRESS_FIELDS = tuple((a, f"address_{a}") for a in _ADDRESS)


@dataclass(frozen=True)
class ImportLimits:
    """Every size an import file can choose, bounded (docs/migration.md, "Limits")."""

    #: One line (JSON lines), or one CSV record with its quoted line breaks.
    max_line_bytes: int = 16 * 1024
    #: Columns of a CSV file; values in a JSON line (objects, lists and scalars).
    max_columns: int = 64
    max_json_values: int = 256
    #: Nesting of a JSON line: the row, its ``address``/``card``/``billing_details``
    #: or ``metadata``, and their values.
    max_json_depth: int = 3
    #: An external id's characters.
    max_external_id: int = 200
    #: Rows in one file.
    max_rows: int = 50_000_000


DEFAULT_IMPORT_LIMITS = ImportLimits()


class ImportFileError(ValueError):
    """The file breaks a rule of its structure (module docstring): nothing of it is
    imported. ``code`` is stable; ``message`` holds no text of the file."""

    def __init__(self, code: str, message: str, *, line: int | None = None) -> None:
        super().__init__(message if line is None else f"line {line}: {message}")
        self.code = code
        self.message = str(self)
        self.line = line


@dataclass(frozen=True)
class Row:
    """One row: its number (from 1), the line it starts on, its external id and the
    parameters of a ``POST /v1/payment_methods`` that would create it."""

    number: int
    line: int
    external_id: str
    params: dict[str, Any]


def _external_id(value: object, line: int, limits: ImportLimits) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ImportFileError("missing_external_id", "the row has no external id", line=line)
    if len(value) > limits.max_external_id or not value.isprintable():
        raise ImportFileError(
            "invalid_external_id",
            f"an external id is at most {limits.max_external_id} printable characters",
            line=line,
        )
    if holds_card_number(value):
        # The wrong column mapped as the id, most likely: the whole file is suspect.
        raise ImportFileError(
            "external_id_holds_card_number", "the external id holds a card number", line=line
        )
    return value


def _params(fields: dict[str, Any], metadata: Any) -> dict[str, Any]:
    """A create's parameters from a row's fields (empty values are absent)."""
    card = {k: fields[k] for k in ("number", "exp_month", "exp_year") if k in fields}
    address = {a: fields[f] for a, f in _ADDRESS_FIELDS if fields.get(f)}
    billing: dict[str, Any] = {
        k: fields[k] for k in ("name", "email", "phone") if fields.get(k) not in (None, "")
    }
    if address:
        billing["address"] = address
    params: dict[str, Any] = {"type": "card", "card": card}
    if billing:
        params["billing_details"] = billing
    meta = dict(metadata) if isinstance(metadata, dict) else metadata
    customer = fields.get("customer")
    if isinstance(customer, str) and customer:
        meta = {**(meta if isinstance(meta, dict) else {}), "customer": customer}
    if meta not in (None, {}, ""):
        params["metadata"] = meta
    return params


def _fits_json(value: Any, limits: ImportLimits) -> bool:
    """Whether a parsed line is within the value count and depth: the same rules as
    :func:`_check_json`, answered level by level with one Python step per container
    instead of one per value (a row's cost in an import). When it answers False,
    :func:`_check_json` names the rule broken."""
    budget = limits.max_json_values - 1  # the line's own object is a value
    level = [value]
    depth = 1
    while level:
        if depth > limits.max_json_depth:
            return False  # a container this deep holds values
        deeper = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            budget -= len(children)
            for child in children:
                if isinstance(child, (dict, list)) and child:
                    deeper.append(child)
        if budget < 0:
            return False
        level = deeper
        depth += 1
    return True


def _check_json(value: Any, line: int, limits: ImportLimits) -> None:
    """A parsed line within the value count and depth (orjson has parsed it already,
    iteratively, within the line's byte limit)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > limits.max_json_values:
            raise ImportFileError("json_too_large", "too many values in the line", line=line)
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        if children and depth + 1 > limits.max_json_depth + 1:
            raise ImportFileError("json_too_deep", "the line is nested too deep", line=line)
        stack.extend((child, depth + 1) for child in children)


class RowReader:
    """Rows out of plaintext chunks (module docstring). ``columns`` maps CSV header
    names onto :data:`FIELDS` (``--map column=field``); the others keep their names."""

    def __init__(
        self,
        fmt: Format,
        *,
        columns: dict[str, str] | None = None,
        limits: ImportLimits = DEFAULT_IMPORT_LIMITS,
    ) -> None:
        if fmt not in FORMATS:
            raise ImportFileError("invalid_format", "the format is jsonl or csv")
        self.format = fmt
        self.columns = dict(columns or {})
        self.limits = limits
        self._buffer = bytearray()
        self._line = 0  # physical lines ended so far
        self._rows = 0
        # CSV: the header's fields, and a record that spans lines.
        self._header: list[str | None] | None = None
        self._record: list[str] = []
        self._record_bytes = 0
        self._record_line = 0
        self._quotes = 0
        self.ignored_columns: list[str] = []

    @property
    def rows(self) -> int:
        return self._rows

    def feed(self, chunk: bytes) -> list[Row]:
        """The rows that ``chunk`` completes."""
        out: list[Row] = []
        self._buffer += chunk
        # The chunk's whole lines, split in one call (a row's cost in an import).
        end = self._buffer.rfind(b"\n")
        if end >= 0:
            whole = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            for raw in whole.split(b"\n"):
                self._take(raw, out)
        if len(self._buffer) > self.limits.max_line_bytes:
            raise ImportFileError(
                "line_too_long",
                f"the line is longer than {self.limits.max_line_bytes} bytes",
                line=self._line + 1,
            )
        return out

    def close(self) -> list[Row]:
        """The rows of the last line (one without a line break), and the end checks."""
        out: list[Row] = []
        if self._buffer:
            self._take(bytes(self._buffer), out)
            self._buffer.clear()
        if self._record:
            raise ImportFileError(
                "csv_unterminated_quote", "a quoted field is never closed", line=self._record_line
            )
        if self.format == "csv" and self._header is None:
            raise ImportFileError("csv_missing_header", "the file has no header line", line=1)
        return out

    # -- lines ---------------------------------------------------------------------------

    def _take(self, raw: bytes, out: list[Row]) -> None:
        self._line += 1
        if len(raw) > self.limits.max_line_bytes:
            raise ImportFileError(
                "line_too_long",
                f"the line is longer than {self.limits.max_line_bytes} bytes",
                line=self._line,
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ImportFileError(
                "invalid_utf8", "the line is not valid UTF-8", line=self._line
            ) from None
        if self.format == "jsonl":
            self._json_line(text, out)
        else:
            self._csv_line(text, out)

    def _row(self, line: int, fields: dict[str, Any], metadata: Any, out: list[Row]) -> None:
        if self._rows >= self.limits.max_rows:
            raise ImportFileError(
                "too_many_rows", f"a file holds at most {self.limits.max_rows} rows", line=line
            )
        external_id = _external_id(fields.get("external_id"), line, self.limits)
        self._rows += 1
        out.append(Row(self._rows, line, external_id, _params(fields, metadata)))

    # -- JSON lines ----------------------------------------------------------------------

    def _json_line(self, text: str, out: list[Row]) -> None:
        if not text.strip():
            return
        line = self._line
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            # orjson's message quotes positions, never the text; it is still not shown.
            raise ImportFileError("invalid_json", "the line is not JSON", line=line) from None
        if not isinstance(value, dict):
            raise ImportFileError("invalid_json", "the line is not a JSON object", line=line)
        if not _fits_json(value, self.limits):
            _check_json(value, line, self.limits)
        fields: dict[str, Any] = {}
        for key, item in value.items():
            name = _STRIPE_ALIASES.get(key, key)
            if name in _FIELD_SET and name not in fields:
                fields[name] = item
        # Stripe's PaymentMethod shape: {"id", "card": {...}, "billing_details": {...}}.
        card = value.get("card")
        if isinstance(card, dict):
            for key in ("number", "exp_month", "exp_year"):
                if key in card:
                    fields[key] = card[key]
        billing = value.get("billing_details")
        if isinstance(billing, dict):
            for key in ("name", "email", "phone"):
                if key in billing:
                    fields[key] = billing[key]
            address = billing.get("address")
            if isinstance(address, dict):
                value = {**value, "address": address}
        address = value.get("address")
        if isinstance(address, dict):
            for key, field in _ADDRESS_FIELDS:
                if key in address:
                    fields[field] = address[key]
        if "external_id" in value:
            fields["external_id"] = value["external_id"]
        self._row(line, fields, value.get("metadata"), out)

    # -- CSV -----------------------------------------------------------------------------

    def _csv_line(self, text: str, out: list[Row]) -> None:
        if text.endswith("\r"):
            text = text[:-1]
        if not self._record:
            if not text.strip() and self._header is not None:
                return
            self._record_line = self._line
        self._record.append(text)
        self._record_bytes += len(text) + 1
        if self._record_bytes > self.limits.max_line_bytes:
            raise ImportFileError(
                "line_too_long",
                f"the record is longer than {self.limits.max_line_bytes} bytes",
                line=self._record_line,
            )
        # RFC 4180 doubles a quote inside a quoted field, so a record has ended exactly
        # when the quotes seen in it are even.
        self._quotes += text.count('"')
        if self._quotes % 2:
            return
        record, line = "\n".join(self._record), self._record_line
        self._record, self._record_bytes, self._quotes = [], 0, 0
        try:
            values = next(csv.reader(io.StringIO(record, newline=""), strict=True))
        except (csv.Error, StopIteration):
            raise ImportFileError("invalid_csv", "the record is not valid CSV", line=line) from None
        if len(values) > self.limits.max_columns:
            raise ImportFileError(
                "csv_too_many_columns",
                f"a record has at most {self.limits.max_columns} columns",
                line=line,
            )
        if self._header is None:
            self._header = self._read_header(values, line)
            return
        if len(values) != len(self._header):
            raise ImportFileError(
                "csv_column_count",
                f"the record has {len(values)} columns, the header {len(self._header)}",
                line=line,
            )
        fields: dict[str, Any] = {}
        metadata: dict[str, str] = {}
        for name, value in zip(self._header, values, strict=True):
            if name is None or value == "":
                continue
            if name.startswith("metadata."):
                metadata[name.removeprefix("metadata.")] = value
            else:
                fields[name] = value
        self._row(line, fields, metadata, out)

    def _read_header(self, values: list[str], line: int) -> list[str | None]:
        header: list[str | None] = []
        for raw in values:
            name = self.columns.get(raw, raw).strip()
            name = _STRIPE_ALIASES.get(name, name)
            if name in FIELDS or (name.startswith("metadata.") and len(name) > 9):
                if name in header:
                    raise ImportFileError(
                        "csv_duplicate_column", f"two columns are mapped to {name}", line=line
                    )
                header.append(name)
            else:
                header.append(None)
                self.ignored_columns.append(raw[:64] if not holds_card_number(raw) else "?")
        for needed in ("external_id", "number"):
            if needed not in header:
                raise ImportFileError(
                    "csv_missing_column",
                    f"no column is mapped to {needed} (--map COLUMN={needed})",
                    line=line,
                )
        return header
