"""The export allowlist file (cardvault.vault.exports.recipients): each key checked at
load against its configured fingerprint and for RSA of at least 4096 bits."""

from __future__ import annotations

from pathlib import Path

import pytest

from cardvault import pgp
from cardvault.errors import ConfigurationError
from cardvault.vault.exports.recipients import load_recipients


@pytest.fixture(scope="module")
def keys() -> tuple[pgp.NewKey, pgp.NewKey]:
    return pgp.new_key("big", key_length=4096), pgp.new_key("small", key_length=2048)


def write(tmp_path: Path, keys: tuple[pgp.NewKey, pgp.NewKey], body: str) -> Path:
    (tmp_path / "big.asc").write_text(keys[0].public_key)
    (tmp_path / "small.asc").write_text(keys[1].public_key)
    path = tmp_path / "recipients.toml"
    path.write_text(body)
    return path


def entry(name: str, fingerprint: str, key_file: str) -> str:
    return (
        f'[[recipient]]\nname = "{name}"\nfingerprint = "{fingerprint}"\n'
        f'public_key_file = "{key_file}"\n'
    )


def test_load_recipients_accepts_a_matching_rsa_4096_key(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    big = keys[0]
    spaced = " ".join(big.fingerprint[i : i + 4] for i in range(0, 40, 4)).lower()
    got = load_recipients(write(tmp_path, keys, entry("acme", spaced, "big.asc"))).get("acme")
    assert got is not None and got.refused is None
    assert got.fingerprint == big.fingerprint
    assert got.public_key == big.public_key


def test_load_recipients_refuses_a_key_file_with_another_fingerprint(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    body = entry("acme", keys[1].fingerprint, "big.asc")
    got = load_recipients(write(tmp_path, keys, body)).get("acme")
    assert got is not None and got.refused == "fingerprint_mismatch" and got.public_key == ""


def test_load_recipients_refuses_an_rsa_key_under_4096_bits(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    body = entry("small", keys[1].fingerprint, "small.asc")
    got = load_recipients(write(tmp_path, keys, body)).get("small")
    assert got is not None and got.refused == "key_refused"
    assert "4096" in got.detail


def test_load_recipients_refuses_a_file_of_two_keys_and_a_missing_file(
    tmp_path: Path, keys
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "two.asc").write_text(keys[0].public_key + keys[1].public_key)
    body = entry("two", keys[0].fingerprint, "two.asc") + entry("gone", keys[0].fingerprint, "x")
    loaded = load_recipients(write(tmp_path, keys, body))
    assert loaded.by_name["two"].refused == "key_refused"
    assert loaded.by_name["gone"].refused == "key_unreadable"


@pytest.mark.parametrize(
    "body",
    [
        'name = "x"\n',
        '[[recipient]]\nname = "acme"\n',
        '[[recipient]]\nname = "Bad Name"\nfingerprint = "00"\npublic_key_file = "big.asc"\n',
        "[[recipient]\n",
    ],
)
def test_load_recipients_refuses_a_malformed_file(tmp_path: Path, keys, body: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError):
        load_recipients(write(tmp_path, keys, body))


def test_load_recipients_refuses_a_name_given_twice(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    fp = keys[0].fingerprint
    body = entry("acme", fp, "big.asc") + entry("acme", fp, "big.asc")
    with pytest.raises(ConfigurationError, match="twice"):
        load_recipients(write(tmp_path, keys, body))
