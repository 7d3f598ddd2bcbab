"""Instant recovery: a VM runs on an image whose backing chain is a backup
point while the daemon moves the data into it.

``bbctl restore --instant`` makes a qcow2 whose backing file is the point's
file (in well under a second, whatever the disk's size) and registers it
here. Whenever a connected domain has a disk whose top image is that file,
the daemon runs QEMU's ``block-stream`` on it in the VM's own QEMU: QEMU
copies every cluster the image does not hold yet from the backing chain
into it, never over a cluster the guest has written meanwhile, and at the
end drops the backing chain, so the image stands alone.

The record is in the store; what is done is read from QEMU (the job, and
whether the image still has a backing file), so a daemon restarted
mid-stream finds the job running, or gone and the image standing alone,
and a VM restarted mid-stream has the stream started again (clusters
already copied are not copied twice). On a disk libvirt opened, libvirt
must run the stream (``virsh blockpull``): the daemon follows that job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from typing import Any

from ..errors import Busy, DomainNotConnected, InvalidArgument, NoSuchDomain, OperationFailed
from ..model import Disk, DomainState
from ..qemu.graph import read_graph, read_links
from ..store import Store
from .domains import Domain, DomainService
from .events import EventBus

log = logging.getLogger("blockbackupd.recovery")

WAITING, STREAMING, DONE, FAILED = "waiting", "streaming", "done", "failed"

#: How libvirt (with -blockdev, since 5.10) names the nodes it opens.
LIBVIRT_NODE = "libvirt-"


#: The start of a recovery's stream job id.
JOB_PREFIX = "recovery-"


def job_id(file: str) -> str:
    """The stream job's id in QEMU: one per image (not under the daemon's
    prefix: to the other services it is a block job like the VM manager's)."""
    return JOB_PREFIX + hashlib.sha1(file.encode()).hexdigest()[:12]


async def backing_chain(file: str) -> list[str]:
    """The image's backing files, nearest first, as qemu-img reads them.

    :raise InvalidArgument: not a qcow2 image with a backing file, or a
        backing file is missing.
    """
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "info", "-U", "--output=json", "--backing-chain", file,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise InvalidArgument(f"file {file}: {err.decode(errors='replace').strip()}")
    images = json.loads(out)
    if images[0].get("format") != "qcow2":
        raise InvalidArgument(f"file {file} is {images[0].get('format')}, not qcow2")
    if len(images) < 2:
        raise InvalidArgument(f"file {file} has no backing file: nothing to recover into it")
    return [str(i["filename"]) for i in images[1:]]


class RecoveryService:
    def __init__(self, domains: DomainService, events: EventBus, store: Store) -> None:
        self._domains = domains
        self._events = events
        self._store = store
        self._background: set[asyncio.Task[None]] = set()
        #: Failed or cancelled stream jobs' messages by (domain, job), until
        #: followed up on the same connection (a QEMU that quits cancels its
        #: jobs: that is no failure).
        self._errors: dict[tuple[str, str], str] = {}
        #: Images whose stream failed since their domain's last connect.
        self._failed: set[str] = set()
        domains.add_connect_hook(self._connected)
        domains.add_job_hook(self._job_ended)
        domains.add_job_start_hook(self._job_started)

    # -- requests --------------------------------------------------------------------

    async def start(self, file: str, speed: int | None) -> dict[str, Any]:
        """Register an image to recover into; the stream starts as soon as a
        connected domain runs on it (at once, if one does).

        :raise InvalidArgument: not an absolute path to a qcow2 image with a
            backing chain, or already registered.
        """
        if "\0" in file or not os.path.isabs(file):
            raise InvalidArgument(f"file {file[:200]!r} must be an absolute path")
        path = os.path.realpath(file)
        if any(f == path for f, _, _ in self._store.recoveries()):
            raise InvalidArgument(f"{path} is already being recovered into "
                                  "(recovery.lookup shows how far)")
        if speed is not None and speed < 0:
            raise InvalidArgument("speed must be 0 (no limit) or more bytes per second")
        chain = await backing_chain(path)
        self._store.put_recovery(path, {"state": WAITING, "job": job_id(path), "backing": chain,
                                        "speed": speed or 0})
        log.info("instant recovery into %s registered (backing chain %s)", path,
                 " <- ".join(chain))
        await asyncio.gather(*(self._follow_if_on(domain, path) for domain in self._domains.all()
                               if domain.state is not DomainState.DISCONNECTED
                               and not domain.offline))
        return await self.lookup(path)

    async def _follow_if_on(self, domain: Domain, path: str) -> None:
        """Follow the domain if a device of it runs on ``path`` now. One
        query-block a domain (a host's thousand VMs are asked at once), the
        full reading only where the image is; a domain that cannot answer
        now is followed at its next connect."""
        try:
            devices = await domain.session.execute("query-block")
            tops = {os.path.realpath(str(d["inserted"].get("image", {}).get("filename", "")))
                    for d in devices if "inserted" in d}
            if path in tops:
                async with domain.lock:
                    await self._follow(domain)
        except (DomainNotConnected, OperationFailed, Busy) as err:
            log.warning("instant recovery into %s: domain %s not followed now: %s",
                        path, domain.name, err)

    async def lookup(self, file: str) -> dict[str, Any]:
        """:raise InvalidArgument: no recovery into that file."""
        path = os.path.realpath(file) if os.path.isabs(file) else file
        for f, payload, created in self._store.recoveries():
            if f == path:
                return await self._describe(f, payload, created)
        raise InvalidArgument(f"no instant recovery into {file[:200]!r}")

    async def all(self) -> list[dict[str, Any]]:
        return [await self._describe(f, p, c) for f, p, c in self._store.recoveries()]

    async def delete(self, file: str) -> None:
        """Forget a recovery; a running stream is cancelled (the image keeps
        its backing chain and stays usable, but needs the backup).

        :raise InvalidArgument: no recovery into that file.
        """
        info = await self.lookup(file)
        payload = next(p for f, p, _ in self._store.recoveries() if f == info["file"])
        domain = self._domain_of(payload)
        if domain is not None and info["state"] == STREAMING and \
                domain.state is not DomainState.DISCONNECTED and not domain.offline:
            async with domain.lock:
                try:
                    await domain.session.execute("job-cancel", {"id": payload["job"]})
                    await self._gone(domain, payload["job"])
                except (OperationFailed, DomainNotConnected):
                    pass  # it ended meanwhile, or its QEMU did
        self._store.drop_recovery(info["file"])
        self._failed.discard(info["file"])
        for key in [k for k in self._errors if k[1] == payload["job"]]:
            del self._errors[key]
        log.info("instant recovery into %s forgotten (%s)", info["file"], info["state"])

    @staticmethod
    async def _gone(domain: Domain, job: str, wait: float = 10.0) -> None:
        """Until QEMU no longer lists the job. Its cancellation event comes
        before the reply that shows it gone, so its message is recorded by
        then, for the caller to forget: a recovery registered again into the
        same image (same job id) must not read it as its own failure."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while any(j.get("id") == job for j in await domain.session.execute("query-jobs")):
            if loop.time() > deadline:
                log.warning("domain %s: job %s still listed %.0f s after its cancel",
                            domain.name, job, wait)
                return
            await asyncio.sleep(0.02)

    def reads(self) -> dict[str, list[str]]:
        """Unfinished recoveries: image -> the backup files it still reads."""
        return {f: list(p["backing"]) for f, p, _ in self._store.recoveries()
                if p["state"] != DONE}

    # -- following QEMU ------------------------------------------------------------------

    def _domain_of(self, payload: dict[str, Any]) -> Domain | None:
        name = payload.get("domain")
        try:
            return self._domains.get(name) if name else None
        except NoSuchDomain:
            return None

    async def _describe(self, file: str, payload: dict[str, Any],
                        created: float) -> dict[str, Any]:
        out: dict[str, Any] = {"file": file, "state": payload["state"],
                               "backing": payload["backing"], "created": int(created),
                               "speed": payload.get("speed", 0)}
        for key in ("domain", "disk", "error", "finished", "waiting_for", "manager_job"):
            if payload.get(key) is not None:
                out[key] = payload[key]
        domain = self._domain_of(payload)
        if payload["state"] == STREAMING and domain is not None and \
                domain.state is not DomainState.DISCONNECTED and not domain.offline:
            try:
                jobs = await domain.session.execute("query-jobs")
            except (OperationFailed, DomainNotConnected):
                jobs = []
            running = payload.get("manager_job") or payload["job"]
            job = next((j for j in jobs if j.get("id") == running), None)
            if job is not None:
                out["progress"] = {"done": int(job.get("current-progress", 0)),
                                   "total": int(job.get("total-progress", 0))}
        elif payload["state"] == DONE:
            size = payload.get("size", 0)
            out["progress"] = {"done": size, "total": size}
        return out

    def _job_ended(self, domain_name: str, job_type: str, job: str,
                   error: str | None) -> None:
        # Any stream's end on a domain with a recovery to do: the VM
        # manager's pull of a small disk may end before its start was seen.
        if not job.startswith(JOB_PREFIX) and not (
                job_type == "stream" and any(p["state"] != DONE and p.get("domain") == domain_name
                                             for _, p, _ in self._store.recoveries())):
            return
        if error is not None and job.startswith(JOB_PREFIX):
            # The job is gone with its message (it dismisses itself): keep it
            # for the follow-up to read.
            self._errors[(domain_name, job)] = error

        async def run() -> None:
            try:
                domain = self._domains.get(domain_name)
                async with domain.lock:
                    await self._follow(domain)
            except (DomainNotConnected, NoSuchDomain):
                pass  # its QEMU went (or the domain did): the next connect follows

        task = asyncio.create_task(run(), name=f"recovery: {job} ended")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _job_started(self, domain: Domain, job: str) -> None:
        """The VM manager's own stream of a disk being recovered into (one
        waiting for libvirt's pull). Read without the node list: a pull of a
        small disk may conclude before the next command, and the node list
        then kills QEMU. The disk is the one the last full reading (at
        connect) found on the image."""
        if domain.offline or job.startswith(JOB_PREFIX):
            return  # (a recovery's own stream: already followed)
        recoveries = [(f, p) for f, p, _ in self._store.recoveries()
                      if p["state"] != DONE and p.get("domain") == domain.name
                      and p.get("disk") and p.get("manager_job") != job]
        if not recoveries:
            return
        jobs = {j["id"]: j for j in await domain.session.execute("query-jobs")}
        if jobs.get(job, {}).get("type") != "stream" or jobs[job].get("status") == "concluded":
            return  # a concluded one: its end event follows, and _follow with it
        links = await read_links(domain.session)
        for file, payload in recoveries:
            if links.jobs.get(job, set()) & links.below_device(payload["disk"]):
                self._adopt(file, payload, domain.name, payload["disk"], job)

    async def _connected(self, domain: Domain) -> None:
        self._failed -= {f for f, p, _ in self._store.recoveries()
                         if p.get("domain") == domain.name}
        for key in [k for k in self._errors if k[0] == domain.name]:
            del self._errors[key]
        await self._follow(domain)

    async def _follow(self, domain: Domain) -> None:
        """Under the domain's lock: start, adopt or conclude the streams of
        the recoveries whose image this domain runs on.

        The job dismisses itself when it ends: while a concluded stream job
        waits to be dismissed, ``query-named-block-nodes`` kills QEMU (see
        :func:`..qemu.graph.named_nodes`), and the VM manager may read the
        graph at any time, with the daemon stopped.
        """
        if domain.offline:
            return
        recoveries = [(f, p) for f, p, _ in self._store.recoveries() if p["state"] != DONE]
        if not recoveries:
            return
        session = domain.session
        graph = await read_graph(session)
        jobs = {j["id"]: j for j in await session.execute("query-jobs")}
        tops: dict[str, Disk] = {os.path.realpath(d.chain[0].file): d
                                 for d in graph.disks() if d.chain}
        for file, payload in recoveries:
            job = jobs.get(payload["job"])
            disk = tops.get(file)
            if job is not None:
                if payload["state"] != STREAMING or payload.get("domain") != domain.name:
                    self._save(file, payload, state=STREAMING, domain=domain.name,
                               disk=disk.name if disk else payload.get("disk"))
                continue
            error = self._errors.pop((domain.name, payload["job"]), None)
            if disk is None:
                continue
            manager_job = next((j for j in graph.jobs_on(disk, JOB_PREFIX)
                                if jobs.get(j, {}).get("type") == "stream"), None)
            if manager_job is not None:
                # The VM manager streams the disk itself (libvirt's block
                # pull): followed, not doubled.
                if payload.get("manager_job") != manager_job:
                    self._adopt(file, payload, domain.name, disk.name, manager_job)
                continue
            payload.pop("manager_job", None)
            if len(disk.chain) == 1:
                self._save(file, payload, state=DONE, domain=domain.name, disk=disk.name,
                           error=None, finished=int(time.time()), size=disk.size,
                           waiting_for=None)
                log.info("instant recovery into %s done: disk %s of domain %s stands alone",
                         file, disk.name, domain.name)
                self._events.publish(domain.name, "recovery-done", file=file, disk=disk.name)
                continue
            if error is not None:
                # Not again at once: the domain's next connect retries.
                if error == "cancelled":
                    error = "the stream was cancelled (not by the daemon)"
                self._save(file, payload, state=FAILED, domain=domain.name, disk=disk.name,
                           error=error)
                self._failed.add(file)
                log.error("instant recovery into %s failed: %s", file, error)
                self._events.publish(domain.name, "recovery-failed", file=file,
                                     disk=disk.name, reason=error)
                continue
            if file in self._failed:
                continue  # failed on this connection: the next one retries
            if disk.node.startswith(LIBVIRT_NODE):
                # libvirt keeps its own record of each disk's backing chain and
                # uses it in later jobs ("'libvirt-2-format' is not in this
                # backing file chain" from its block-commit after a stream it
                # did not run): it must run the stream itself.
                waiting = (f"libvirt owns the backing chain of disk {disk.name}: pull it "
                           "with `virsh blockpull DOMAIN TARGET` (the daemon follows it)")
                if payload.get("waiting_for") != waiting:
                    self._save(file, payload, state=WAITING, domain=domain.name,
                               disk=disk.name, waiting_for=waiting)
                    log.info("instant recovery into %s: %s", file, waiting)
                continue
            args: dict[str, Any] = {"job-id": payload["job"], "device": disk.node}
            if payload.get("speed"):
                args["speed"] = int(payload["speed"])
            try:
                await session.execute("block-stream", args)
            except OperationFailed as err:
                self._save(file, payload, state=FAILED, domain=domain.name, disk=disk.name,
                           error=err.message)
                self._failed.add(file)
                log.error("instant recovery into %s: cannot start: %s", file, err.message)
                self._events.publish(domain.name, "recovery-failed", file=file,
                                     disk=disk.name, reason=err.message)
                continue
            self._save(file, payload, state=STREAMING, domain=domain.name, disk=disk.name,
                       error=None, waiting_for=None)
            log.info("instant recovery into %s: streaming the backup into disk %s of domain %s",
                     file, disk.name, domain.name)
            self._events.publish(domain.name, "recovery-started", file=file, disk=disk.name)

    def _adopt(self, file: str, payload: dict[str, Any], domain: str, disk: str,
               job: str) -> None:
        """Follow the VM manager's stream ``job`` of the image as the recovery's."""
        self._save(file, payload, state=STREAMING, domain=domain, disk=disk, manager_job=job,
                   waiting_for=None)
        log.info("instant recovery into %s: the VM manager's stream job %s moves the backup "
                 "into disk %s of domain %s", file, job, disk, domain)
        self._events.publish(domain, "recovery-started", file=file, disk=disk, job=job)

    def _save(self, file: str, payload: dict[str, Any], **changes: Any) -> None:
        payload.update(changes)
        self._store.put_recovery(file, payload)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
