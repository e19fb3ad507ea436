"""Who is champion, and how it came to be: MLflow's alias, with its history kept beside it.

The alias `champion` is the one record of the current champion: serving loads
`models:/<name>@champion`, and nothing else (no ZenML stage, no tag) says who holds it. Each change
of the alias is logged as a registered-model tag `champion_history.NNNNNN`, so the history lives
in MLflow's own data and its chain can be checked: every entry starts where the one before ended,
and the last one names the alias's version.

A change is made under the registry lock, history first, alias second (a write-ahead log):

1. the entry is written; if that fails, the alias has not moved: the champion is where it was;
2. the alias is moved and read back; if that fails, the entry is taken back out when the alias
   still points at the previous version (if it already points at the new one, the history is
   complete, and the command says the change may have happened).

An entry whose alias move never happened (its command failed and could not even take it back,
the server being gone) names as `previous` the version the alias still points at: readers leave
it out (`settled`), and the next change under the lock deletes it first. So at every moment the
history, read through `settled`, ends at the alias.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel

from tracesft.errors import TracesftError
from tracesft.registry.client import RegistryClient
from tracesft.registry.lock import Lease

CHAMPION = "champion"
HISTORY_TAG_PREFIX = "champion_history."


class ChampionChange(BaseModel):
    """One entry of the champion history: who holds `champion` from `time` on, and why."""

    seq: int
    time: str  # ISO 8601, UTC
    action: Literal["gate", "promote", "rollback"]
    version: str
    previous: str | None
    reason: str
    forced: bool = False


def champion_stack(history: list[ChampionChange]) -> list[str]:
    """The versions that held `champion`, oldest first, with rolled-back reigns removed."""
    holders: list[str] = []
    for change in history:
        if change.action == "rollback":
            holders.pop()
        else:
            holders.append(change.version)
    return holders


def current_champion(client: RegistryClient, name: str) -> Any | None:
    """The model version alias `champion` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None  # no such alias (yet); anything else, an unreachable server above all, is raised
        raise


def settled(history: list[ChampionChange], holder: str | None) -> list[ChampionChange]:
    """The history without a last entry whose alias move never happened (module docstring)."""
    if history and history[-1].version != holder and history[-1].previous == holder:
        return history[:-1]
    return history


def read_history(client: RegistryClient, name: str) -> list[ChampionChange]:
    """Every change of `champion`, oldest first, as the alias confirms it."""
    holder = current_champion(client, name)
    return settled(_logged(client, name), str(holder.version) if holder is not None else None)


def settle_history(client: RegistryClient, name: str, lease: Lease) -> list[ChampionChange]:
    """`read_history`, deleting an unsettled last entry for good; the caller holds the lock."""
    holder = current_champion(client, name)
    logged = _logged(client, name)
    history = settled(logged, str(holder.version) if holder is not None else None)
    if len(history) < len(logged):
        lease.check()
        client.delete_registered_model_tag(name, _tag(logged[-1].seq))
    return history


def move_champion(
    client: RegistryClient,
    lease: Lease,
    name: str,
    history: list[ChampionChange],
    version: str,
    action: str,
    reason: str,
    forced: bool = False,
) -> ChampionChange:
    """Point `champion` at `version`, history first (module docstring); the caller holds the lock and
    passes the settled history."""
    holder = current_champion(client, name)
    change = ChampionChange(
        seq=(history[-1].seq + 1) if history else 1,
        time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        action=action,
        version=version,
        previous=str(holder.version) if holder is not None else None,  # the alias, not the history, is the record
        reason=reason,
        forced=forced,
    )
    lease.check()
    client.set_registered_model_tag(name, _tag(change.seq), change.model_dump_json())
    try:
        lease.check()
        client.set_registered_model_alias(name, CHAMPION, version)
        moved = current_champion(client, name)
        if moved is None or str(moved.version) != version:
            raise TracesftError(f"alias {CHAMPION} of {name} reads {moved.version if moved else 'nothing'} after it was "
                                f"set to {version}; something else moves it")
    except Exception as err:
        _take_back(client, lease, name, change)
        raise TracesftError(
            f"moving {CHAMPION} of {name} to version {version} failed ({err}); see `tracesft adapters history`: "
            "the history names the champion either way"
        ) from None
    return change


def _take_back(client: RegistryClient, lease: Lease, name: str, change: ChampionChange) -> None:
    """Remove `change`'s entry if the alias did not move; if that fails too, readers skip it.

    Not after the lease ended: the next holder may already have written an entry of that number.
    """
    try:
        lease.check()
        holder = current_champion(client, name)
        if (str(holder.version) if holder is not None else None) == change.previous:
            client.delete_registered_model_tag(name, _tag(change.seq))
    except Exception:  # the server is gone, or the lease: `settled` leaves the entry out, the next change deletes it
        pass


def _logged(client: RegistryClient, name: str) -> list[ChampionChange]:
    tags = client.get_registered_model(name).tags
    return [ChampionChange.model_validate_json(tags[key]) for key in sorted(tags) if key.startswith(HISTORY_TAG_PREFIX)]


def _tag(seq: int) -> str:
    return f"{HISTORY_TAG_PREFIX}{seq:06d}"
