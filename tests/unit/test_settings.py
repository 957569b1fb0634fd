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
