"""The outbox on real SQLite files: order, acks, bounds, sequence numbers, crashes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.outbox import MessageTooLarge, Outbox, OutboxError

REPO = Path(__file__).resolve().parent.parent


def _open(path: Path, max_messages: int = 1000, max_bytes: int = 1 << 20) -> Outbox:
    return Outbox.open(path, max_messages, max_bytes)


def test_insertion_order_and_paging(tmp_path: Path) -> None:
    with _open(tmp_path / "o.db") as box:
        ids = [box.put("t", f"m{i}".encode()) for i in range(10)]
        assert ids == sorted(ids)
        first = box.pending(4)
        assert [m.payload for m in first] == [b"m0", b"m1", b"m2", b"m3"]
        rest = box.pending(100, after=first[-1].msg_id)
        assert [m.payload for m in rest] == [f"m{i}".encode() for i in range(4, 10)]
        assert box.depth() == 10


def test_ack_removes_only_that_message(tmp_path: Path) -> None:
    with _open(tmp_path / "o.db") as box:
        a, b, c = (box.put("t", x) for x in (b"a", b"b", b"c"))
        box.ack(b)
        box.ack(b)  # twice is harmless
        box.ack(9999)  # unknown is harmless
        assert [m.msg_id for m in box.pending(10)] == [a, c]
        box.ack_many([a, c])
        assert box.pending(10) == []
        assert box.depth() == 0
        assert box.size_bytes() == 0


def test_messages_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with _open(path) as box:
        box.put("devices/d/telemetry", b"\x00\x01binary", qos=1)
        box.put("devices/d/x", b"two", qos=0)
    with _open(path) as box:
        got = box.pending(10)
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            ("devices/d/telemetry", b"\x00\x01binary", 1),
            ("devices/d/x", b"two", 0),
        ]
        assert box.depth() == 2
        assert box.size_bytes() == sum(len(m.topic) + len(m.payload) for m in got)


def test_ids_are_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with _open(path) as box:
        last = box.put("t", b"x")
        box.ack(last)
    with _open(path) as box:
        assert box.put("t", b"y") > last


def test_count_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with _open(path, max_messages=3) as box:
        for i in range(5):
            box.put("t", str(i).encode())
        assert [m.payload for m in box.pending(10)] == [b"2", b"3", b"4"]
        assert box.depth() == 3
        assert box.dropped == 2
    with _open(path, max_messages=3) as box:
        assert box.dropped == 2  # persisted
        box.put("t", b"5")
        assert box.dropped == 3


def test_byte_bound_drops_as_many_as_needed(tmp_path: Path) -> None:
    with _open(tmp_path / "o.db", max_bytes=30) as box:
        for _ in range(3):
            box.put("t", b"x" * 9)  # 10 bytes each: full
        box.put("t", b"y" * 19)  # 20 bytes: two of the old must go
        assert [m.payload for m in box.pending(10)] == [b"x" * 9, b"y" * 19]
        assert box.dropped == 2
        assert box.size_bytes() == 30


def test_message_larger_than_the_outbox_is_refused(tmp_path: Path) -> None:
    with _open(tmp_path / "o.db", max_bytes=10) as box:
        box.put("t", b"ok")
        with pytest.raises(MessageTooLarge):
            box.put("t", b"z" * 10)
        assert box.depth() == 1
        assert box.dropped == 0


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Outbox.open(tmp_path / "o.db", 0, 10)
    with _open(tmp_path / "o.db") as box:
        with pytest.raises(ValueError):
            box.put("", b"x")
        with pytest.raises(ValueError):
            box.put("t", b"x", qos=3)


def test_seq_continues_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"

    def build(seq: int) -> bytes:
        return json.dumps({"seq": seq}).encode()

    with _open(path) as box:
        assert box.last_seq == 0
        assert [box.put_telemetry("t", build)[0] for _ in range(3)] == [1, 2, 3]
        box.ack_many(m.msg_id for m in box.pending(10))  # acks do not rewind the counter
    with _open(path) as box:
        assert box.last_seq == 3
        seq, msg_id = box.put_telemetry("t", build)
        assert seq == 4
        assert json.loads(box.pending(1)[0].payload) == {"seq": 4}
        assert box.pending(1)[0].msg_id == msg_id


def test_failed_build_consumes_no_seq(tmp_path: Path) -> None:
    def broken(seq: int) -> bytes:
        raise RuntimeError("sensor read failed")

    with _open(tmp_path / "o.db") as box:
        box.put_telemetry("t", lambda s: b"1")
        with pytest.raises(RuntimeError):
            box.put_telemetry("t", broken)
        assert box.last_seq == 1
        assert box.put_telemetry("t", lambda s: str(s).encode())[0] == 2
        assert box.depth() == 2


def test_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with _open(path) as box:
        box.put("t", b"x")
        assert os.stat(path).st_mode & 0o777 == 0o600
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()


def test_a_second_reader_sees_depth_and_dropped(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with _open(path, max_messages=2) as writer:
        for i in range(3):
            writer.put("t", str(i).encode())
        with _open(path, max_messages=2) as reader:  # e.g. `gatepass-agent status`
            assert reader.depth() == 2
            assert reader.dropped == 1


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError):
        _open(path)


_WRITER = textwrap.dedent(
    """
    import json, sys
    from agent.outbox import Outbox
    box = Outbox.open(sys.argv[1], 1_000_000, 1 << 30)
    while True:
        seq, msg_id = box.put_telemetry("t", lambda s: json.dumps({"seq": s}).encode())
        print(seq, flush=True)  # only after put_telemetry returned: durable
    """
)


@pytest.mark.parametrize("round_", range(3))
def test_sigkill_mid_write_never_skips_or_reuses_seq(tmp_path: Path, round_: int) -> None:
    path = tmp_path / "o.db"
    reported = 0
    for _ in range(2):  # kill twice: the counter must continue across both crashes
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)],
            stdout=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.stdout is not None
        target = reported + 50 + 37 * round_
        for line in proc.stdout:
            reported = int(line)
            if reported >= target:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    with _open(path, 1_000_000, 1 << 30) as box:
        seqs = [json.loads(m.payload)["seq"] for m in box.pending(1_000_000)]
        # every seq the writer reported is stored; numbers are 1..N without gaps or repeats
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) >= reported
        assert box.last_seq == len(seqs)
        assert box.depth() == len(seqs)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.binary(max_size=12)),
            st.tuples(st.just("ack"), st.integers(min_value=0, max_value=8)),
            st.tuples(st.just("reopen"), st.none()),
        ),
        max_size=40,
    )
)
def test_behaves_like_a_bounded_fifo(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, object]]
) -> None:
    max_messages, max_bytes = 5, 40
    path = tmp_path_factory.mktemp("prop") / "o.db"
    box = _open(path, max_messages, max_bytes)
    model: deque[tuple[int, bytes]] = deque()
    dropped = 0
    try:
        for op, arg in ops:
            if op == "put":
                assert isinstance(arg, bytes)
                msg_id = box.put("t", arg)
                model.append((msg_id, arg))
                while len(model) > max_messages or sum(1 + len(p) for _, p in model) > max_bytes:
                    model.popleft()
                    dropped += 1
            elif op == "ack" and model:
                assert isinstance(arg, int)
                msg_id, _ = model[arg % len(model)]
                box.ack(msg_id)
                model.remove(next(m for m in model if m[0] == msg_id))
            elif op == "reopen":
                box.close()
                box = _open(path, max_messages, max_bytes)
            assert [(m.msg_id, m.payload) for m in box.pending(100)] == list(model)
            assert box.depth() == len(model)
            assert box.dropped == dropped
    finally:
        box.close()


def test_in_memory_outbox_keeps_the_same_rules() -> None:
    outbox = Outbox.in_memory(max_messages=2)
    try:
        for n in range(3):
            outbox.put("t", f"m{n}".encode())
        assert [m.payload for m in outbox.pending(10)] == [b"m1", b"m2"]
        assert outbox.dropped == 1
        seq, _ = outbox.put_telemetry("t", lambda s: str(s).encode())
        assert seq == 1
    finally:
        outbox.close()
