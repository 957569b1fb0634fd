from pathlib import Path

import pytest

from services.common.settings import from_environ
from services.gateway.settings import GatewaySettings


def test_settings_from_environ_with_conversion_and_lists() -> None:
    settings = from_environ(
        GatewaySettings,
        {"SDSWARM_PORT": "9000", "SDSWARM_API_KEYS": "a:1, b:2", "OTHER": "x"},
    )
    assert 9000 == settings.port
    assert ["a:1", "b:2"] == settings.api_keys


def test_overrides_win() -> None:
    settings = from_environ(GatewaySettings, {"SDSWARM_PORT": "9000"}, port=1234, host=None)
    assert 1234 == settings.port
    assert "127.0.0.1" == settings.host


def test_invalid_setting_names_the_variable() -> None:
    with pytest.raises(SystemExit, match="port"):
        from_environ(GatewaySettings, {"SDSWARM_PORT": "many"})


def test_list_settings_take_commas_or_a_json_array() -> None:
    from services.common.settings import StoreSettings

    for raw in ("1,5.5", "[1, 5.5]"):
        settings = from_environ(StoreSettings, {"SDSWARM_WEBHOOK_BACKOFF_S": raw})
        assert [1.0, 5.5] == settings.webhook_backoff_s


def test_a_setting_can_come_from_a_file_as_docker_secrets_are_mounted(tmp_path: Path) -> None:
    from services.common.settings import StoreSettings

    secret = tmp_path / "s3_secret_key"
    secret.write_text("s3cr3t:with colon\n")
    settings = from_environ(
        StoreSettings,
        {"SDSWARM_S3_SECRET_KEY_FILE": str(secret), "SDSWARM_S3_ACCESS_KEY": "plain"},
    )
    assert "s3cr3t:with colon" == settings.s3_secret_key
    assert "plain" == settings.s3_access_key


def test_a_secret_file_that_cannot_be_read_or_a_double_setting_is_refused(
    tmp_path: Path,
) -> None:
    from services.common.settings import StoreSettings

    missing = str(tmp_path / "nope")
    with pytest.raises(SystemExit, match=r"SDSWARM_S3_SECRET_KEY_FILE=.*cannot be read"):
        from_environ(StoreSettings, {"SDSWARM_S3_SECRET_KEY_FILE": missing})
    (tmp_path / "key").write_text("x")
    with pytest.raises(SystemExit, match="both SDSWARM_S3_SECRET_KEY and"):
        from_environ(
            StoreSettings,
            {"SDSWARM_S3_SECRET_KEY_FILE": str(tmp_path / "key"), "SDSWARM_S3_SECRET_KEY": "y"},
        )
