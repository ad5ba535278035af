"""gateway.toml: the template `init` writes, environment overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import GatewaySettings, load_settings, render_template
from gateway.errors import ConfigError


def write_config(tmp_path: Path, *replace: tuple[str, str]) -> Path:
    path = tmp_path / "gateway.toml"
    body = render_template(issuer="https://gw.example:8443", bind="127.0.0.1")
    for old, new in replace:
        assert old in body
        body = body.replace(old, new)
    path.write_text(body, encoding="utf-8")
    return path


def test_the_template_spells_out_every_default(tmp_path: Path) -> None:
    # Each setting a user may change is in the commented file, with its default value.
    settings = load_settings(write_config(tmp_path))
    defaults = GatewaySettings(issuer="https://gw.example:8443", bind="127.0.0.1")
    assert settings == defaults
    text = render_template(issuer="https://gw.example:8443", bind="127.0.0.1")
    for name in ("mqtt_offline_queue", "max_connections", "http_idle_timeout"):
        assert f"\n{name} = " in text


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEPASS_MQTT_OFFLINE_QUEUE", "60000")
    assert load_settings(write_config(tmp_path)).mqtt_offline_queue == 60000


def test_a_bad_value_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt_offline_queue: .*greater than or equal to 1"):
        load_settings(
            write_config(tmp_path, ("mqtt_offline_queue = 1000", "mqtt_offline_queue = 0"))
        )
