"""A scanner for card data at rest: card numbers, CVCs and planted canaries in files.

``cardvault scan PATH…`` and the test suites use it to prove that logs, databases,
backups and temporary files hold no card data in a form someone could read back. It
looks for:

* **card numbers**: runs of 13–19 digits, optionally split by single separators
  (spaces, dashes, dots …), that pass the Luhn check (the grammar of
  :func:`cardvault.cards.find_card_numbers`; a longer run is reported when any
  card-length window of it passes). Bytes are read as ASCII here, so digits of other
  scripts are seen in the forms below only when a program escaped them to ASCII;
* **canaries**: exact strings the caller planted (a test card's number, a marker CVC,
  a secret), at least 8 printable ASCII characters;
* **CVCs**: the given 3- or 4-digit values, but only in a *shaped* context, where a
  field name says it is a CVC: ``"cvc":"123"``, ``cvc=123``, ``card[cvc]=123``,
  ``card%5Bcvc%5D=123``, ``'cvv2': 123``, ``security_code: 123`` … A bare three-digit
  number occurs by chance everywhere and proves nothing.

Each is looked for in every encoding a program is likely to have written it in:

``ascii``      the bytes as they are (also UTF-8, and text inside binary files such as
               SQLite databases);
``utf-16-le``  and ``utf-16-be``: runs of printable ASCII characters as UTF-16 code
               units, at any byte offset (SQLite with ``PRAGMA encoding=UTF-16``, Java
               and Windows strings);
``hex``        runs of hex digits (either case), decoded at both nibble alignments;
``base64``     runs of base64 or base64url characters (padding optional), decoded at all
               four character alignments. Decoding the run, rather than searching for a
               known value's encoding, covers the three byte alignments the value can have
               inside the encoded data (and numbers nobody knew in advance), so no
               "stable inner part" needs to be guessed.

Files are read in chunks (1 MiB by default) that overlap, so a value that straddles two
chunks is found once; directories are walked without following symbolic links, and only
regular files are read.

Findings never hold the value found: a card number shows as ``424242******4242`` at
most (PCI DSS's first six and last four), a canary as its position in the list given, a
CVC as ``***``.

False positives: the scanner reports everything that matches and leaves the judgement
to the caller, who can leave paths out with ``ignore`` globs (``--ignore``). Encrypted
data does not match: ciphertext is random bytes, and a run of 13 or more ASCII digits
in random bytes has odds of about 10⁻¹⁸ per position; runs of base64 or hex characters
in random bytes decode to random bytes again. What does match by chance is ASCII digit
runs that happen to pass Luhn (one in ten does), such as long numeric ids or
timestamps glued together: that is a finding to look at, not to hide.

A file that cannot be read is reported as an ``unreadable`` finding, since a scanner
that skips what it cannot read would pass a leak it never saw.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Final

from cardvault.cards.luhn import (
    PAN_MAX_DIGITS,
    PAN_MIN_DIGITS,
    card_number_in,
    digits_of,
    find_card_numbers,
)

__all__ = [
    "CHUNK_SIZE",
    "Encoding",
    "Finding",
    "FindingKind",
    "scan_bytes",
    "scan_paths",
]

#: Bytes read at a time.
CHUNK_SIZE: Final = 1 << 20
#: Findings this close to a chunk's cut are left to the neighbouring chunk, where they
#: have their full context (the character before and after decides a digit run).
_MARGIN: Final = 64
#: Least overlap between chunks; grown for long canaries.
_MIN_OVERLAP: Final = 4096
#: Shortest canary: shorter strings turn up by chance.
MIN_CANARY: Final = 8

_HEX_TOKEN = re.compile(r"[0-9A-Fa-f]+(?:-[0-9A-Fa-f]+)*")
#: Hex digits around a digit run that make it part of a hex string (see _inside_hex_token).
_HEX_CONTEXT: Final = 8
_UTF16_LE = re.compile(rb"(?:[\t\n\r\x20-\x7e]\x00){6,}")
_UTF16_BE = re.compile(rb"(?:\x00[\t\n\r\x20-\x7e]){6,}")
_HEX_RUN = re.compile(rb"[0-9A-Fa-f]{16,}")
_B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{12,}={0,2}")
_B64URL_TO_STD = bytes.maketrans(b"-_", b"+/")
# A CVC where a field name says it is one. The value is captured and compared with the
# CVCs given; the name may be JSON, a form field (bracketed or URL-encoded), YAML or a
# Python repr.
_CVC_SHAPED = re.compile(
    rb"(?<![A-Za-z0-9])(?:card(?:\[|%5B|_|\.|-)?)?"
    rb"(?:cvc2?|cvv2?|csc|cid|security[_-]?code|card[_-]?verification[_-]?(?:code|value))"
    rb"(?:\]|%5D)?[\"']?\s*(?::|=|%3D)\s*[\"']?([0-9]{3,4})(?![0-9])",
    re.IGNORECASE,
)


class FindingKind(StrEnum):
    CARD_NUMBER = "card_number"
    CANARY = "canary"
    CVC = "cvc"
    UNREADABLE = "unreadable"


class Encoding(StrEnum):
    ASCII = "ascii"
    UTF16_LE = "utf-16-le"
    UTF16_BE = "utf-16-be"
    HEX = "hex"
    BASE64 = "base64"
    NONE = "-"


@dataclass(frozen=True, slots=True, order=True)
class Finding:
    """Where something was found. Never holds the value itself."""

    path: Path
    #: Byte offset in the file where the encoded value starts.
    offset: int
    kind: FindingKind
    encoding: Encoding
    #: ``424242******4242`` (or ``36-digit run``) for a card number, ``canary #2``, or
    #: ``***`` for a CVC.
    masked: str

    def __str__(self) -> str:
        return f"{self.path}:{self.offset}: {self.kind} ({self.encoding}) {self.masked}"


@dataclass(frozen=True, slots=True)
class _Hit:
    start: int  # absolute byte offsets of the encoded value in the file
    end: int
    kind: FindingKind
    encoding: Encoding
    masked: str


def _inside_hex_token(text: str, start: int, end: int) -> bool:
    """True when text[start:end] (a digit run) is part of a longer hex string.

    Random hex (digests, ``dk_…`` ids, UUIDs) is 62% digits, so it holds Luhn-valid
    13-digit runs often enough to flood a scan of any log: a 64-digit SHA-256 does, about
    one time in 200. A run with at least :data:`_HEX_CONTEXT` more hex digits (one a
    letter) around it in the same string is therefore not reported as a card number. A
    card number glued to a hex id is missed by this rule; plant it as a canary to find
    it anywhere.
    """
    for token in _HEX_TOKEN.finditer(text, max(0, start - 64), min(len(text), end + 64)):
        if token.start() <= start and end <= token.end():
            word = token.group()
            others = sum(c != "-" for c in word) - sum(c.isdigit() for c in text[start:end])
            return others >= _HEX_CONTEXT and any(c in "abcdefABCDEF" for c in word)
        if token.start() > start:
            break
    return False


def _mask_digits(digits: str) -> str:
    return f"{digits[:6]}{'*' * (len(digits) - 10)}{digits[-4:]}"


def _card_in_run(run: str) -> str | None:
    """How to show the card number a digit run holds, or None when it holds none.

    Stricter than :func:`find_card_numbers` in one way: a card number never starts with
    ``0`` (ISO/IEC 7812 reserves it, and :class:`~cardvault.cards.CardNumber` refuses
    it), so runs of zeros, such as the audit log's genesis hash, are not card numbers.

    A card number in a run of at most 19 digits (the whole run, or a run of its groups)
    shows as ``424242******4242``. A longer run holds a card number when any
    card-length window of it does, but which window is the card cannot be known, and
    masking the wrong one could show its middle digits: it shows as ``36-digit run``,
    with no digit at all.
    """
    found = card_number_in(run)
    if found is None or found[0] == "0":
        return None
    digits = digits_of(run)
    return _mask_digits(found) if len(digits) <= PAN_MAX_DIGITS else f"{len(digits)}-digit run"


class _Scanner:
    """Searches decoded views of a buffer for card numbers, canaries and CVCs."""

    def __init__(self, canaries: Iterable[str], cvcs: Iterable[str]) -> None:
        self.canaries: list[bytes] = []
        for canary in canaries:
            if not (canary.isascii() and canary.isprintable()) or len(canary) < MIN_CANARY:
                raise ValueError(
                    f"a canary must be at least {MIN_CANARY} printable ASCII characters"
                )
            self.canaries.append(canary.encode("ascii"))
        self.cvcs = frozenset(c.encode("ascii") for c in cvcs if c.isascii())
        if any(not (c.isdigit() and 3 <= len(c) <= 4) for c in self.cvcs):
            raise ValueError("a CVC is 3 or 4 ASCII digits")
        longest = max((len(c) for c in self.canaries), default=0)
        # The longest encoded form of anything sought (UTF-16 and hex double a length).
        self.overlap = max(_MIN_OVERLAP, 4 * longest + 4 * _MARGIN)

    def search(self, view: bytes, encoding: Encoding, to_file: Callable[[int], int]) -> list[_Hit]:
        """Hits in ``view``; ``to_file`` maps a view offset to a file offset."""
        hits: list[_Hit] = []
        if len(view) >= PAN_MIN_DIGITS:
            text = view.decode("latin-1")
            for m in find_card_numbers(text, line_breaks=False):
                shown = _card_in_run(m.group())
                if shown is None or _inside_hex_token(text, m.start(), m.end()):
                    continue
                hits.append(
                    _Hit(
                        to_file(m.start()),
                        to_file(m.end()),
                        FindingKind.CARD_NUMBER,
                        encoding,
                        shown,
                    )
                )
        for index, canary in enumerate(self.canaries, start=1):
            at = view.find(canary)
            while at != -1:
                hits.append(
                    _Hit(
                        to_file(at),
                        to_file(at + len(canary)),
                        FindingKind.CANARY,
                        encoding,
                        f"canary #{index}",
                    )
                )
                at = view.find(canary, at + 1)
        if self.cvcs:
            for shaped in _CVC_SHAPED.finditer(view):
                if shaped.group(1) in self.cvcs:
                    hits.append(
                        _Hit(
                            to_file(shaped.start()),
                            to_file(shaped.end()),
                            FindingKind.CVC,
                            encoding,
                            "***",
                        )
                    )
        return hits

    def scan_buffer(self, buf: bytes, base: int) -> list[_Hit]:
        """Every hit in ``buf``, which starts at file offset ``base``."""
        hits = self.search(buf, Encoding.ASCII, partial(_linear, base, 1))
        hits += self._utf16(buf, base)
        for hex_match in _HEX_RUN.finditer(buf):
            run, start = hex_match.group(), base + hex_match.start()
            for align in (0, 1):
                usable = (len(run) - align) // 2 * 2
                raw = bytes.fromhex(run[align : align + usable].decode("ascii"))
                hits += self.search(raw, Encoding.HEX, partial(_linear, start + align, 2))
        for b64_match in _B64_RUN.finditer(buf):
            run = b64_match.group().rstrip(b"=").translate(_B64URL_TO_STD)
            start = base + b64_match.start()
            for align in range(4):
                decoded = _b64decode_loose(run[align:])
                if decoded is not None and len(decoded) >= 3:
                    hits += self.search(decoded, Encoding.BASE64, partial(_b64pos, start + align))
        return hits

    def _utf16(self, buf: bytes, base: int) -> list[_Hit]:
        found: list[tuple[_Hit, int]] = []  # (hit, offset of its first code unit)
        for pattern, encoding, low in (
            (_UTF16_LE, Encoding.UTF16_LE, 0),
            (_UTF16_BE, Encoding.UTF16_BE, 1),
        ):
            for m in pattern.finditer(buf):
                unit0 = base + m.start()
                chars = m.group()[low::2]
                for hit in self.search(chars, encoding, partial(_linear, unit0, 2)):
                    found.append((hit, hit.start))
        # ASCII in UTF-16 reads as ASCII in the other byte order one byte off. Where a
        # little-endian and a big-endian hit overlap, keep the longer, then the one whose
        # code units start at an even offset (strings are aligned in most files).
        kept: list[_Hit] = []
        for hit, unit in found:
            rivals = [
                (h, u)
                for h, u in found
                if h.encoding != hit.encoding
                and h.kind == hit.kind
                and h.start < hit.end
                and hit.start < h.end
            ]
            mine = (hit.end - hit.start, unit % 2 == 0)
            if all(mine > (h.end - h.start, u % 2 == 0) for h, u in rivals):
                kept.append(hit)
        return kept


def _linear(origin: int, scale: int, index: int) -> int:
    return origin + scale * index


def _b64pos(origin: int, index: int) -> int:
    # Three decoded bytes come from four characters.
    return origin + index // 3 * 4


def _b64decode_loose(run: bytes) -> bytes | None:
    """Decode ``run`` (standard alphabet, no padding) as far as it goes."""
    usable = len(run) - (1 if len(run) % 4 == 1 else 0)
    chunk = run[:usable]
    try:
        return base64.b64decode(chunk + b"=" * (-len(chunk) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _resolve(hits: Iterable[_Hit], path: Path) -> list[Finding]:
    """One finding per value: drop hits that overlap an earlier one of the same kind and
    encoding (the same value seen at another decoding alignment or in two chunks)."""
    hits = list(hits)
    # The hex form of a digit string is itself all digits ("4242" is "34323432"): a card
    # number found in hex explains the digit run around it, which is not a second one.
    in_hex = [
        (h.start, h.end)
        for h in hits
        if h.kind is FindingKind.CARD_NUMBER and h.encoding is Encoding.HEX
    ]
    findings: list[Finding] = []
    last_end: dict[tuple[FindingKind, Encoding, str], int] = {}
    for hit in sorted(hits, key=lambda h: (h.start, -(h.end - h.start))):
        if (
            hit.kind is FindingKind.CARD_NUMBER
            and hit.encoding is Encoding.ASCII
            and any(s < hit.end and hit.start < e for s, e in in_hex)
        ):
            continue
        # Canaries are told apart by number, so two different canaries never merge.
        group = (hit.kind, hit.encoding, hit.masked if hit.kind is FindingKind.CANARY else "")
        if hit.start < last_end.get(group, -1):
            continue
        last_end[group] = hit.end
        findings.append(Finding(path, hit.start, hit.kind, hit.encoding, hit.masked))
    return findings


def scan_bytes(
    data: bytes, *, canaries: Iterable[str] = (), cvcs: Iterable[str] = (), name: str = "<bytes>"
) -> list[Finding]:
    """Scan an in-memory buffer (as :func:`scan_paths` scans a file)."""
    scanner = _Scanner(canaries, cvcs)
    return _resolve(scanner.scan_buffer(data, 0), Path(name))


def _scan_file(
    path: Path, scanner: _Scanner, chunk_size: int, on_bytes: Callable[[int], None] | None = None
) -> list[Finding]:
    overlap = scanner.overlap
    chunk_size = max(chunk_size, 2 * overlap)
    hits: list[_Hit] = []
    with open(path, "rb") as fh:
        base = 0  # file offset of buf[0]
        buf = fh.read(chunk_size)
        if on_bytes is not None:
            on_bytes(len(buf))
        while True:
            more = fh.read(chunk_size - overlap) if len(buf) >= chunk_size else b""
            if on_bytes is not None and more:
                on_bytes(len(more))
            at_end = not more
            end = base + len(buf)
            # The overlap is wide enough that everything near one cut lies well inside
            # the other chunk; very long hits (a huge digit run) fit nowhere whole and
            # are kept wherever they are seen.
            for hit in scanner.scan_buffer(buf, base):
                long_hit = hit.end - hit.start > overlap - 2 * _MARGIN
                if not long_hit and (
                    (base > 0 and hit.start < base + _MARGIN)
                    or (not at_end and hit.end > end - _MARGIN)
                ):
                    continue
                hits.append(hit)
            if at_end:
                break
            keep = buf[-overlap:]
            base = end - len(keep)
            buf = keep + more
    return _resolve(hits, path)


def _ignored(path: Path, ignore: list[str]) -> bool:
    text = str(path)
    return any(fnmatch.fnmatch(text, g) or fnmatch.fnmatch(path.name, g) for g in ignore)


def _files(paths: Iterable[Path], ignore: list[str]) -> Iterator[tuple[Path, OSError | None]]:
    """(file, None) for each regular file to scan; (path, error) for what cannot be read."""
    for top in paths:
        top = Path(top)
        if _ignored(top, ignore):
            continue
        mode = top.stat().st_mode  # FileNotFoundError for a path that is not there
        if stat.S_ISREG(mode):
            yield top, None
            continue
        if not stat.S_ISDIR(mode):
            continue
        errors: list[OSError] = []
        for root, dirs, names in os.walk(top, onerror=errors.append, followlinks=False):
            here = Path(root)
            dirs[:] = sorted(d for d in dirs if not _ignored(here / d, ignore))
            for name in sorted(names):
                path = here / name
                if _ignored(path, ignore):
                    continue
                try:
                    if stat.S_ISREG(path.lstat().st_mode):  # no links, devices, FIFOs
                        yield path, None
                except OSError as exc:
                    yield path, exc
            while errors:  # a directory that could not be listed
                error = errors.pop(0)
                yield Path(error.filename or root), error


def scan_paths(
    paths: Iterable[Path | str],
    *,
    canaries: Iterable[str] = (),
    cvcs: Iterable[str] = (),
    ignore: Iterable[str] = (),
    chunk_size: int = CHUNK_SIZE,
    on_bytes: Callable[[int], None] | None = None,
) -> list[Finding]:
    """Scan files (directories recursively) and return every finding, in path order.

    ``canaries``: strings to find (at least 8 printable ASCII characters each).
    ``cvcs``: CVC values to find in a shaped context. ``ignore``: glob patterns matched
    against each path and each file name. ``on_bytes`` is called with the size of each
    piece of a file as it is read (a progress bar's feed; :func:`scan_size` is the
    total). Raises ``FileNotFoundError`` for a path that does not exist and
    ``ValueError`` for a bad canary or CVC.
    """
    scanner = _Scanner(canaries, cvcs)
    ignore_list = list(ignore)
    findings: list[Finding] = []
    for path, error in _files((Path(p) for p in paths), ignore_list):
        if error is None:
            try:
                findings += _scan_file(path, scanner, chunk_size, on_bytes)
                continue
            except FileNotFoundError:
                # Listed, then gone before it could be opened (a live service's SQLite
                # journal, a log rotated away): nothing of it is at rest any more.
                continue
            except OSError as exc:
                error = exc
        reason = error.strerror or type(error).__name__
        findings.append(
            Finding(path, 0, FindingKind.UNREADABLE, Encoding.NONE, f"not read: {reason}")
        )
    return findings


def scan_size(paths: Iterable[Path | str], *, ignore: Iterable[str] = ()) -> int:
    """The bytes :func:`scan_paths` would read for the same arguments (files as they are
    now). Raises ``FileNotFoundError`` as it does."""
    total = 0
    for path, error in _files((Path(p) for p in paths), list(ignore)):
        if error is None:
            with contextlib.suppress(OSError):
                total += path.lstat().st_size
    return total
