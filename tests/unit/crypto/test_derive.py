"""Per-account derived keys and card fingerprints."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from cardvault.crypto import FINGERPRINT_BYTES, Key, derive_account_key, fingerprint

from ._support import KAT_KEK

PAN = b"4242424242424242"

# Known answers for KEK = bytes(range(0x20, 0x40)), account "acct_1", purpose
# "fingerprint", card 4242424242424242. Made by this module; the test below recomputes
# them with the standard library's hmac (HKDF written out from RFC 5869), which shares
# no code with the implementation under test.
ACCOUNT_KEY_KAT = "645c675240aeb9eb27fb9f60016f440c296fd78a911526f0204cc62919fc2446"
FINGERPRINT_KAT = "9ZK7OF47Mk_NbVVN"


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _stdlib_hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()  # no salt = 32 zero bytes
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def _kek(version: int = 1) -> Key:
    return Key("fingerprint", version, KAT_KEK)


def test_derive_account_key_matches_known_answer() -> None:
    key = derive_account_key(_kek(), "acct_1")
    assert key.expose_secret().hex() == ACCOUNT_KEY_KAT
    assert (key.name, key.version) == ("fingerprint:acct_1", 1)


def test_fingerprint_matches_known_answer() -> None:
    assert fingerprint(derive_account_key(_kek(), "acct_1"), PAN) == FINGERPRINT_KAT


def test_known_answers_match_an_independent_stdlib_computation() -> None:
    info = _lp(b"cardvault account key v1") + _lp(b"fingerprint") + _lp(b"acct_1")
    account_key = _stdlib_hkdf(KAT_KEK, info, 32)
    assert account_key.hex() == ACCOUNT_KEY_KAT
    mac = hmac.new(account_key, PAN, hashlib.sha256).digest()[:12]
    assert base64.urlsafe_b64encode(mac).decode() == FINGERPRINT_KAT


def test_fingerprint_is_16_url_safe_characters() -> None:
    key = derive_account_key(_kek(), "acct_1")
    for n in range(200):
        value = fingerprint(key, str(4000000000000000 + n).encode())
        assert re.fullmatch(r"[A-Za-z0-9_-]{16}", value)
    assert FINGERPRINT_BYTES == 12


def test_fingerprint_is_stable_within_an_account() -> None:
    one = derive_account_key(_kek(), "acct_1")
    again = derive_account_key(_kek(), "acct_1")
    assert fingerprint(one, PAN) == fingerprint(again, PAN)
    assert fingerprint(one, PAN) != fingerprint(one, b"5555555555554444")


def test_fingerprint_differs_across_accounts_and_purposes() -> None:
    values = {
        fingerprint(derive_account_key(_kek(), "acct_1"), PAN),
        fingerprint(derive_account_key(_kek(), "acct_2"), PAN),
        fingerprint(derive_account_key(_kek(), "acct_1", purpose="dedupe"), PAN),
        fingerprint(derive_account_key(Key("fingerprint", 1, bytes(32)), "acct_1"), PAN),
    }
    assert len(values) == 4


def test_derive_account_key_keeps_account_and_purpose_boundaries_apart() -> None:
    # Length prefixes in "info": shifting characters between fields changes the key.
    a = derive_account_key(_kek(), "b:acct", purpose="a")
    b = derive_account_key(_kek(), "acct", purpose="a:b")
    assert a.expose_secret() != b.expose_secret()


def test_derive_account_key_carries_the_kek_version() -> None:
    assert derive_account_key(_kek(version=5), "acct_1").version == 5
