"""Mutual exclusion over the MLflow registry: a ticket lock on a registered model's version counter.

MLflow has no compare-and-set. A lock that is "a thing that exists while held" cannot be broken
safely: deleting it by name removes whatever holds the name now, possibly a lock a live process
has just taken. What MLflow does offer is a sequencer: the server numbers a registered model's
versions in the transaction that creates them, and a deleted version keeps its number (SQL
stores mark it deleted), so no number is given out twice. The lock uses that:

- **Take**: create a version (a ticket) of the lock model `<model>--tracesft-lock`. The holder is
  the live ticket with the smallest number. Numbers follow commit order, so when ticket n exists
  every smaller ticket is already visible: once none of them is left, n holds the lock, and no
  other ticket can (all others are larger).
- **Release**: delete the ticket.
- **Take over a dead holder**: a waiter deletes the head ticket once it is older than
  `lease_s + request timeout + margin`, measured on the server's clock alone (the head's
  timestamp against the waiter's own ticket's, plus the waiter's monotonic time since): client
  clocks never enter. A delete names the version number, so every waiter that breaks one stale
  ticket deletes that same ticket (a second delete changes nothing) and none can remove a newer
  one: the takeover has one outcome whoever does it.
- **A holder that is alive but slow** stops writing once `lease_s` has passed since it began to
  take the lock (`Lease.check()` before every write), before any waiter may break its ticket; a
  request it sent before then is answered or abandoned within the HTTP timeout.

A waiter gives up after `lease_s / 2`, so its own lease still has half left when its turn comes.
The lock model is one registered model per adapter model; between promotions it has no live
version, and its description says what it is.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from tracesft.errors import TracesftError
from tracesft.registry.client import RegistryClient, request_timeout_s

LOCK_SUFFIX = "--tracesft-lock"
TOKEN_TAG = "tracesft_lock_token"
HOLDER_TAG = "tracesft_lock_holder"
TICKET_SOURCE = "tracesft-lock:/ticket"  # a ticket has no files; MLflow needs a source string all the same
TAKEOVER_MARGIN_S = 5.0
_log = logging.getLogger(__name__)


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


class Lease:
    """The holder's right to write: it ends `lease_s` after the holder began to take the lock."""

    def __init__(self, name: str, started: float, lease_s: float) -> None:
        self.name, self.started, self.lease_s = name, started, lease_s

    def check(self) -> None:
        """Raise before a write that could come after a waiter has been allowed to take the lock over."""
        if time.monotonic() - self.started > self.lease_s:
            raise TracesftError(
                f"this command held the registry lock {self.name!r} for over {self.lease_s:g} s (registry.lock_lease_s) "
                "and stopped before its next write so that a waiting command may take the lock over; retry, or raise "
                "registry.lock_lease_s if the registry is this slow"
            )


@contextmanager
def registry_lock(client: RegistryClient, model_name: str, lease_s: float) -> Iterator[Lease]:
    """Hold the registry lock of `model_name` for the block; writes inside call `Lease.check()` first."""
    name = lock_name(model_name)
    started = time.monotonic()
    token = uuid.uuid4().hex
    _ensure_lock_model(client, name, model_name)
    ticket = client.create_once(
        lambda: client.raw.create_model_version(
            name, source=TICKET_SOURCE, await_creation_for=0, tags={TOKEN_TAG: token, HOLDER_TAG: f"{socket.gethostname()}:{os.getpid()}"}
        ),
        lambda: next((t for t in _live_tickets(client, name) if t.tags.get(TOKEN_TAG) == token), None),
    )
    try:
        _wait_for_turn(client, name, ticket, seen_at=time.monotonic(), give_up_at=started + lease_s / 2, lease_s=lease_s)
        yield Lease(name, started, lease_s)
    finally:
        try:
            _delete_ticket(client, name, ticket.version)
        except Exception as err:  # the ticket goes stale and the next waiter takes it over
            _log.warning("could not release registry lock %s ticket %s (%s); it is taken over after %.0f s",
                         name, ticket.version, err, _takeover_after_s(lease_s))


def _wait_for_turn(client: RegistryClient, name: str, mine: Any, seen_at: float, give_up_at: float, lease_s: float) -> None:
    mine_created_s = mine.creation_timestamp / 1000  # the server's clock
    while True:
        tickets = sorted(_live_tickets(client, name), key=lambda t: int(t.version))
        if str(mine.version) not in {str(t.version) for t in tickets}:
            raise TracesftError(
                f"this command's ticket for the registry lock {name!r} was taken over while it waited (it waited longer "
                "than registry.lock_lease_s allows); nothing was written: retry"
            )
        head = tickets[0]
        if str(head.version) == str(mine.version):
            return
        server_now_s = mine_created_s + (time.monotonic() - seen_at)
        head_age_s = server_now_s - head.creation_timestamp / 1000
        if head_age_s > _takeover_after_s(lease_s):
            _delete_ticket(client, name, head.version)  # its holder died: whoever deletes it, the same ticket goes
            continue
        if time.monotonic() > give_up_at:
            since = datetime.fromtimestamp(head.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds")
            raise TracesftError(
                f"the registry lock {name!r} is held by {head.tags.get(HOLDER_TAG, 'another command')} since {since}; "
                f"retry when that command ends (if it died, its hold is taken over "
                f"{max(_takeover_after_s(lease_s) - head_age_s, 0):.0f} s from now)"
            )
        time.sleep(random.uniform(0.05, 0.25))


def _takeover_after_s(lease_s: float) -> float:
    """How old a head ticket must be before a waiter may delete it: the holder's lease, plus the
    longest its last request may take, plus a margin for the server's clock between requests."""
    return lease_s + request_timeout_s() + TAKEOVER_MARGIN_S


def _live_tickets(client: RegistryClient, name: str) -> list[Any]:
    return list(client.search_model_versions(filter_string=f"name = '{name}'"))


def _delete_ticket(client: RegistryClient, name: str, version: Any) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":  # already deleted (a waiter, or our own lost response)
            raise


def _ensure_lock_model(client: RegistryClient, name: str, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    if client.search_registered_models(filter_string=f"name = '{name}'"):
        return
    try:
        client.create_registered_model(
            name,
            description=f"tracesft's lock over the promotions of {model_name}: each live version is a command waiting "
            "for or holding it. Not an adapter; leave it in place.",
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another command created it meanwhile
            raise
