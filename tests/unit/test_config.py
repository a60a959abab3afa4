from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from cardvault.config import Secret, ServerLimits, load_settings, required
from cardvault.errors import ConfigurationError
from cardvault.vault.settings import VaultSettings


@dataclasses.dataclass
class Db:
    password: Secret = required()


@dataclasses.dataclass
class Settings:
    db: Db = dataclasses.field(default_factory=Db)


MINIMAL = '[server]\ncert_file = "/c.pem"\nkey_file = "/c.key"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vault.toml"
    path.write_text(text)
    return path


def test_production_is_the_default_profile(tmp_path: Path) -> None:
    settings = load_settings(VaultSettings, write(tmp_path, MINIMAL), env={})
    assert settings.profile == "production"
    assert settings.server.tls_profile == "intermediate"
    assert settings.server.cert_file == Path("/c.pem")


def test_missing_required_value_names_the_setting_and_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(VaultSettings, write(tmp_path, '[server]\ncert_file = "/c.pem"\n'), env={})
    assert "server.key_file" in info.value.message
    assert "CARDVAULT_SERVER_KEY_FILE" in info.value.message


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    settings = load_settings(
        VaultSettings,
        write(tmp_path, MINIMAL + "port = 9000\n"),
        env={"CARDVAULT_SERVER_PORT": "9443", "CARDVAULT_PROFILE": "development"},
    )
    assert settings.server.port == 9443
    assert settings.profile == "development"


def test_environment_alone_is_enough() -> None:
    settings = load_settings(
        VaultSettings,
        None,
        env={"CARDVAULT_SERVER_CERT_FILE": "/a.pem", "CARDVAULT_SERVER_KEY_FILE": "/a.key"},
    )
    assert settings.server.key_file == Path("/a.key")


def test_unknown_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"unknown setting server\.prot"):
        load_settings(VaultSettings, write(tmp_path, MINIMAL + "prot = 1\n"), env={})


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ('profile = "staging"\n' + MINIMAL, "profile"),
        (MINIMAL + 'tls_profile = "old"\n', "server.tls_profile"),
        (MINIMAL + 'port = "eighty"\n', "server.port"),
    ],
)
def test_invalid_values_name_the_setting(tmp_path: Path, text: str, setting: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(VaultSettings, write(tmp_path, text), env={})
    assert setting in info.value.message


def test_missing_file_and_bad_toml_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not found"):
        load_settings(VaultSettings, tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_settings(VaultSettings, write(tmp_path, "[server\n"), env={})


def test_secret_never_prints_itself(caplog: pytest.LogCaptureFixture) -> None:
    secret = Secret("sk_live_supersecretvalue")
    old_style = "%s" % (secret,)  # noqa: UP031
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", old_style):
        assert "supersecret" not in text
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("value %s", secret)
    assert "supersecret" not in caplog.text
    assert secret.reveal() == "sk_live_supersecretvalue"
    assert secret == Secret("sk_live_supersecretvalue")
    assert secret != Secret("other")


def test_secret_is_not_picklable() -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(Secret("x"))


def test_error_messages_never_hold_setting_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(
            VaultSettings,
            write(
                tmp_path, '[server]\nport = "sk_live_leak"\n' + 'cert_file="/a"\nkey_file="/b"\n'
            ),
            env={},
        )
    assert "sk_live_leak" not in str(info.value)


def test_secret_can_come_from_a_file_named_in_toml_or_environment(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text("hunter2-from-file\n")
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[db]\npassword_file = "{secret_file}"\n')
    assert load_settings(Settings, cfg, env={}).db.password.reveal() == "hunter2-from-file"
    other = tmp_path / "pw2"
    other.write_text("from-env-file")
    env = {"CARDVAULT_DB_PASSWORD_FILE": str(other)}
    assert load_settings(Settings, None, env=env).db.password.reveal() == "from-env-file"
    with pytest.raises(ConfigurationError, match=r"db\.password"):
        load_settings(Settings, None, env={})


# --- [server.limits] ------------------------------------------------------------------


def test_server_limits_have_documented_defaults(tmp_path: Path) -> None:
    limits = load_settings(VaultSettings, write(tmp_path, MINIMAL), env={}).server.limits
    assert limits == ServerLimits()
    assert (limits.max_head_bytes, limits.max_headers, limits.max_url_bytes) == (16384, 100, 8192)
    assert limits.max_body_bytes == 1024 * 1024
    assert (limits.first_byte_timeout, limits.head_timeout, limits.request_timeout) == (10, 10, 30)
    assert (limits.keep_alive_timeout, limits.tls_handshake_timeout) == (5, 10)
    assert limits.close_timeout == 3
    assert (limits.max_connections, limits.max_connections_per_client) == (1024, 128)
    # Every field is in the documentation's table.
    doc = (Path(__file__).resolve().parents[2] / "docs" / "transport.md").read_text()
    for field in dataclasses.fields(ServerLimits):
        assert f"`{field.name}`" in doc, field.name


def test_server_limits_come_from_toml_and_the_environment(tmp_path: Path) -> None:
    text = (
        MINIMAL + "[server.limits]\nmax_headers = 50\nhead_timeout = 2.5\nfirst_byte_timeout = 3\n"
    )
    settings = load_settings(
        VaultSettings,
        write(tmp_path, text),
        env={
            "CARDVAULT_SERVER_LIMITS_MAX_CONNECTIONS_PER_CLIENT": "0",
            "CARDVAULT_SERVER_LIMITS_HEAD_TIMEOUT": "4",
        },
    )
    limits = settings.server.limits
    assert limits.max_headers == 50
    assert limits.head_timeout == 4.0  # the environment wins over the file
    assert limits.first_byte_timeout == 3.0
    assert isinstance(limits.first_byte_timeout, float)
    assert limits.max_connections_per_client == 0  # 0: no per-client cap
    assert limits.max_connections == 1024


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("max_head_bytes = 0", "server.limits.max_head_bytes"),
        ("max_connections = -1", "server.limits.max_connections"),
        ("max_connections_per_client = -1", "server.limits.max_connections_per_client"),
        ("head_timeout = 0", "server.limits.head_timeout"),
        ("keep_alive_timeout = inf", "server.limits.keep_alive_timeout"),
        ('max_headers = "many"', "server.limits.max_headers"),
        ("max_head_size = 1", "server.limits.max_head_size"),
    ],
)
def test_invalid_server_limits_name_the_setting(tmp_path: Path, text: str, setting: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(
            VaultSettings, write(tmp_path, MINIMAL + f"[server.limits]\n{text}\n"), env={}
        )
    assert setting in info.value.message


def test_the_key_service_reads_its_limits_too(tmp_path: Path) -> None:
    from cardvault.keyservice.settings import KeyServiceSettings

    path = tmp_path / "keyd.toml"
    path.write_text(MINIMAL + "[server.limits]\nmax_connections = 64\n")
    settings = load_settings(
        KeyServiceSettings, path, env={"CARDVAULT_STORE_URL": "sqlite:///keys.db"}
    )
    assert settings.server.limits.max_connections == 64
