"""contract.settings: SPEC defaults, one clear error per bad `LV_*` value."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from contract.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No `LV_*` variable of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("LV_"):
            monkeypatch.delenv(name)


# --- defaults --------------------------------------------------------------------------------


def test_defaults_match_the_spec() -> None:
    settings = load_settings()

    assert settings.database_url is None
    assert settings.broker_url is None
    assert settings.home == Path("~/.listing-vision").expanduser()
    assert settings.models_file is None
    assert settings.file_roots == ()
    assert settings.allowed_private_networks == ()
    assert settings.max_image_bytes == 20_000_000
    assert settings.fetch_timeout == 15.0
    assert settings.max_attempts == 3
    assert settings.visibility_timeout > settings.task_time_limit > 0
    assert settings.batch_max_size >= 1
    assert settings.batch_max_wait_ms >= 0
    assert settings.flower_user is None
    assert settings.flower_password is None


def test_an_unresolved_server_url_is_refused_by_name() -> None:
    settings = load_settings()

    with pytest.raises(SettingsError, match="LV_DATABASE_URL"):
        settings.require_database_url()
    with pytest.raises(SettingsError, match="LV_BROKER_URL"):
        settings.require_broker_url()


def test_configured_server_urls_are_used_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LV_DATABASE_URL", "postgresql://db.example/lv")
    monkeypatch.setenv("LV_BROKER_URL", "redis://broker.example:6379/0")

    settings = load_settings()

    assert settings.require_database_url() == "postgresql://db.example/lv"
    assert settings.require_broker_url() == "redis://broker.example:6379/0"


def test_resolved_servers_replace_only_the_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LV_DATABASE_URL", "postgresql://db.example/lv")
    monkeypatch.setenv("LV_MAX_ATTEMPTS", "7")

    resolved = load_settings().with_servers("postgresql://db.example/lv", "redis://127.0.0.1:1/0")

    assert resolved.require_broker_url() == "redis://127.0.0.1:1/0"
    assert resolved.require_database_url() == "postgresql://db.example/lv"
    assert resolved.max_attempts == 7


@pytest.mark.parametrize("variable", ["LV_DATABASE_URL", "LV_BROKER_URL"])
def test_an_empty_server_url_is_unset_or_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "")

    try:
        settings = load_settings()
    except SettingsError as error:
        assert variable in str(error)
    else:
        assert getattr(settings, variable.removeprefix("LV_").lower()) is None


def test_values_are_read_from_lv_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LV_MAX_IMAGE_BYTES", "1234")
    monkeypatch.setenv("LV_FETCH_TIMEOUT", "2.5")
    monkeypatch.setenv("LV_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("LV_MODEL", "dinov2-base")
    monkeypatch.setenv("LV_FLOWER_USER", "ops")
    monkeypatch.setenv("LV_FLOWER_PASSWORD", "s3cret")

    settings = load_settings()

    assert settings.max_image_bytes == 1234
    assert settings.fetch_timeout == 2.5
    assert settings.max_attempts == 7
    assert settings.model == "dinov2-base"
    assert settings.flower_password is not None
    assert settings.flower_password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_home_and_models_file_expand_the_user_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LV_HOME", "~/lv-home")
    monkeypatch.setenv("LV_MODELS_FILE", "~/models.toml")

    settings = load_settings()

    assert settings.home == Path.home() / "lv-home"
    assert settings.models_file == Path.home() / "models.toml"


def test_keyword_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LV_MAX_ATTEMPTS", "7")

    assert load_settings(max_attempts=2).max_attempts == 2


def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LV_LOG_LEVEL", "debug")

    assert load_settings().log_level == "DEBUG"


# --- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LV_MAX_IMAGE_BYTES", "twenty megabytes"),
        ("LV_MAX_IMAGE_BYTES", "0"),
        ("LV_MAX_IMAGE_BYTES", "-5"),
        ("LV_MAX_IMAGE_PIXELS", "0"),
        ("LV_FETCH_TIMEOUT", "soon"),
        ("LV_FETCH_TIMEOUT", "0"),
        ("LV_MAX_ATTEMPTS", "0"),
        ("LV_MAX_ATTEMPTS", "3.5"),
        ("LV_RETRY_BACKOFF", "-1"),
        ("LV_TASK_TIME_LIMIT", "0"),
        ("LV_TASK_TIME_LIMIT", "five minutes"),
        ("LV_VISIBILITY_TIMEOUT", "-1"),
        ("LV_BATCH_MAX_SIZE", "0"),
        ("LV_BATCH_MAX_WAIT_MS", "-1"),
        ("LV_WORKER_CONCURRENCY", "0"),
        ("LV_FLOWER_PORT", "70000"),
        ("LV_EXPORTER_PORT", "0"),
        ("LV_LOG_LEVEL", "LOUD"),
        ("LV_DATABASE_URL", "notaurl"),
        ("LV_DATABASE_URL", "mysql://db.example/catalogue"),
        ("LV_DATABASE_URL", "postgresql://db.example:99999/catalogue"),
        ("LV_BROKER_URL", "amqp://broker.example//"),
        ("LV_BROKER_URL", "localhost:6379"),
    ],
)
def test_a_bad_value_raises_settings_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(SettingsError) as caught:
        load_settings()

    message = str(caught.value)
    assert variable in message
    assert repr(value) in message  # the operator sees what they wrote


def test_settings_error_is_a_value_error_without_the_pydantic_chain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LV_MAX_ATTEMPTS", "zero")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert isinstance(caught.value, ValueError)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ is True


def test_two_bad_values_are_both_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LV_MAX_ATTEMPTS", "0")
    monkeypatch.setenv("LV_FETCH_TIMEOUT", "never")

    with pytest.raises(SettingsError, match="LV_MAX_ATTEMPTS") as caught:
        load_settings()

    assert "LV_FETCH_TIMEOUT" in str(caught.value)


# --- visibility timeout vs time limit --------------------------------------------------------


@pytest.mark.parametrize("visibility", ["600", "300"], ids=["equal", "shorter"])
def test_visibility_timeout_not_above_the_task_time_limit_is_refused(
    monkeypatch: pytest.MonkeyPatch, visibility: str
) -> None:
    monkeypatch.setenv("LV_TASK_TIME_LIMIT", "600")
    monkeypatch.setenv("LV_VISIBILITY_TIMEOUT", visibility)

    with pytest.raises(SettingsError) as caught:
        load_settings()

    message = str(caught.value)
    assert "LV_VISIBILITY_TIMEOUT" in message
    assert "LV_TASK_TIME_LIMIT" in message
    assert visibility in message


def test_raising_the_time_limit_alone_past_the_default_visibility_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    default_visibility = Settings.model_fields["visibility_timeout"].default
    monkeypatch.setenv("LV_TASK_TIME_LIMIT", str(default_visibility + 1))

    with pytest.raises(SettingsError, match="LV_VISIBILITY_TIMEOUT"):
        load_settings()


def test_visibility_timeout_just_above_the_time_limit_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LV_TASK_TIME_LIMIT", "600")
    monkeypatch.setenv("LV_VISIBILITY_TIMEOUT", "601")

    settings = load_settings()

    assert (settings.task_time_limit, settings.visibility_timeout) == (600, 601)


# --- LV_FILE_ROOTS ---------------------------------------------------------------------------


def test_file_roots_are_colon_separated_and_resolved(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("LV_FILE_ROOTS", f"{tmp_path / 'a'}:{tmp_path / 'b' / '..' / 'b'}")

    roots = load_settings().file_roots

    assert roots == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())


def test_file_roots_skip_empty_parts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LV_FILE_ROOTS", f":{tmp_path}:: :")

    assert load_settings().file_roots == (tmp_path.resolve(),)


def test_file_roots_expand_the_user_and_resolve_relative_paths(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LV_FILE_ROOTS", "~/pictures:relative/dir")

    roots = load_settings().file_roots

    assert roots == ((Path.home() / "pictures").resolve(), (tmp_path / "relative/dir").resolve())
    assert all(root.is_absolute() for root in roots)


def test_empty_file_roots_refuse_every_file_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LV_FILE_ROOTS", "")

    assert load_settings().file_roots == ()


# --- LV_ALLOWED_PRIVATE_NETWORKS -------------------------------------------------------------


def test_allowed_private_networks_are_comma_separated_cidrs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LV_ALLOWED_PRIVATE_NETWORKS", " 10.0.0.0/8 , ,fd00::/8,127.0.0.1")

    networks = load_settings().allowed_private_networks

    assert networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("127.0.0.1/32"),
    )


def test_allowed_network_with_host_bits_is_widened_to_its_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LV_ALLOWED_PRIVATE_NETWORKS", "192.168.1.5/24")

    assert load_settings().allowed_private_networks == (ipaddress.ip_network("192.168.1.0/24"),)


@pytest.mark.parametrize("value", ["10.0.0.0/33", "not-a-network", "10.0.0.0/8,300.1.1.1"])
def test_a_bad_cidr_raises_settings_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("LV_ALLOWED_PRIVATE_NETWORKS", value)

    with pytest.raises(SettingsError, match="LV_ALLOWED_PRIVATE_NETWORKS"):
        load_settings()


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"LV_FLOWER_USER": "ops"}, "LV_FLOWER_PASSWORD is unset"),
        ({"LV_FLOWER_PASSWORD": "s3cret"}, "LV_FLOWER_USER is unset"),
        ({"LV_FLOWER_USER": "ops", "LV_FLOWER_PASSWORD": "a,b"}, "must not contain ','"),
        ({"LV_FLOWER_USER": "o:ps", "LV_FLOWER_PASSWORD": "s3cret"}, "must not contain ':'"),
    ],
)
def test_flower_credentials_are_complete_or_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], complaint: str
) -> None:
    """Half a pair would start Flower unauthenticated under a banner that says "basic auth";
    a comma would split the password into a second, shorter credential."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(SettingsError, match=complaint) as raised:
        load_settings()
    assert "s3cret" not in str(raised.value) and "a,b" not in str(raised.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LV_DATABASE_URL", "postgresql://lv@db.example:5432/catalogue"),
        ("LV_DATABASE_URL", "postgres://lv@db.example/catalogue"),
        ("LV_DATABASE_URL", "postgresql+psycopg://lv@/catalogue?host=/run/postgresql"),
        ("LV_BROKER_URL", "redis://broker.example:6379/0"),
        ("LV_BROKER_URL", "rediss://:secret@broker.example:6380/0"),
        ("LV_BROKER_URL", "redis+socket:///run/valkey.sock"),
    ],
)
def test_the_urls_the_engine_and_broker_take_are_accepted(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    settings = load_settings()
    assert value in (settings.database_url, settings.broker_url)


def test_a_refused_url_is_shown_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LV_DATABASE_URL", "mysql://bob:hunter2@db.example/catalogue")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    message = str(caught.value)
    assert "LV_DATABASE_URL" in message and "mysql://bob:***@db.example" in message
    assert "hunter2" not in message
