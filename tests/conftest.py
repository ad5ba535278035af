"""Fixtures shared by the MQTT test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers_mqtt import MqttPki, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> MqttPki:
    """A device CA, a server certificate and a signing key under this test's tmp_path."""
    return make_pki(tmp_path)
