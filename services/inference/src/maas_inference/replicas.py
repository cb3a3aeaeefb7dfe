"""Inference replicas sharing one deployment table (PostgreSQL): each follows the others'
changes onto its own Triton.

A replica's controller writes the table and serves the change itself; every other replica
hears of it through LISTEN/NOTIFY (`maas_inference.store.CHANGES_CHANNEL`, sent in the
writer's transaction) within milliseconds, reads the record and reconciles its live route
with it through the controller (`follow_table`: load the pinned versions and switch, or drop
the route of a deleted deployment). A replica remembers what it serves per deployment (a
fingerprint of the record's serving fields: versions, split, shadow, Triton settings), so a
record that changed only in its bookkeeping (state, message, times) or that it wrote itself
loads nothing. Records still CREATING (the writer is loading) or FAILED are left alone;
their next change is notified again. A ROLLING_OUT record still holds what was served before
the rollout, which every replica keeps serving until the rollout is recorded.

Notifications are not durable: after (re)connecting, and every `resync_seconds`, the whole
table is compared with the live routes, so a change missed while the listener was down is
followed anyway.

Every `takeover_seconds` the follower also asks its controller to take over the creates and
rollouts whose replica stopped renewing their lease (it died midway); one replica takes each.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from maas_runtime import contract_enums, errors
from maas_runtime.database import notifications

from maas_inference.store import CHANGES_CHANNEL, SqlDeploymentStore

_log = logging.getLogger(__name__)

_SKIPPED_STATES = frozenset({contract_enums.DEPLOYMENT_STATE_CREATING,
                             contract_enums.DEPLOYMENT_STATE_FAILED})
_SERVING_FIELDS = ("model", "traffic", "shadow", "serving", "resolved")
_RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0)


class TableFollowingController(Protocol):
    """What the follower needs from the deployment controller."""

    async def follow_table(self, deployment_id: str) -> dict | None:
        """Serve what the table holds for the deployment now, writing nothing; the record
        followed, or None when the deployment is gone (its route dropped)."""
        ...

    def live_deployments(self) -> set[str]:
        """Ids of the deployments this replica serves now."""
        ...

    async def take_over_lapsed_leases(self) -> None:
        """Take over and finish the creates and rollouts whose replica stopped renewing their
        lease."""
        ...


def serving_fingerprint(record: dict) -> str:
    """What a replica serves for `record`, as one comparable string."""
    return json.dumps({key: record.get(key) for key in _SERVING_FIELDS}, sort_keys=True)


class DeploymentFollower:
    """Listens for other replicas' deployment changes and follows them (see module doc)."""

    def __init__(self, store: SqlDeploymentStore, controller: TableFollowingController,
                 resync_seconds: float = 30.0, takeover_seconds: float = 5.0) -> None:
        if not store.shared:
            raise ValueError("replicas follow each other only on a shared (PostgreSQL) table")
        self._store = store
        self._controller = controller
        self._resync_seconds = resync_seconds
        self._takeover_seconds = takeover_seconds
        self._applied: dict[str, str] = {}
        self._pending: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._failures: dict[str, int] = {}
        self._tasks: list[asyncio.Task] = []
        self.listening = asyncio.Event()
        """Set once the listener is connected (tests wait for it)."""
        store.on_local_write(self._local_write)

    def _local_write(self, deployment_id: str, record: dict | None) -> None:
        # This replica's controller applied the change itself (called in a store thread:
        # plain dict updates only).
        if record is None:
            self._applied.pop(deployment_id, None)
        elif record.get("state") not in _SKIPPED_STATES:
            self._applied[deployment_id] = serving_fingerprint(record)

    async def start(self) -> None:
        """Adopt what the controller already serves, then listen and follow."""
        await self._adopt_live()
        self._tasks = [asyncio.create_task(self._listen_forever(), name="deployment-listener"),
                       asyncio.create_task(self._follow_forever(), name="deployment-follower"),
                       asyncio.create_task(self._every(
                           self._resync_seconds, self.resync,
                           "comparing the deployment table with the live routes"),
                           name="deployment-resync"),
                       asyncio.create_task(self._every(
                           self._takeover_seconds, self._controller.take_over_lapsed_leases,
                           "taking over interrupted deployment creates and rollouts"),
                           name="deployment-takeover")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _adopt_live(self) -> None:
        live = self._controller.live_deployments()
        for deployment_id, record in await self._all_records():
            if deployment_id in live and record.get("state") not in _SKIPPED_STATES:
                self._applied.setdefault(deployment_id, serving_fingerprint(record))

    async def _all_records(self) -> list[tuple[str, dict]]:
        rows: list[tuple[str, dict]] = []
        after = ""
        while page := await asyncio.to_thread(self._store.list, after, 500):
            rows += page
            after = page[-1][0]
        return rows

    def _enqueue(self, deployment_id: str) -> None:
        if deployment_id not in self._queued:
            self._queued.add(deployment_id)
            self._pending.put_nowait(deployment_id)

    # -- hearing of changes ---------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        async for payload in notifications(self._store.url, CHANGES_CHANNEL):
            if payload is None:  # (re)connected: whatever changed while nobody listened
                self.listening.set()
                try:
                    await self.resync()
                except Exception:
                    _log.exception("comparing the deployment table with the live routes failed")
            else:
                self._heard(payload)

    def _heard(self, payload: str) -> None:
        try:
            change = json.loads(payload)
            deployment_id, writer = str(change["id"]), change.get("by")
        except (ValueError, KeyError, TypeError):
            _log.warning("ignoring a malformed deployment change notification: %r", payload)
            return
        if writer != self._store.replica_id:
            self._enqueue(deployment_id)

    @staticmethod
    async def _every(seconds: float, work: Callable[[], Awaitable[None]], what: str) -> None:
        """Run `work` every `seconds` until cancelled; a failure is logged and the next run
        comes as planned."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await work()
            except Exception:
                _log.exception("%s failed", what)

    async def resync(self) -> None:
        """Queue every deployment whose live route differs from the table."""
        records = dict(await self._all_records())
        live = self._controller.live_deployments()
        for deployment_id in live - records.keys():
            self._enqueue(deployment_id)
        for deployment_id, record in records.items():
            if self._differs(deployment_id, record, live):
                self._enqueue(deployment_id)

    def _differs(self, deployment_id: str, record: dict, live: set[str]) -> bool:
        if record.get("state") in _SKIPPED_STATES:
            return False
        return (deployment_id not in live
                or self._applied.get(deployment_id) != serving_fingerprint(record))

    # -- following them -------------------------------------------------------------------------

    async def _follow_forever(self) -> None:
        while True:
            deployment_id = await self._pending.get()
            self._queued.discard(deployment_id)
            try:
                await self._follow(deployment_id)
                self._failures.pop(deployment_id, None)
            except asyncio.CancelledError:
                raise
            except errors.MaasError as exc:
                if not isinstance(exc, errors.Unavailable):
                    # Not transient (say, a version this replica cannot serve): the next
                    # resync or change of the deployment tries again, not a tight loop.
                    _log.error("could not follow deployments/%s: %s", deployment_id,
                               exc.message)
                    continue
                self._retry_later(deployment_id, exc.message)
            except Exception as exc:  # the database, the network: transient
                self._retry_later(deployment_id, repr(exc))

    def _retry_later(self, deployment_id: str, why: str) -> None:
        attempt = self._failures.get(deployment_id, 0)
        self._failures[deployment_id] = attempt + 1
        delay = _RETRY_SECONDS[min(attempt, len(_RETRY_SECONDS) - 1)]
        _log.warning("following deployments/%s must wait %.1fs: %s", deployment_id, delay, why)
        asyncio.get_running_loop().call_later(delay, self._enqueue, deployment_id)

    async def _follow(self, deployment_id: str) -> None:
        try:
            record: dict | None = await asyncio.to_thread(self._store.get, deployment_id)
        except errors.NotFound:
            record = None
        live = self._controller.live_deployments()
        if record is None:
            if deployment_id in live:
                await self._controller.follow_table(deployment_id)
            self._applied.pop(deployment_id, None)
            return
        if not self._differs(deployment_id, record, live):
            return
        followed = await self._controller.follow_table(deployment_id)
        if followed is None:
            self._applied.pop(deployment_id, None)
        else:
            self._applied[deployment_id] = serving_fingerprint(followed)
            _log.info("deployments/%s follows the table: %s", deployment_id,
                      ", ".join(followed.get("serving_versions") or []))
