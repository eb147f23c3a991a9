"""Authenticated announcements (trainer.signing), and readers that skip what they cannot
trust instead of stopping: the pure parts, no broker."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka.structs import ConsumerRecord

from schemas import AdapterUpdate, LoraSpec, WindowSpec, encode
from trainer.lineage import Lineage, apply_records, lineages_from
from trainer.signing import (
    SIGNATURE_HEADER,
    WRITER_HEADER,
    Verifier,
    signature,
    signed_headers,
    verified,
)
from trainer.snapshot import snapshot_of

KEY = b"k" * 32
WRITER = "lorastream-trainer-0"


def _update(version: int, uri: str, adapter: str = "tutor") -> AdapterUpdate:
    return AdapterUpdate(
        adapter=adapter,
        version=version,
        parent_version=version - 1 or None,
        base_model="/models/base",
        uri=uri,
        sha256=f"{version:064x}",
        lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj"]),
        window=WindowSpec(
            topic="learning-events",
            partition=0,
            first_offset=4 * version,
            last_offset=4 * version + 3,
            size=4,
            event_ids=[f"{adapter}-{4 * version + n}" for n in range(4)],
        ),
        train_loss=2.0,
        created_at=datetime(2026, 11, 28, tzinfo=UTC),
    )


def _record(
    offset: int,
    value: bytes | None,
    key: bytes | None = b"tutor",
    headers: list[tuple[str, bytes]] | None = None,
    topic: str = "adapter-updates",
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic, 0, offset, 0, 0, key, value, None, 0, len(value or b""), headers or []
    )


def _signed(offset: int, value: bytes, key: bytes | None = KEY) -> ConsumerRecord[bytes, bytes]:
    return _record(offset, value, headers=signed_headers(WRITER, key, b"tutor", value))


def test_the_signature_covers_writer_key_and_value_without_ambiguity() -> None:
    base = signature(KEY, WRITER, b"ab", b"c")
    assert len(base) == 64 and int(base, 16) >= 0
    assert signature(KEY, WRITER, b"ab", b"c") == base
    assert signature(KEY, WRITER, b"a", b"bc") != base  # bytes moved across a boundary
    assert signature(KEY, WRITER + "x", b"ab", b"c") != base
    assert signature(KEY, WRITER, None, b"c") != signature(KEY, WRITER, b"", b"c")
    assert signature(KEY, WRITER, b"ab", None) != signature(KEY, WRITER, b"ab", b"")
    assert signature(b"other" * 8, WRITER, b"ab", b"c") != base


def test_the_writer_header_is_always_written_and_the_signature_only_with_a_key() -> None:
    assert signed_headers(WRITER, None, b"tutor", b"v") == [(WRITER_HEADER, WRITER.encode())]
    headers = dict(signed_headers(WRITER, KEY, b"tutor", b"v"))
    assert headers[WRITER_HEADER] == WRITER.encode()
    assert headers[SIGNATURE_HEADER] == signature(KEY, WRITER, b"tutor", b"v").encode()


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([], "unsigned"),
        ([(WRITER_HEADER, WRITER.encode())], "unsigned"),
        ([(WRITER_HEADER, WRITER.encode()), (SIGNATURE_HEADER, b"0" * 64)], "signature"),
        (signed_headers(WRITER, b"w" * 32, b"tutor", b"v"), "signature"),  # another key
        (signed_headers("lorastream-replay-x", KEY, b"tutor", b"v"), None),
        # a writer header changed after signing
        (
            [
                (WRITER_HEADER, b"someone-else"),
                (SIGNATURE_HEADER, signature(KEY, WRITER, b"tutor", b"v").encode()),
            ],
            "signature",
        ),
    ],
)
def test_a_key_makes_the_verifier_check_every_signature(
    headers: list[tuple[str, bytes]], reason: str | None
) -> None:
    problem = Verifier(KEY).signature_problem(_record(0, b"v", headers=headers))
    assert (problem[0] if problem else None) == reason
    assert Verifier().signature_problem(_record(0, b"v", headers=headers)) is None


def test_the_value_cannot_change_under_a_signature() -> None:
    record = _record(0, b"forged", headers=signed_headers(WRITER, KEY, b"tutor", b"real"))
    assert Verifier(KEY).signature_problem(record) == (
        "signature",
        f"its signature (writer {WRITER!r}) does not verify with LORASTREAM_ANNOUNCE_KEY",
    )


def test_only_uris_under_the_adapter_directory_are_trusted(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    (root / "tutor" / "v1").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "tutor" / "v2").symlink_to(outside)
    verifier = Verifier(location=str(root))
    assert verifier.location_problem(str(root / "tutor" / "v1")) is None
    assert verifier.location_problem(str(root / "tutor" / "v9")) is None  # not written yet
    for uri in (
        str(outside),
        f"{root}/../elsewhere",
        f"{root}/tutor/../../elsewhere",
        f"{root}x/tutor/v1",  # a sibling whose name starts the same
        str(root),
        str(root / "tutor" / "v2"),  # a link out of the tree
        "adapters/tutor/v1",  # relative: to whose working directory?
        f"file://{root}/tutor/v1",
        "s3://bucket/adapters/tutor/v1",
    ):
        problem = verifier.location_problem(uri)
        assert problem is not None and problem[0] == "location", uri
    assert Verifier().location_problem(str(outside)) is None  # no location: anywhere


def test_only_uris_under_the_bucket_prefix_are_trusted() -> None:
    verifier = Verifier(location="s3://models/lora/")
    assert verifier.location_problem("s3://models/lora/tutor/v1") is None
    for uri in (
        "s3://models/lora",
        "s3://models/lorax/tutor/v1",
        "s3://other/lora/tutor/v1",
        "s3://models/lora/../other/tutor/v1",
        "s3://models/lora/tutor//v1",
        "s3://models/lora/./tutor/v1",
        "gs://models/lora/tutor/v1",
        "/models/lora/tutor/v1",
    ):
        assert verifier.location_problem(uri) is not None, uri


def test_a_forged_out_of_order_or_out_of_tree_announcement_is_skipped_once_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "adapters"
    good = [_update(v, str(root / "tutor" / f"v{v}")) for v in (1, 2, 3)]
    records = [
        _signed(0, encode(good[0])),
        _record(1, encode(_update(2, str(root / "tutor" / "v2")))),  # unsigned
        _signed(2, encode(_update(99, str(root / "tutor" / "v99")))),  # out of order
        _signed(3, encode(_update(2, str(tmp_path / "elsewhere")))),  # out of the tree
        _record(4, b"{not json", headers=signed_headers(WRITER, KEY, b"tutor", b"{not json")),
        _signed(5, encode(good[1])),
        _signed(6, encode(good[1].model_copy(update={"sha256": "f" * 64}))),  # a second v2
        _signed(7, encode(good[1])),  # read again: fine
        _signed(8, encode(_update(1, str(root / "evil" / "v1"), adapter="evil")), key=b"x" * 32),
    ]
    reasons: Counter[str] = Counter()
    verifier = Verifier(KEY, str(root), lambda reason: reasons.update([reason]))
    caplog.set_level(logging.WARNING)
    lineages: dict[str, Lineage] = {}
    for _ in range(3):  # a reader reads the same records again and again
        apply_records(lineages, records, verifier=verifier)
    assert list(lineages) == ["tutor"]  # a rejected record makes no lineage
    assert [u.version for u in lineages["tutor"].updates] == [1, 2]
    assert lineages["tutor"].latest == good[1]
    assert reasons == {"unsigned": 1, "order": 2, "location": 1, "unreadable": 1, "signature": 1}
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.signing"]
    assert len(lines) == 6, lines
    for offset in (1, 2, 3, 4, 6, 8):
        assert sum(f"adapter-updates[0]@{offset} " in line for line in lines) == 1, lines
    assert any("(order)" in line and "tutor v99 follows v1" in line for line in lines)

    # The next real version still goes on the lineage.
    apply_records(lineages, [_signed(9, encode(good[2]))], verifier=verifier)
    assert lineages["tutor"].version == 3


def test_records_without_headers_are_read_as_before_without_a_key(tmp_path: Path) -> None:
    updates = [_update(v, f"/anywhere/tutor/v{v}") for v in (1, 2)]
    records = [_record(n, encode(u)) for n, u in enumerate(updates)]
    assert [u.version for u in lineages_from(records)["tutor"].updates] == [1, 2]
    # A gap no longer stops the reader: it is skipped, and the lineage stays where it was.
    gap = _record(2, encode(_update(7, "/anywhere/tutor/v7")))
    assert lineages_from([*records, gap])["tutor"].version == 2


def test_a_snapshot_with_a_bad_signature_is_not_verified(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    lineage = Lineage("tutor")
    lineage.record_update(_update(1, str(root / "tutor" / "v1")))
    value = encode(snapshot_of(lineage))
    topic = "adapter-updates.latest"
    reasons: Counter[str] = Counter()
    verifier = Verifier(KEY, str(root), lambda reason: reasons.update([reason]))
    good = _record(0, value, headers=signed_headers(WRITER, KEY, b"tutor", value), topic=topic)
    assert verified(good, verifier)
    wrong = _record(
        1, value, headers=signed_headers(WRITER, b"z" * 32, b"tutor", value), topic=topic
    )
    assert not verified(wrong, verifier)
    assert not verified(_record(2, value, topic=topic), verifier)  # unsigned
    elsewhere = Lineage("tutor")
    elsewhere.record_update(_update(1, str(tmp_path / "elsewhere")))
    out = encode(snapshot_of(elsewhere))
    assert not verified(
        _record(3, out, headers=signed_headers(WRITER, KEY, b"tutor", out), topic=topic),
        verifier,
    )
    assert reasons == {"signature": 1, "unsigned": 1, "location": 1}
    assert verified(_record(4, value, topic=topic), None)  # no verifier: as before
