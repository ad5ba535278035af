"""Per-device delivery bookkeeping: what was sent, acknowledged and delivered (pure).

Owns: the verdict on a fleet's telemetry: for each device, the `seq` numbers handed to
its outbox, the ones the gateway acknowledged (PUBACK), and the ones the verifying
subscriber received; from those, losses (sent but never delivered; `lost_after_ack`
counts those the gateway had acknowledged), duplicates (a `seq` delivered again,
allowed by QoS 1) and reordering (a first delivery of a `seq` below one already seen).
A device `withdraw`n mid-run (revoked, or turned hostile by a scenario) owes only what
reached the gateway: its readings after the last one acknowledged or delivered are
`excused` (expected refusals), neither sent nor lost; everything up to that one must
still be delivered.
Must not: do I/O, read clocks or know about MQTT.

A device's readings are numbered 1, 2, 3, ... by its outbox, so the ledger keeps ranges
and counters, not every number sent: memory grows only with what is delivered.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Delivery", "DeliveryLedger", "DeliveryVerdict", "DeviceRecord"]

MAX_LISTED_GAPS = 20


class Delivery(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    REORDERED = "reordered"
    UNKNOWN = "unknown"
    """From a device that is not part of this fleet, or a seq it never sent."""


@dataclass(slots=True)
class DeviceRecord:
    first_sent: int = 0
    last_sent: int = 0
    sent: int = 0
    acked: int = 0
    last_acked: int = 0
    highest_delivered: int = 0
    duplicates: int = 0
    reordered: int = 0
    withdrawn: bool = False
    delivered: set[int] = field(default_factory=set)

    @property
    def owed_upto(self) -> int:
        """The last seq that must be delivered (for a withdrawn device, the last one
        the gateway acknowledged or delivered; 0 if none)."""
        if not self.withdrawn:
            return self.last_sent
        reached = max(self.last_acked, self.highest_delivered)
        return min(self.last_sent, reached)

    @property
    def owed(self) -> int:
        """How many seqs must be delivered."""
        upto = self.owed_upto
        return upto - self.first_sent + 1 if self.sent and upto >= self.first_sent else 0

    @property
    def excused(self) -> int:
        return self.sent - self.owed

    def missing(self, upto: int) -> list[int]:
        """Sent seqs up to `upto` that were not delivered, in order."""
        if not self.sent:
            return []
        return [s for s in range(self.first_sent, upto + 1) if s not in self.delivered]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryVerdict:
    sent: int
    acked: int
    delivered: int
    lost: int
    lost_after_ack: int
    unacked: int
    duplicates: int
    reordered: int
    unknown: int
    excused: int
    """Readings of withdrawn devices that never reached the gateway (not in `sent`)."""
    gaps: dict[str, list[int]]
    """A few missing seqs per device with losses (at most MAX_LISTED_GAPS each)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "acked": self.acked,
            "delivered": self.delivered,
            "lost": self.lost,
            "lost_after_ack": self.lost_after_ack,
            "unacked": self.unacked,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "unknown": self.unknown,
            "excused": self.excused,
        }


class DeliveryLedger:
    """Feed it `sent`, `acked` and `delivered` events; ask for `verdict()` at any time."""

    def __init__(self, device_ids: Iterable[str] = ()) -> None:
        self._devices: dict[str, DeviceRecord] = {d: DeviceRecord() for d in device_ids}
        self.unknown = 0
        self._totals = [0, 0, 0]  # sent, acked, delivered (unique)

    def add_device(self, device_id: str) -> None:
        self._devices.setdefault(device_id, DeviceRecord())

    def record(self, device_id: str) -> DeviceRecord | None:
        return self._devices.get(device_id)

    def withdraw(self, device_id: str) -> None:
        """From now on `device_id` owes only the readings that reached the gateway."""
        self._devices.setdefault(device_id, DeviceRecord()).withdrawn = True

    def sent(self, device_id: str, seq: int) -> None:
        rec = self._devices[device_id]
        if rec.sent == 0:
            rec.first_sent = seq
        elif seq != rec.last_sent + 1:
            raise ValueError(f"{device_id}: seq {seq} sent after {rec.last_sent}")
        rec.last_sent = seq
        rec.sent += 1
        self._totals[0] += 1

    def acked(self, device_id: str, seq: int) -> None:
        rec = self._devices[device_id]
        rec.acked += 1
        rec.last_acked = max(rec.last_acked, seq)
        self._totals[1] += 1

    def delivered(self, device_id: str, seq: int) -> Delivery:
        rec = self._devices.get(device_id)
        if rec is None or rec.sent == 0 or not rec.first_sent <= seq <= rec.last_sent:
            self.unknown += 1
            return Delivery.UNKNOWN
        if seq in rec.delivered:
            rec.duplicates += 1
            return Delivery.DUPLICATE
        rec.delivered.add(seq)
        self._totals[2] += 1
        if seq < rec.highest_delivered:
            rec.reordered += 1
            rec.highest_delivered = max(rec.highest_delivered, seq)
            return Delivery.REORDERED
        rec.highest_delivered = seq
        return Delivery.NEW

    def verdict_counts(self) -> tuple[int, int, int]:
        """Running totals (sent, acked, delivered) without walking every device."""
        sent, acked, delivered = self._totals
        return sent, acked, delivered

    def all_acked(self) -> bool:
        return all(rec.withdrawn or rec.acked >= rec.sent for rec in self._devices.values())

    def complete(self) -> bool:
        """Every owed seq of every device has been delivered at least once."""
        return all(len(rec.delivered) >= rec.owed for rec in self._devices.values())

    def verdict(self) -> DeliveryVerdict:
        sent = acked = delivered = lost = lost_after_ack = duplicates = reordered = 0
        excused = 0
        gaps: dict[str, list[int]] = {}
        for device_id, rec in self._devices.items():
            sent += rec.owed
            excused += rec.excused
            acked += rec.acked
            delivered += len(rec.delivered)
            duplicates += rec.duplicates
            reordered += rec.reordered
            missing = rec.missing(rec.owed_upto)
            if missing:
                lost += len(missing)
                lost_after_ack += sum(1 for s in missing if s <= rec.last_acked)
                gaps[device_id] = missing[:MAX_LISTED_GAPS]
        return DeliveryVerdict(
            sent=sent,
            acked=acked,
            delivered=delivered,
            lost=lost,
            lost_after_ack=lost_after_ack,
            unacked=max(0, sent - acked),
            duplicates=duplicates,
            reordered=reordered,
            unknown=self.unknown,
            excused=excused,
            gaps=gaps,
        )
