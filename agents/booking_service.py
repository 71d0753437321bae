"""A fake booking service for the booking-saga example: flights, hotels and cars, booked and refunded.

State lives in JSON files under `settings.DEX_BOOKING_DIR` (default `<BASE_DIR>/.dex/booking/`), so the worker
process, the dashboard and the tests all see the same bookings. Every booking is keyed by an idempotency key
(the saga uses its run id and step): booking twice with the same key returns the first booking, so a retried
step never double-books; refunding twice refunds once. `ledger.jsonl` lists every booking and refund in order.

This module has no tasks; the registry imports it like any module of `agents/` and finds none.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

KINDS = ("flight", "hotel", "car")
PRICES = {"flight": 420.0, "hotel": 180.0, "car": 65.0}


class Unavailable(Exception):
    """Nothing of this kind can be booked for the trip (a business failure: retrying won't help)."""


class UnknownBooking(LookupError):
    pass


def root() -> Path:
    from django.conf import settings

    configured = getattr(settings, "DEX_BOOKING_DIR", None)
    path = Path(configured) if configured else Path(settings.BASE_DIR) / ".dex" / "booking"
    path.mkdir(parents=True, exist_ok=True)
    return path


def booking_id(kind: str, key: str) -> str:
    return f"{kind[:3].upper()}-" + hashlib.sha256(f"{kind}:{key}".encode()).hexdigest()[:10].upper()


def _file(booking: str) -> Path:
    return root() / f"{booking}.json"


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _record(op: str, booking: dict) -> None:
    line = json.dumps(
        {"op": op, "id": booking["id"], "kind": booking["kind"], "key": booking["key"], "ts": time.time()}
    )
    with open(root() / "ledger.jsonl", "a", encoding="utf-8") as ledger:  # one short append: atomic enough
        ledger.write(line + "\n")


def book(kind: str, *, key: str, trip: str, unavailable: bool = False) -> dict[str, Any]:
    """Book a `kind` for `trip`, once per `key`: the same key returns the booking made the first time."""
    if kind not in KINDS:
        raise ValueError(f"unknown booking kind {kind!r}")
    ident = booking_id(kind, key)
    path = _file(ident)
    if path.exists():
        return json.loads(path.read_text())
    if unavailable:
        raise Unavailable(f"no {kind} available for {trip!r}")
    booking = {
        "id": ident,
        "kind": kind,
        "key": key,
        "trip": trip,
        "price": PRICES[kind],
        "status": "booked",
        "booked_at": time.time(),
        "refunded_at": None,
    }
    try:  # O_EXCL: of two racing attempts with one key, exactly one books
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return json.loads(path.read_text())
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(booking, indent=2, sort_keys=True))
    _record("book", booking)
    return booking


def refund(booking: str) -> dict[str, Any]:
    """Cancel and refund a booking. Refunding a refunded booking changes nothing."""
    path = _file(booking)
    if not path.exists():
        raise UnknownBooking(f"no booking {booking!r}")
    data = json.loads(path.read_text())
    if data["status"] == "refunded":
        return data
    data.update(status="refunded", refunded_at=time.time())
    _write(path, data)
    _record("refund", data)
    return data


def get(booking: str) -> dict[str, Any]:
    path = _file(booking)
    if not path.exists():
        raise UnknownBooking(f"no booking {booking!r}")
    return json.loads(path.read_text())


def ledger(key_prefix: object = "") -> list[dict[str, Any]]:
    """Every booking and refund in order (those whose key starts with `key_prefix`, e.g. a run id)."""
    path = root() / "ledger.jsonl"
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if e["key"].startswith(str(key_prefix))]


# The functions the saga calls, one per kind, as the brief of a real integration would have them.
def book_flight(*, key: str, trip: str, unavailable: bool = False) -> dict[str, Any]:
    return book("flight", key=key, trip=trip, unavailable=unavailable)


def book_hotel(*, key: str, trip: str, unavailable: bool = False) -> dict[str, Any]:
    return book("hotel", key=key, trip=trip, unavailable=unavailable)


def book_car(*, key: str, trip: str, unavailable: bool = False) -> dict[str, Any]:
    return book("car", key=key, trip=trip, unavailable=unavailable)


refund_flight = refund_hotel = refund_car = refund
