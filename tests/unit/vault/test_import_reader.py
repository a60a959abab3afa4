"""The import file reader (cardvault.vault.imports.reader): rows out of chunks, every
size bounded, structure errors naming the line and never the file's text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardvault.vault.imports.reader import (
    ImportFileError,
    ImportLimits,
    RowReader,
    _check_json,
    _fits_json,
)

CARD = "4242424242424242"


def read(fmt: str, data: bytes, *, chunk: int = 7, **kw: object) -> list[object]:
    reader = RowReader(fmt, **kw)  # type: ignore[arg-type]
    rows: list[object] = []
    for i in range(0, len(data), chunk):
        rows += reader.feed(data[i : i + chunk])
    return rows + reader.close()


def test_csv_quoted_fields_with_commas_quotes_and_line_breaks_split_across_chunks() -> None:
    data = (
        b"external_id,number,exp_month,exp_year,name\r\n"
        b"a," + CARD.encode() + b',12,2034,"Rosen, ""J""\r\nsecond line"\r\n'
        b"b," + CARD.encode() + b",1,2035,\r\n"
    )
    rows = read("csv", data)
    assert [(r.number, r.line, r.external_id) for r in rows] == [(1, 2, "a"), (2, 4, "b")]  # type: ignore[attr-defined]
    assert rows[0].params["billing_details"]["name"] == 'Rosen, "J"\nsecond line'  # type: ignore[attr-defined]


def test_csv_columns_are_mapped_and_unknown_ones_ignored_never_read() -> None:
    reader = RowReader("csv", columns={"Token": "external_id", "PAN": "number"})
    rows = reader.feed(b"Token,PAN,CVV,metadata.plan\nx1," + CARD.encode() + b",123,gold\n")
    rows += reader.close()
    assert reader.ignored_columns == ["CVV"]
    assert rows[0].params == {
        "type": "card",
        "card": {"number": CARD},
        "metadata": {"plan": "gold"},
    }


@pytest.mark.parametrize(
    ("fmt", "data", "code", "line"),
    [
        ("csv", b'external_id,number\na,"' + CARD.encode() + b"\n", "csv_unterminated_quote", 2),
        ("csv", b"external_id,number\na,1,2\n", "csv_column_count", 2),
        ("csv", b"id,name\n", "csv_missing_column", 1),
        ("csv", b"", "csv_missing_header", 1),
        ("jsonl", b'{"id": "a"}\n[1]\n', "invalid_json", 2),
        ("jsonl", b'{"id": "a"}\n{"id": \n', "invalid_json", 2),
        ("jsonl", b'{"number": "1"}\n', "missing_external_id", 1),
        ("jsonl", b'{"id": "' + CARD.encode() + b'"}\n', "external_id_holds_card_number", 1),
        ("jsonl", b'{"id": "a", "metadata": {"x": {"y": {"z": 1}}}}\n', "json_too_deep", 1),
        ("jsonl", b'{"id": "ok"}\n{"id": "\xff"}\n', "invalid_utf8", 2),
    ],
)
def test_a_broken_structure_is_refused_naming_the_line(
    fmt: str, data: bytes, code: str, line: int
) -> None:
    with pytest.raises(ImportFileError) as caught:
        read(fmt, data)
    assert (caught.value.code, caught.value.line) == (code, line)
    assert CARD not in str(caught.value)


def test_a_long_line_is_refused_before_it_is_held_whole() -> None:
    reader = RowReader("jsonl", limits=ImportLimits(max_line_bytes=1024))
    reader.feed(b'{"id": "a"}\n')
    # 10 MB of one line, fed 64 KiB at a time: refused at the first chunk past the
    # limit, so the reader never holds more than the limit and one chunk.
    fed = 0
    caught: ImportFileError | None = None
    while fed < 10_000_000 and caught is None:
        try:
            reader.feed(b" " * 65536)
        except ImportFileError as exc:
            caught = exc
        fed += 65536
    assert caught is not None
    assert fed == 65536
    assert (caught.code, caught.line) == ("line_too_long", 2)


def test_stripe_payment_method_objects_are_read_with_their_billing_details() -> None:
    line = (
        b'{"id": "pm_old", "card": {"number": "' + CARD.encode() + b'", "exp_month": 1, '
        b'"exp_year": 2031}, "billing_details": {"name": "N", "address": {"country": "DE"}},'
        b' "customer": "cus_1", "fingerprint": "ignored"}\n'
    )
    (row,) = read("jsonl", line)
    assert row.external_id == "pm_old"  # type: ignore[attr-defined]
    assert row.params == {  # type: ignore[attr-defined]
        "type": "card",
        "card": {"number": CARD, "exp_month": 1, "exp_year": 2031},
        "billing_details": {"name": "N", "address": {"country": "DE"}},
        "metadata": {"customer": "cus_1"},
    }


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=5)
    ),
    max_leaves=40,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.text(max_size=3), _JSON, max_size=6), st.integers(1, 4), st.integers(1, 40)
)
def test_the_fast_json_check_agrees_with_the_one_that_names_the_rule(
    line: dict[str, object], depth: int, values: int
) -> None:
    limits = ImportLimits(max_json_depth=depth, max_json_values=values)
    try:
        _check_json(line, 1, limits)
        refused = False
    except ImportFileError:
        refused = True
    assert _fits_json(line, limits) is not refused
