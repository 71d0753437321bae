"""booking-saga: book a flight, a hotel and a car; if one can't be booked, refund the others newest-first.

Each booking is a step with `compensate=` its refund. When a step fails for good, the engine runs the
registered compensations newest-first, each as a durable step (`compensate:book-hotel`, ...), and marks the
run failed (compensated). The fake service (agents.booking_service) is idempotent by a key made of the run id
and the step, so a step retried after a crash returns the booking it already made instead of booking twice.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from dex_agents import booking_service
from pydantic import Field

from runs.sdk import NonRetriableError, Retry, task

BOOKERS = {
    "flight": booking_service.book_flight,
    "hotel": booking_service.book_hotel,
    "car": booking_service.book_car,
}


def reserve(kind: str, key: str, trip: str, unavailable: bool) -> dict:
    try:
        return BOOKERS[kind](key=key, trip=trip, unavailable=unavailable)
    except booking_service.Unavailable as exc:
        raise NonRetriableError(str(exc)) from exc  # sold out: retrying won't help; undo the rest


def cancel(booking: dict) -> dict:
    """The compensation of a booking step: refund it (given the step's result, the booking)."""
    refunded = booking_service.refund(booking["id"])
    return {"id": refunded["id"], "kind": refunded["kind"], "status": refunded["status"]}


@task("booking-saga", retry=Retry(attempts=3, initial=1.0, max_delay=20), max_duration=timedelta(minutes=10))
def booking_saga(
    ctx,
    trip: Annotated[str, Field(min_length=1, max_length=200)],
    fail_at: Literal["none", "flight", "hotel", "car"] = "none",
) -> dict:
    """Books a flight, then a hotel, then a car for `trip`. `fail_at` makes that booking sell out, to watch
    the saga undo the bookings already made (refunds run newest-first, each a durable step)."""
    bookings = {}
    for kind in ("flight", "hotel", "car"):
        ctx.set_metadata("progress", {"booking": kind, "booked": list(bookings)})
        step_key = f"book-{kind}"
        bookings[kind] = ctx.step(
            step_key,
            reserve,
            kind,
            f"{ctx.run_id}:{step_key}",
            trip,
            fail_at == kind,
            retry=Retry(attempts=4, initial=0.5, max_delay=10),
            compensate=cancel,
        )
        ctx.log.info("booked %s %s", kind, bookings[kind]["id"])
    ctx.set_metadata("progress", {"booking": None, "booked": list(bookings)})
    total = round(sum(b["price"] for b in bookings.values()), 2)
    return {"trip": trip, "bookings": {kind: b["id"] for kind, b in bookings.items()}, "total": total}
