"""Fixtures shared by the MQTT test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.mqtt_broker import BrokerLimits, SecureBroker
from tests.helpers_mqtt import MqttPki, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> MqttPki:
    """A device CA, a server certificate and a signing key under this test's tmp_path."""
    return make_pki(tmp_path)


@pytest.fixture
def broker_limits() -> BrokerLimits:
    """The `broker` fixture's limits; a module overrides this fixture to change them."""
    return BrokerLimits()


@pytest.fixture
async def broker(pki: MqttPki, broker_limits: BrokerLimits) -> AsyncIterator[SecureBroker]:
    """A `SecureBroker` on a free port, in this test's event loop, with its own metrics."""
    async with SecureBroker(
        ssl_context=pki.server_context(),
        verifier=pki.verifier(),
        port=0,
        registry=CollectorRegistry(),
        limits=broker_limits,
    ) as running:
        yield running
