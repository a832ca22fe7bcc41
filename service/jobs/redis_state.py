"""Job state of the RQ runner in Redis, shared by the API and the workers.

Keys (prefix ``lipcert:``)::

    lipcert:job:<id>         hash: spec, status, progress, result, error, timestamps, worker,
                             heartbeat (unix time, written by the worker while it solves),
                             persisted ("1" once the API saved the result into its storage),
                             persist_owner / persist_until (the lease of the API process
                             saving it: claimant, Redis-clock expiry in ms; see below)
    lipcert:model:<sha256>   the model bytes, content-addressed: workers need no shared disk
    lipcert:dedupe:<key>     id of the latest job for an identical request
    lipcert:active           ids the API still has to watch (not yet ended and persisted)

Status changes go through one Lua script that applies them only from allowed states, so a
worker's "succeeded" cannot overwrite the API's "cancelled" and vice versa.

Saving an ended job's result into the API's storage (for a certification job: re-checking
every worker certificate first, minutes for a large batch) is done by one API process at a
time under a lease: :meth:`RedisJobs.claim_persist` takes it when nobody holds a live one,
the holder renews it while it works (:meth:`RedisJobs.renew_persist`) and ends it with
:meth:`RedisJobs.finish_persist`, which sets ``persisted`` for good (with the result) only
while the lease is still its own. A holder that dies (SIGKILL, machine lost) stops renewing;
once its lease has expired the next reader, in any API replica or the restarted one, takes
over and redoes the work (idempotent: the same columns, written atomically). Expiry is
judged on Redis's clock (``TIME``), so replicas' clocks need not agree.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from service.documents import JobError
from service.jobs.base import JobRecord, JobSpec, now_iso

PREFIX = "lipcert:"
QUEUE_NAME = "lipcert-bounds"
ACTIVE_SET = PREFIX + "active"

_TRANSITION = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return 0 end
local ok = false
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if s == allowed then ok = true end
end
if not ok then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'persisted') == '1' then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local owner = redis.call('HGET', KEYS[1], 'persist_owner')
local until_ms = tonumber(redis.call('HGET', KEYS[1], 'persist_until') or '0') or 0
if owner and owner ~= ARGV[1] and until_ms > now then return 1 end
redis.call('HSET', KEYS[1], 'persist_owner', ARGV[1],
           'persist_until', tostring(now + tonumber(ARGV[2])))
return 2
"""

_RENEW = """
if redis.call('HGET', KEYS[1], 'persisted') == '1' then return 0 end
if redis.call('HGET', KEYS[1], 'persist_owner') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'persist_until', tostring(now + tonumber(ARGV[2])))
return 1
"""

_FINISH = """
if redis.call('HGET', KEYS[1], 'persisted') == '1' then return 0 end
if redis.call('HGET', KEYS[1], 'persist_owner') ~= ARGV[1] then return 0 end
local s = redis.call('HGET', KEYS[1], 'status')
local ok = ARGV[2] == ''
for allowed in string.gmatch(ARGV[2], '[^,]+') do
  if s == allowed then ok = true end
end
if ok then
  for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('HSET', KEYS[1], 'persisted', '1')
redis.call('HDEL', KEYS[1], 'persist_owner', 'persist_until')
return 1
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'persist_owner') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'persist_owner', 'persist_until')
return 1
"""

DONE, HELD, CLAIMED = 0, 1, 2
"""What :meth:`RedisJobs.claim_persist` answers: saved for good (or no such job), another
process holds a live lease, the lease is now the caller's."""


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def model_key(sha256: str) -> str:
    return f"{PREFIX}model:{sha256}"


def dedupe_key(key: str) -> str:
    return f"{PREFIX}dedupe:{key}"


class RedisJobs:
    """Reads and conditionally updates ``lipcert:job:<id>`` hashes."""

    def __init__(self, connection: Any) -> None:
        self.r = connection
        self._transition = connection.register_script(_TRANSITION)
        self._claim = connection.register_script(_CLAIM)
        self._renew = connection.register_script(_RENEW)
        self._finish = connection.register_script(_FINISH)
        self._release = connection.register_script(_RELEASE)

    def create(self, rec: JobRecord, *, model_sha256: str, timeout_s: float | None) -> None:
        fields = {
            "id": rec.id,
            "spec": json.dumps(rec.spec.to_dict()),
            "model_sha256": model_sha256,
            "timeout_s": "" if timeout_s is None else repr(float(timeout_s)),
            "status": rec.status,
            "progress": "{}",
            "created_at": rec.created_at,
            "created_ts": repr(time.time()),
        }
        with self.r.pipeline() as p:
            p.hset(job_key(rec.id), mapping=fields)
            p.sadd(ACTIVE_SET, rec.id)
            p.execute()

    def raw(self, job_id: str) -> dict[str, str]:
        data = self.r.hgetall(job_key(job_id))
        return {_text(k): _text(v) for k, v in data.items()}

    def status(self, job_id: str) -> str | None:
        value = self.r.hget(job_key(job_id), "status")
        return None if value is None else _text(value)

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.raw(job_id)
        return None if not raw else record_from_hash(raw)

    def transition(self, job_id: str, allowed: tuple[str, ...], **fields: Any) -> bool:
        """Set ``fields`` only while the status is one of ``allowed``; True when applied."""
        args: list[str] = [",".join(allowed)]
        for name, value in fields.items():
            args += [name, value if isinstance(value, str) else json.dumps(value)]
        return bool(self._transition(keys=[job_key(job_id)], args=args))

    def start(self, job_id: str, **worker: Any) -> bool:
        """queued -> running in this RQ work-horse: ``worker`` records the runner, host, RQ
        worker id and horse pid (plus the given fields), with started_at and a first
        heartbeat; True when applied (False: cancelled or taken meanwhile)."""
        who = {
            "runner": "rq",
            "host": socket.gethostname(),
            "worker": os.environ.get("RQ_WORKER_ID", ""),
            "horse_pid": os.getpid(),
            **worker,
        }
        return self.transition(
            job_id,
            ("queued",),
            status="running",
            started_at=now_iso(),
            worker=who,
            heartbeat=repr(time.time()),
        )

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        result: Mapping[str, object] | None = None,
        error: JobError | None = None,
        finished_at: str,
    ) -> bool:
        """queued/running -> ``status`` (first terminal transition wins)."""
        fields: dict[str, object] = {"status": status, "finished_at": finished_at}
        if result is not None:
            fields["result"] = dict(result)
        if error is not None:
            fields["error"] = error.to_json()
        return self.transition(job_id, ("queued", "running"), **fields)

    def heartbeat(self, job_id: str) -> None:
        self.transition(job_id, ("running",), heartbeat=repr(time.time()))

    # -- the lease on saving a result (module docstring) ---------------------------------------

    def claim_persist(self, job_id: str, owner: str, lease_s: float) -> int:
        """Take the saving of ``job_id``'s result for ``lease_s`` seconds: :data:`CLAIMED`
        when nobody holds a live lease (a dead holder's expired one is taken over),
        :data:`HELD` while another owner's lease runs, :data:`DONE` once it is saved."""
        ms = max(1, round(lease_s * 1000))
        return int(self._claim(keys=[job_key(job_id)], args=[owner, ms]))

    def renew_persist(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease by ``lease_s`` from now; False when it is not its own."""
        ms = max(1, round(lease_s * 1000))
        return bool(self._renew(keys=[job_key(job_id)], args=[owner, ms]))

    def finish_persist(
        self, job_id: str, owner: str, allowed: tuple[str, ...] = (), **fields: Any
    ) -> bool:
        """While the lease is ``owner``'s: set ``fields`` (only if the status is one of
        ``allowed``; any status when empty), mark the job ``persisted`` for good and end the
        lease, all at once; False (nothing written) when another owner took it over."""
        args: list[str] = [owner, ",".join(allowed)]
        for name, value in fields.items():
            args += [name, value if isinstance(value, str) else json.dumps(value)]
        return bool(self._finish(keys=[job_key(job_id)], args=args))

    def release_persist(self, job_id: str, owner: str) -> None:
        """Give the lease up unfinished (the next reader retries at once)."""
        self._release(keys=[job_key(job_id)], args=[owner])


def record_from_hash(raw: dict[str, str]) -> JobRecord:
    def load(name: str) -> Any:
        value = raw.get(name)
        return None if value in (None, "") else json.loads(value)

    return JobRecord(
        id=raw["id"],
        spec=JobSpec.from_dict(json.loads(raw["spec"])),
        status=raw["status"],  # type: ignore[arg-type]
        progress=load("progress") or {},
        result=load("result"),
        error=JobError.from_json(load("error")),
        created_at=raw.get("created_at", ""),
        started_at=raw.get("started_at") or None,
        finished_at=raw.get("finished_at") or None,
        worker=load("worker") or {},
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
