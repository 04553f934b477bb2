"""Ray actors that hold the index, and the client that spreads queries over them.

Layouts:

* **replicated**: every actor holds the whole index; each call goes to one actor, round robin, so
  several training workers are served in parallel.
* **sharded**: actor ``i`` holds a contiguous slice of the passages; each call goes to every actor
  at once and their top-k lists are merged exactly (:func:`~ragkit.distributed.sharding.merge_shard_results`).

Faults are Ray's business where Ray has an answer: actors are created with ``max_restarts`` so a
dead actor comes back (rebuilding its shard from the spec). The client adds what Ray leaves to the
caller: a call whose actor died is sent once more (to another replica, or to the restarted shard),
every wait has a timeout, and each answer carries the id of the request it answers, so a query is
never lost, never answered twice and never given another query's documents.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import RagInputError
from .errors import RetrievalTimeoutError, RetrievalUnavailableError
from .sharding import ReplicaSpec, ShardResult, ShardSpec, merge_shard_results

logger = logging.getLogger(__name__)

__all__ = ["LAYOUTS", "RayIndexService"]

#: Ways of spreading an index over actors.
LAYOUTS = ("replicated", "sharded")
#: Largest actor argument sent inline (Ray's own limit for inlining task arguments is 100 KiB).
_INLINE_ARGUMENT_BYTES = 64 * 1024


def _import_ray() -> Any:
    """Import Ray, or say how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            "The Ray retriever needs Ray: `pip install 'ray[default]'` (or, in a clone of the ragkit repository, "
            "`pip install -e '.[distributed]'`)."
        ) from err
    return ray


def _actor_argument(ray: Any, spec: ShardSpec | ReplicaSpec) -> Any:
    """The spec as an actor argument: inline when small, else an object this service keeps alive.

    Ray restarts an actor with its constructor arguments. Small ones (a recipe over passages on disk
    pickles to a few KB) travel inline with the actor's definition; a large one (passages held in
    memory) is stored once and referenced, and holding that reference here keeps it available for
    restarts for as long as the service lives.
    """
    try:
        size = len(pickle.dumps(spec))
    except Exception:  # not picklable by the standard pickle: let Ray's serializer store it
        size = None
    return spec if size is not None and size <= _INLINE_ARGUMENT_BYTES else ray.put(spec)


def _host_port(address: str | None) -> tuple[str, int] | None:
    """(host, port) of a Ray address to probe; None for a local start, ``"auto"`` or an address without a port."""
    if not address or address in ("auto", "local"):
        return None
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _check_reachable(address: str | None, timeout_s: float) -> None:
    """Raise ``RetrievalUnavailableError`` when nothing accepts connections at a Ray address within ``timeout_s``.

    ``ray.init`` retries an unreachable cluster for minutes regardless of the caller's timeout; one TCP
    connection attempt answers the common cases (wrong host or port, cluster down) at once.
    """
    import socket

    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=max(0.1, min(timeout_s, 30.0))):
            pass
    except OSError as err:
        raise RetrievalUnavailableError(
            f"Cannot reach the Ray cluster at {address!r} ({err}). Check the address and port "
            "(`ray status` on the head node prints it), that the cluster is running and reachable from here, "
            "or start a local Ray instead (no address: omit --ray_address, or address=None in Python)."
        ) from err


class _IndexActor:
    """Body of a Ray actor: builds one shard (or replica) from its spec and answers searches.

    Args:
        spec: A :class:`ShardSpec` or :class:`ReplicaSpec`; built here, in the actor's process.
        search_delay_s: Sleep before each search. Fault-injection tests use it to have a call in
            flight when they kill the actor; leave at 0.
    """

    def __init__(self, spec: ShardSpec | ReplicaSpec, search_delay_s: float = 0.0) -> None:
        self._searcher = spec.build()
        self._search_delay_s = search_delay_s
        self._calls = 0

    def info(self) -> dict[str, Any]:
        """Process id, slice and calls served (since the last restart): for health checks and tests."""
        return {
            "pid": os.getpid(),
            "start": getattr(self._searcher, "start", 0),
            "stop": getattr(self._searcher, "stop", None),
            "calls": self._calls,
        }

    def search(
        self, request_id: str, question_hidden_states: np.ndarray, n_docs: int
    ) -> tuple[str, ShardResult]:
        """Answer one batch; the request id comes back with the answer."""
        if self._search_delay_s:
            time.sleep(self._search_delay_s)
        result = self._searcher.search(question_hidden_states, n_docs)
        self._calls += 1
        return request_id, result


class RayIndexService:
    """A set of Ray actors serving an index, and the calls that use them.

    Args:
        specs: One spec per actor: for ``"replicated"`` each spec covers the whole collection; for
            ``"sharded"`` the specs are contiguous slices in order
            (:func:`~ragkit.distributed.sharding.shard_bounds`).
        layout: ``"replicated"`` or ``"sharded"``.
        address: Ray cluster to attach to (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``);
            ``None`` uses the Ray instance already running in this process or starts a local one.
        name: Actor name prefix. With a name, actors are named (in ``namespace``) and created only
            if absent, so every training process that uses the same name shares the same actors;
            ``None`` gives this service private actors.
        namespace: Ray namespace of named actors.
        actor_options: Extra ``ray.remote`` options per actor (``num_cpus``, ``memory``,
            ``scheduling_strategy``, ...); defaults to one CPU per actor.
        max_restarts: How many times Ray restarts a dead actor.
        call_timeout_s: Longest wait for one retrieval call.
        init_timeout_s: Longest wait for the actors to build their index (at start and after a restart).
        ray_init_kwargs: Passed to ``ray.init`` when this service starts or attaches to Ray.
        search_delay_s: Test hook (see :class:`_IndexActor`); leave at 0.
    """

    def __init__(
        self,
        specs: Sequence[ShardSpec | ReplicaSpec],
        *,
        layout: str = "replicated",
        address: str | None = None,
        name: str | None = None,
        namespace: str = "ragkit",
        actor_options: dict[str, Any] | None = None,
        max_restarts: int = 2,
        call_timeout_s: float = 120.0,
        init_timeout_s: float = 600.0,
        ray_init_kwargs: dict[str, Any] | None = None,
        search_delay_s: float = 0.0,
    ) -> None:
        if layout not in LAYOUTS:
            raise RagInputError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
        if not specs:
            raise RagInputError("RayIndexService needs at least one spec (one per actor).")
        if layout == "sharded" and any(isinstance(spec, ReplicaSpec) for spec in specs):
            raise RagInputError(
                "The sharded layout needs passage shards (ShardSpec): an index that reports no scores "
                "cannot be merged. Use layout='replicated' or give the passages dataset."
            )
        self.specs = list(specs)
        self.layout = layout
        self.address = address
        self.name = name
        self.namespace = namespace
        self.actor_options = {"num_cpus": 1, **(actor_options or {})}
        self.max_restarts = max_restarts
        self.call_timeout_s = call_timeout_s
        self.init_timeout_s = init_timeout_s
        self.ray_init_kwargs = dict(ray_init_kwargs or {})
        self.search_delay_s = search_delay_s
        self.actors: list[Any] = []
        self._spec_refs: list[Any] = []
        self._started_ray = False
        self._round_robin = itertools.count()
        self._request_ids = itertools.count()
        self._client_id = uuid.uuid4().hex[:8]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> RayIndexService:
        """Attach to (or start) Ray, create or look up the actors and wait until each index is built.

        Returns:
            ``self``, ready to :meth:`search`.
        """
        ray = _import_ray()
        if not ray.is_initialized():
            _check_reachable(self.address, self.init_timeout_s)
            kwargs = {"include_dashboard": False, **self.ray_init_kwargs}
            ray.init(address=self.address, **kwargs)
            # Only a Ray this service started is shut down by close(); an attached cluster is not ours.
            self._started_ray = self.address is None
            logger.info(
                "Ray %s", "started locally" if self.address is None else f"attached at {self.address}"
            )
        actor_class = ray.remote(_IndexActor)
        options = {"max_restarts": self.max_restarts, "max_task_retries": 0, **self.actor_options}
        self.actors = []
        stored: dict[int, Any] = {}
        for spec in self.specs:
            if id(spec) not in stored:  # a recipe shared by replicas is stored once
                stored[id(spec)] = _actor_argument(ray, spec)
        self._spec_refs = [stored[id(spec)] for spec in self.specs]
        for shard, spec_ref in enumerate(self._spec_refs):
            actor_options = dict(options)
            if self.name is not None:
                actor_options.update(
                    name=f"{self.name}-{self.layout}-{shard}-of-{len(self.specs)}",
                    namespace=self.namespace,
                    get_if_exists=True,
                )
            self.actors.append(actor_class.options(**actor_options).remote(spec_ref, self.search_delay_s))
        infos = self._info_all(self.init_timeout_s, "start")
        for shard, (spec, info) in enumerate(zip(self.specs, infos)):
            if isinstance(spec, ShardSpec) and info["start"] != spec.start:
                raise RuntimeError(
                    f"Actor {shard} named {self.name!r} serves passages from {info['start']}, not {spec.start}: "
                    "another job created actors under this name with other shards. Use another name."
                )
        logger.info("%d %s retrieval actor(s) ready", len(self.actors), self.layout)
        return self

    def close(self, kill_actors: bool = True) -> None:
        """Stop the actors (unless shared by name and ``kill_actors`` is False) and a Ray this service started.

        Args:
            kill_actors: Kill the actors. Named actors shared with other processes should be
                killed by the last user only.
        """
        ray = _import_ray()
        if ray.is_initialized() and kill_actors:
            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception as err:  # a dead or foreign actor must not stop the clean-up
                    logger.debug("Could not kill a retrieval actor: %s", err)
        self.actors = []
        self._spec_refs = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> RayIndexService:
        return self.start() if not self.actors else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def actor_info(self) -> list[dict[str, Any]]:
        """``info()`` of every actor (pid, slice, calls served), waiting at most ``call_timeout_s``.

        An actor that Ray is restarting is waited for (within the same timeout), so a health check
        right after a failure reports the restarted actor instead of an error.
        """
        return self._info_all(self.call_timeout_s, "answer info()")

    # -- calls -----------------------------------------------------------------------------------

    def search(self, question_hidden_states: np.ndarray, n_docs: int) -> ShardResult:
        """Retrieve ``n_docs`` passages per question from the actors.

        Args:
            question_hidden_states: ``(batch, dim)`` float32 question vectors.
            n_docs: Number of documents per question.

        Returns:
            The :class:`ShardResult` of the whole collection (merged across shards when sharded).
        """
        if not self.actors:
            raise RetrievalUnavailableError(
                "The retrieval actors are not started: call `retriever.init_retrieval()` (or service.start())."
            )
        queries = np.ascontiguousarray(question_hidden_states, dtype=np.float32)
        if self.layout == "replicated":
            first = next(self._round_robin) % len(self.actors)
            return self._search_with_retry([first], queries, n_docs)[0]
        results = self._search_with_retry(list(range(len(self.actors))), queries, n_docs)
        return merge_shard_results(results, n_docs)

    def _search_with_retry(self, targets: list[int], queries: np.ndarray, n_docs: int) -> list[ShardResult]:
        """Send the batch to the actors ``targets`` at once; resend once to those whose actor died."""
        ray = _import_ray()
        if not ray.is_initialized():
            raise RetrievalUnavailableError(
                "Ray is not running in this process (shut down, or the cluster is gone): restart it and "
                "call `retriever.init_retrieval()` again."
            )
        # Small batches travel inline with each call; a large one is stored once for all shards.
        large = len(targets) > 1 and queries.nbytes > _INLINE_ARGUMENT_BYTES
        queries_ref = ray.put(queries) if large else queries
        pending = {actor: self._submit(actor, queries_ref, n_docs) for actor in targets}
        results: dict[int, ShardResult] = {}
        deadline = time.monotonic() + self.call_timeout_s
        retry: list[int] = []
        for actor, (request_id, ref) in pending.items():
            try:
                results[actor] = self._receive(ray, request_id, ref, deadline)
            except ray.exceptions.RayActorError as err:
                logger.warning(
                    "Retrieval actor %d died or is restarting (%s); sending the call again.", actor, err
                )
                retry.append(actor)
        for actor in retry:
            # A replica's call goes to the next replica; a shard's to the same actor once Ray has
            # restarted it (and it has rebuilt its shard).
            target = (actor + 1) % len(self.actors) if self.layout == "replicated" else actor
            try:
                self._wait_alive(ray, target, time.monotonic() + self.init_timeout_s)
                request_id, ref = self._submit(target, queries_ref, n_docs)
                results[actor] = self._receive(ray, request_id, ref, time.monotonic() + self.call_timeout_s)
            except ray.exceptions.RayActorError as err:
                raise RetrievalUnavailableError(
                    f"Retrieval actor {target} died again while answering a retried call ({err}). It is out of "
                    "restarts or its node is gone: check `ray status` and the actor logs (out of memory?), "
                    "then recreate the retriever; raise max_restarts to survive more failures."
                ) from err
        return [results[actor] for actor in targets]

    def _wait_alive(self, ray: Any, actor: int, deadline: float) -> None:
        """Wait until ``actor`` answers (a restarting actor rebuilds its shard first), at most until ``deadline``.

        Ray refuses calls to an actor while it restarts (``ActorUnavailableError``) rather than
        queueing them, so the retried search is sent only once the actor is back: it runs once.
        """
        try:
            self._get_info(ray, actor, self.actors[actor].info.remote(), deadline)
        except ray.exceptions.GetTimeoutError as err:
            raise RetrievalTimeoutError(
                f"Retrieval actor {actor} did not come back within {self.init_timeout_s:.0f} s after dying: "
                "check `ray status` and its log; raise init_timeout_s if its index takes longer to load."
            ) from err

    def _get_info(self, ray: Any, actor: int, ref: Any, deadline: float) -> dict[str, Any]:
        """``info()`` of one actor by ``deadline``, asked again while Ray restarts it (``info`` changes nothing).

        Raises Ray's ``GetTimeoutError`` at the deadline and its ``RayActorError`` for an actor that is gone.
        """
        while True:
            try:
                return ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.ActorUnavailableError:
                # Restarting (or its call was cut by the restart): it answers once its shard is rebuilt.
                if time.monotonic() >= deadline:
                    raise ray.exceptions.GetTimeoutError(
                        f"Retrieval actor {actor} was still restarting at the deadline."
                    ) from None
                time.sleep(0.1)
                ref = self.actors[actor].info.remote()

    def _submit(self, actor: int, queries_ref: Any, n_docs: int) -> tuple[str, Any]:
        """Start a search on one actor; returns the request id and the result's object ref."""
        request_id = f"{self._client_id}-{next(self._request_ids)}"
        return request_id, self.actors[actor].search.remote(request_id, queries_ref, n_docs)

    def _receive(self, ray: Any, request_id: str, ref: Any, deadline: float) -> ShardResult:
        """Wait for one answer until ``deadline``; check that it answers ``request_id``."""
        timeout = max(0.0, deadline - time.monotonic())
        try:
            answered_id, result = ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError as err:
            try:
                ray.cancel(ref)
            except Exception as cancel_err:  # the actor may be gone: nothing left to cancel
                logger.debug("Could not cancel a timed-out retrieval call: %s", cancel_err)
            raise RetrievalTimeoutError(
                f"A retrieval actor did not answer within {self.call_timeout_s:.0f} s. The cluster may be gone "
                "or overloaded: check `ray status`; raise call_timeout_s if the index is just slow."
            ) from err
        except ray.exceptions.RayTaskError as err:
            # An error inside the search (wrong vector width, n_docs too large): the caller's to fix.
            raise err.as_instanceof_cause() from None
        if answered_id != request_id:
            raise RuntimeError(
                f"Retrieval answer for request {answered_id} arrived for request {request_id}."
            )
        return result

    def _info_all(self, timeout_s: float, what: str) -> list[dict[str, Any]]:
        """``info()`` of every actor within ``timeout_s``, waiting through restarts; ``what`` ("start") names the wait in errors."""
        ray = _import_ray()
        deadline = time.monotonic() + timeout_s
        refs = [actor.info.remote() for actor in self.actors]  # all at once: actors build in parallel
        try:
            return [self._get_info(ray, actor, ref, deadline) for actor, ref in enumerate(refs)]
        except ray.exceptions.GetTimeoutError as err:
            raise RetrievalTimeoutError(
                f"Retrieval actors did not {what} within {timeout_s:.0f} s: the cluster may lack the CPUs or "
                f"memory they ask for ({self.actor_options}); check `ray status`, lower num_cpus in "
                "actor_options, or raise init_timeout_s for a large index."
            ) from err
        except ray.exceptions.RayActorError as err:
            raise RetrievalUnavailableError(
                f"A retrieval actor died while waiting for it to {what} ({err}); its log (in /tmp/ray/session_latest/logs) says "
                "why, often a missing file or too little memory for its shard."
            ) from err
