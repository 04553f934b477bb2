"""RayRetriever and its actors on one local Ray instance (2 CPUs) shared by the whole module.

Few tests, each starting few actors: Ray's start-up dominates their time.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distributed_helpers import ANSWERS, QUESTIONS, query_vectors, tiny_sequence_model, train_one_step

ray = pytest.importorskip("ray")

from ragkit.distributed import (  # noqa: E402
    RayIndexService,
    RayRetriever,
    RetrievalTimeoutError,
    RetrievalUnavailableError,
    make_distributed_retriever,
)
from ragkit.distributed.sharding import ShardSpec, shard_bounds  # noqa: E402
from ragkit.testing import assert_doc_dicts_equal  # noqa: E402

# Half a CPU per actor: four actors fit on the 2-CPU instance.
ACTOR_OPTIONS = {"num_cpus": 0.5}


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One small local Ray instance for the module; retrievers attach to it instead of starting their own."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


def _assert_same_retrieval(retriever, reference, question_ids, queries, n_docs):
    """retrieve() and __call__() of ``retriever`` equal the single-process ``reference``'s."""
    embeds, ids, docs = retriever.retrieve(queries, n_docs)
    ref_embeds, ref_ids, ref_docs = reference.retrieve(queries, n_docs)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(embeds, ref_embeds)
    assert_doc_dicts_equal(docs, ref_docs)
    out = retriever(question_ids, queries, n_docs=n_docs, return_tensors="np")
    ref = reference(question_ids, queries, n_docs=n_docs, return_tensors="np")
    np.testing.assert_array_equal(out["context_input_ids"], ref["context_input_ids"])
    np.testing.assert_array_equal(out["context_attention_mask"], ref["context_attention_mask"])


@pytest.mark.parametrize("layout", ["replicated", "sharded"])
def test_ray_retriever_matches_single_process_and_trains(
    layout, single_process_retriever, disk_config, question_encoder_tokenizer, generator_tokenizer
):
    """Replicated (from the in-memory index) and sharded (from passages on disk, via the finetune factory)."""
    if layout == "replicated":
        retriever = RayRetriever.from_retriever(
            single_process_retriever, num_actors=2, layout="replicated", actor_options=ACTOR_OPTIONS
        )
    else:
        from ragkit.retrieval_rag import RagRetriever

        base = RagRetriever(
            disk_config, question_encoder_tokenizer, generator_tokenizer, init_retrieval=False
        )
        retriever = make_distributed_retriever(base, "ray", index_shards=3, actor_options=ACTOR_OPTIONS)
        assert not base.index.is_initialized()  # the training process never loaded the faiss index
    try:
        assert isinstance(retriever, RayRetriever) and retriever.layout == layout
        question_ids = question_encoder_tokenizer(QUESTIONS, padding=True, return_tensors="np")["input_ids"]
        for n_docs in (3, 5):
            _assert_same_retrieval(
                retriever,
                single_process_retriever,
                question_ids,
                query_vectors(len(QUESTIONS), n_docs),
                n_docs,
            )
        with pytest.raises(ValueError, match="larger than the number of passages"):
            retriever.retrieve(query_vectors(1, 0), 17)

        model = tiny_sequence_model(retriever.config, retriever)
        step = train_one_step(model, question_encoder_tokenizer, generator_tokenizer, QUESTIONS, ANSWERS)
        assert np.isfinite(step["loss"]) and step["encoder_moved"] > 0
    finally:
        retriever.close()


def _first_search_blocks(spec: ShardSpec, marker: str) -> ShardSpec:
    """``spec`` whose shard writes its pid to ``marker`` and blocks in the first search of all actors sharing ``marker``.

    The marker outlives the actor, so the restarted actor (rebuilt from the same spec) and every other
    actor search normally: exactly one call blocks, in flight until the test kills its actor, and
    never completes. The class is local so that Ray pickles it by value for the actors.
    """

    class FirstSearchBlocks(ShardSpec):
        def build(self):
            shard = super().build()
            search = shard.search

            def first_search_blocks(question_hidden_states, n_docs):
                try:
                    fd = os.open(marker + ".claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return search(question_hidden_states, n_docs)
                os.close(fd)
                with open(marker + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.replace(marker + ".tmp", marker)
                threading.Event().wait()  # until the test kills this actor

            shard.search = first_search_blocks
            return shard

    return FirstSearchBlocks(spec.passages, spec.start, spec.stop)


def _shard_specs(dataset, layout, marker):
    if layout == "replicated":
        return [_first_search_blocks(ShardSpec(dataset), marker)] * 2
    bounds = shard_bounds(len(dataset), 2)
    return [_first_search_blocks(ShardSpec(dataset, start, stop), marker) for start, stop in bounds]


def _wait_for_file(path: Path, timeout_s: float = 120.0) -> str:
    """The text of ``path`` once it exists (it is written atomically)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.01)
    return path.read_text()


@pytest.mark.parametrize("layout", ["replicated", "sharded"])
def test_actor_killed_mid_call_every_query_answered_once(
    layout, tmp_path, indexed_dataset, single_process_retriever
):
    """An actor dies during a call: Ray restarts it, the call is sent once more, nothing is lost or doubled.

    The victim is the actor that holds the first call: its search blocks until it is killed, so the
    kill always lands inside that call and the call never completes on the dead actor.
    """
    marker = tmp_path / "blocked_search_pid"
    service = RayIndexService(
        _shard_specs(indexed_dataset, layout, str(marker)), layout=layout, actor_options=ACTOR_OPTIONS
    ).start()
    try:
        pids_before = [info["pid"] for info in service.actor_info()]
        queries = [query_vectors(2, seed) for seed in range(4)]
        answers = []
        worker = threading.Thread(target=lambda: answers.extend(service.search(q, 3) for q in queries))
        worker.start()
        victim = pids_before.index(int(_wait_for_file(marker)))
        assert not answers  # the first call is held by the victim
        ray.kill(service.actors[victim], no_restart=False)
        worker.join(timeout=120)
        assert not worker.is_alive()

        assert len(answers) == len(queries)
        for q, answer in zip(queries, answers):
            np.testing.assert_array_equal(answer.doc_ids, single_process_retriever.retrieve(q, 3)[1])
        # The victim may still be restarting here (replicated calls skip it): actor_info waits for it.
        infos = service.actor_info()
        assert infos[victim]["pid"] != pids_before[victim]  # really killed and restarted
        # Calls completed by the actors alive now: exactly one per query (per shard when sharded), since the
        # killed actor completed none. Replicated calls may land on either replica (a restarting one is skipped).
        served = [info["calls"] for info in infos]
        if layout == "sharded":
            assert served == [4, 4]
        else:
            assert sum(served) == 4
    finally:
        service.close()


def _wait_until_gone(pid: int, timeout_s: float = 60.0) -> None:
    """Wait until process ``pid`` has exited (gone, or a zombie waiting to be reaped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still running {timeout_s} s after ray.kill")


def test_actor_info_waits_for_a_restarting_actor(indexed_dataset):
    """A health check right after an actor dies reports the restarted actor instead of an error."""
    service = RayIndexService([ShardSpec(indexed_dataset)], actor_options=ACTOR_OPTIONS).start()
    try:
        pid_before = service.actor_info()[0]["pid"]
        ray.kill(service.actors[0], no_restart=False)
        _wait_until_gone(pid_before)  # ray.kill returns before the kill lands
        (info,) = service.actor_info()
        assert info["pid"] != pid_before and info["calls"] == 0
        assert service.search(query_vectors(1, 0), 3).doc_ids.shape == (1, 3)
    finally:
        service.close()


def test_dead_or_silent_actors_raise_clear_errors(indexed_dataset):
    """No hang: a call that gets no answer times out, and an actor out of restarts is reported."""
    service = RayIndexService(
        [ShardSpec(indexed_dataset)],
        actor_options=ACTOR_OPTIONS,
        max_restarts=0,
        call_timeout_s=0.5,
        # The search would take 10 s; the call must give up long before that (0.5 s timeout, one retry).
        search_delay_s=10.0,
    ).start()
    try:
        started = time.monotonic()
        with pytest.raises(RetrievalTimeoutError, match="did not answer within"):
            service.search(query_vectors(1, 0), 3)
        assert time.monotonic() - started < 5.0
        ray.kill(service.actors[0], no_restart=True)
        with pytest.raises(RetrievalUnavailableError, match="out of restarts"):
            service.search(query_vectors(1, 0), 3)
    finally:
        service.close()
