"""The training loop's arithmetic and the flags' effects: accumulation, context length, label smoothing,
the retrieval cache, and what a resume refuses."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from ragkit.errors import CorruptFileError, RagInputError
from ragkit.finetuning import RagTrainer, TrainingArguments


def _args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "run"),
        num_train_epochs=1,
        train_batch_size=4,
        learning_rate=1e-2,
        max_target_length=8,
        precision="fp32",
        show_progress=False,
        do_validation=False,
        save_checkpoints=False,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _run_recording_gradients(trainer: RagTrainer):
    """Train, recording every optimizer step's gradients (before clipping and the update)."""
    real_step, gradients = trainer._optimizer_step, []

    def recording_step():
        gradients.append(
            {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        )
        real_step()

    trainer._optimizer_step = recording_step
    return trainer.train(), gradients


@pytest.mark.parametrize(
    "n_examples, accumulated, whole",
    [
        (12, dict(train_batch_size=4, gradient_accumulation_steps=2), dict(train_batch_size=8)),  # 8, then 4
        (10, dict(train_batch_size=4, gradient_accumulation_steps=3), dict(train_batch_size=12)),  # 4+4+2
    ],
)
def test_accumulation_gives_the_unaccumulated_steps(
    tmp_path, make_model, train_examples, n_examples, accumulated, whole
):
    examples = train_examples[:n_examples]
    model_a, tokenizer = make_model(seed=0)
    result_a, grads_a = _run_recording_gradients(
        RagTrainer(model_a, tokenizer, _args(tmp_path / "a", **accumulated), examples)
    )
    model_b, tokenizer = make_model(seed=0)
    result_b, grads_b = _run_recording_gradients(
        RagTrainer(model_b, tokenizer, _args(tmp_path / "b", **whole), examples)
    )
    assert result_a.global_step == result_b.global_step == len(grads_a) == len(grads_b)
    assert result_a.losses == pytest.approx(result_b.losses, rel=1e-5)
    for step, (a, b) in enumerate(zip(grads_a, grads_b)):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
    # Adam divides by the root of tiny second moments, so float noise in near-zero gradients moves weights
    # by far more than the gradients differ; the weights still agree to 1e-3 (1e-4 measured).
    reference = model_b.state_dict()
    worst = max(float((t - reference[n]).abs().max()) for n, t in model_a.state_dict().items())
    print(f"largest weight difference after training: {worst:.2e}")
    assert worst < 1e-3


def _context_widths(model) -> list[int]:
    """Record the width of every context batch the generator is fed."""
    widths: list[int] = []
    generator = model.rag.generator

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            widths.append(int(ids.shape[-1]))

    generator.register_forward_pre_hook(hook, with_kwargs=True)
    return widths


def test_max_combined_length_sets_the_contexts_the_model_is_fed(tmp_path, make_model, train_examples):
    model_a, tokenizer = make_model(seed=0)  # its config builds contexts of up to 96 tokens
    widths_a = _context_widths(model_a)
    long = RagTrainer(model_a, tokenizer, _args(tmp_path / "a"), train_examples[:8]).train()
    model_b, tokenizer = make_model(seed=0)
    widths_b = _context_widths(model_b)
    trainer = RagTrainer(
        model_b, tokenizer, _args(tmp_path / "b", max_combined_length=10), train_examples[:8]
    )
    short = trainer.train()
    assert max(widths_a) > 10
    assert widths_b and max(widths_b) == 10
    assert model_b.config.max_combined_length == 10 and model_b.retriever.config.max_combined_length == 10
    assert short.losses[0] != pytest.approx(long.losses[0], rel=1e-4)


def test_max_combined_length_with_cached_retrieval(tmp_path, make_model, train_examples):
    model, tokenizer = make_model(seed=0)
    widths = _context_widths(model)
    args = _args(tmp_path, max_combined_length=10, cache_retrieval=True, freeze_question_encoder=True)
    RagTrainer(model, tokenizer, args, train_examples[:8]).train()
    assert widths and max(widths) == 10


def test_label_smoothing_changes_the_loss(tmp_path, make_model, train_examples):
    model_a, tokenizer = make_model(seed=0)
    plain = RagTrainer(model_a, tokenizer, _args(tmp_path / "a"), train_examples[:4]).train()
    model_b, tokenizer = make_model(seed=0)
    smoothed = RagTrainer(
        model_b, tokenizer, _args(tmp_path / "b", label_smoothing=0.3), train_examples[:4]
    ).train()
    assert model_b.config.label_smoothing == 0.3
    # Same weights and batch at step 1: only the smoothing differs, and it raises the loss of a peaked model.
    assert smoothed.losses[0] != pytest.approx(plain.losses[0], rel=1e-4)


@pytest.mark.parametrize("model_type", ["rag_sequence", "rag_token"])
def test_cached_retrieval_trains_as_live_retrieval(tmp_path, make_model, train_examples, model_type):
    """With a frozen question encoder, reusing retrieval results changes nothing but the cost."""
    settings = dict(freeze_question_encoder=True, num_train_epochs=2, eval_batch_size=5)  # 12 = 5 + 5 + 2
    model_a, tokenizer = make_model(seed=0, model_type=model_type)
    live = RagTrainer(model_a, tokenizer, _args(tmp_path / "a", **settings), train_examples).train()
    model_b, tokenizer = make_model(seed=0, model_type=model_type)
    trainer = RagTrainer(
        model_b, tokenizer, _args(tmp_path / "b", cache_retrieval=True, **settings), train_examples
    )
    cached = trainer.train()
    assert len(trainer._retrieval_cache) == len(train_examples)
    assert cached.losses == pytest.approx(live.losses, rel=1e-5)


# ----------------------------------------------------------------------------- resume


def _interrupted_run(tmp_path, make_model, train_examples, **settings):
    """A run stopped at step 2 with a checkpoint to resume from."""
    model, tokenizer = make_model(seed=0)
    args = _args(tmp_path, save_checkpoints=True, max_steps=2, num_train_epochs=2, **settings)
    result = RagTrainer(model, tokenizer, args, train_examples).train()
    assert result.interrupted
    return result.checkpoint_dir


@pytest.mark.parametrize(
    "changed, pattern",
    [
        (dict(train_batch_size=3), r"train_batch_size: 4 in the checkpoint, 3 now"),
        (dict(seed=7), r"seed: 42 in the checkpoint, 7 now"),
        (dict(gradient_accumulation_steps=2), r"gradient_accumulation_steps: 1 in the checkpoint, 2 now"),
        (dict(num_train_epochs=5), r"num_train_epochs: 2 in the checkpoint, 5 now"),
        (dict(learning_rate=0.5), r"learning_rate: 0.01 in the checkpoint, 0.5 now"),
        # The loss: a flag left out on --resume falls back to its default.
        (dict(label_smoothing=0.0), r"label_smoothing: 0.1 in the checkpoint, 0.0 now"),
        (dict(max_target_length=25), r"max_target_length: 8 in the checkpoint, 25 now"),
    ],
)
def test_resume_refuses_a_changed_schedule(tmp_path, make_model, train_examples, changed, pattern):
    _interrupted_run(tmp_path, make_model, train_examples, label_smoothing=0.1)
    model, tokenizer = make_model(seed=0)
    settings = dict(save_checkpoints=True, num_train_epochs=2, resume=True, label_smoothing=0.1)
    args = _args(tmp_path, **{**settings, **changed})
    with pytest.raises(RagInputError, match=pattern):
        RagTrainer(model, tokenizer, args, train_examples).train()


def test_resume_refuses_other_training_data(tmp_path, make_model, train_examples):
    _interrupted_run(tmp_path, make_model, train_examples)
    model, tokenizer = make_model(seed=0)
    args = _args(tmp_path, save_checkpoints=True, num_train_epochs=2, resume=True)
    with pytest.raises(RagInputError, match=r"training examples: 12 in the checkpoint, 8 now"):
        RagTrainer(model, tokenizer, args, train_examples[:8]).train()


@pytest.mark.parametrize("damaged", ["trainer_state.pt", "model.safetensors"])
def test_resume_from_a_truncated_file_names_it(tmp_path, make_model, train_examples, damaged):
    checkpoint = _interrupted_run(tmp_path, make_model, train_examples)
    path = checkpoint / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    model, tokenizer = make_model(seed=0)
    args = _args(tmp_path, save_checkpoints=True, num_train_epochs=2, resume=True)
    with pytest.raises(CorruptFileError, match=rf"{damaged}.*(damaged|truncated).*without --resume"):
        RagTrainer(model, tokenizer, args, train_examples).train()


def test_a_later_write_clears_temporaries_of_a_killed_one(tmp_path, make_model, train_examples):
    import os
    import time

    run = tmp_path / "run"
    run.mkdir()
    # What a run killed while writing leaves: temporary directories and files named after their target.
    stale = [run / ".checkpoint-last.abc123.tmp", run / ".final.x9.tmp", run / ".checkpoint-last.old-ab12"]
    for path in stale:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    (run / ".metrics.json.q1.tmp").write_text("{")
    stale.append(run / ".metrics.json.q1.tmp")
    keep = [run / "notes.tmp", run / ".other.abc.tmp"]  # not what a ragkit write of these targets leaves
    keep[0].write_text("mine")
    keep[1].mkdir()
    past = time.time() - 60
    for path in [*stale, *keep]:
        os.utime(path, (past, past))
    model, tokenizer = make_model(seed=0)
    result = RagTrainer(model, tokenizer, _args(tmp_path, save_checkpoints=True), train_examples[:4]).train()
    assert result.final_dir is not None
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in keep)


def test_resume_at_max_steps_takes_no_further_step(tmp_path, make_model, train_examples):
    _interrupted_run(tmp_path, make_model, train_examples)
    model, tokenizer = make_model(seed=0)
    args = _args(tmp_path, save_checkpoints=True, max_steps=2, num_train_epochs=2, resume=True)
    trainer = RagTrainer(model, tokenizer, args, train_examples)
    result, gradients = _run_recording_gradients(trainer)
    assert (result.global_step, len(result.losses), gradients) == (2, 2, [])
    assert result.interrupted and result.final_dir is None


def test_cached_retrieval_is_made_without_dropout(tmp_path, make_model, train_examples):
    model, tokenizer = make_model(seed=0)
    for module in model.rag.question_encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    args = _args(tmp_path, freeze_question_encoder=True, cache_retrieval=True)
    trainer = RagTrainer(model, tokenizer, args, train_examples)
    model.eval()
    without_dropout = trainer._build_retrieval_cache()
    model.train()  # as a model built in Python starts; the cache must still be the eval-mode retrieval
    torch.manual_seed(1)
    cache = trainer._build_retrieval_cache()
    assert model.training
    for (ids, mask, scores), (ref_ids, ref_mask, ref_scores) in zip(cache, without_dropout):
        assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
        torch.testing.assert_close(scores, ref_scores)


def test_fp16_on_cpu_scales_the_loss(tmp_path, make_model, train_examples, recwarn):
    model, tokenizer = make_model(seed=0)
    trainer = RagTrainer(model, tokenizer, _args(tmp_path, precision="fp16"), train_examples)
    assert trainer.autocast_dtype == torch.float16 and trainer.scaler.is_enabled()
    result = trainer.train()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # The first steps overflowed at the initial scale 2**16: each was skipped, halved the scale (the scale
    # grows only after 2000 good steps) and did not advance the learning-rate schedule (so no
    # "lr_scheduler.step() before optimizer.step()" warning either).
    skipped = round(math.log2(2.0**16 / trainer.scaler.get_scale()))
    assert 1 <= skipped < result.global_step == 3
    assert trainer.scheduler.last_epoch == result.global_step - skipped
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


@pytest.mark.parametrize(
    "mine, pattern",
    [
        ("final/thesis.tex", r"final' already holds files ragkit did not write \(thesis\.tex\)"),
        (
            "checkpoint-last/notes.md",
            r"checkpoint-last' already holds files ragkit did not write \(notes\.md\)",
        ),
        ("final", r"final' is an existing file"),
        ("metrics.json", r"metrics\.json exists and was not written by a training run"),
    ],
)
def test_files_a_run_did_not_write_are_never_overwritten(tmp_path, make_model, train_examples, mine, pattern):
    run = tmp_path / "run"
    path = run / mine
    path.parent.mkdir(parents=True)
    path.write_text("the user's own")
    (run / "data.jsonl").write_text("left alone")
    model, tokenizer = make_model(seed=0)
    trainer = RagTrainer(model, tokenizer, _args(tmp_path, save_checkpoints=True), train_examples[:4])
    with pytest.raises(RagInputError, match=pattern):
        trainer.train()
    assert path.read_text() == "the user's own"
    assert trainer.global_step == 0  # refused before training, not after it
    path.unlink()
    result = trainer.train()  # other files in the directory are fine; so is a second run over its own outputs
    result = RagTrainer(model, tokenizer, _args(tmp_path, save_checkpoints=True), train_examples[:4]).train()
    assert result.final_dir is not None and (run / "data.jsonl").read_text() == "left alone"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="maps file descriptors to paths through /proc")
def test_checkpoint_files_reach_the_disk_before_the_checkpoint_is_put_in_place(
    tmp_path, make_model, train_examples, monkeypatch
):
    flushed, unflushed_at_rename = set(), {}
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd):
        flushed.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def checking_replace(src, dst, *args, **kwargs):
        if Path(dst).name in ("checkpoint-last", "final") and Path(src).is_dir():
            files = [os.path.realpath(p) for p in Path(src).rglob("*") if p.is_file()]
            unflushed_at_rename[Path(dst).name] = [f for f in files if f not in flushed]
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", checking_replace)
    model, tokenizer = make_model(seed=0)
    RagTrainer(model, tokenizer, _args(tmp_path, save_checkpoints=True), train_examples[:4]).train()
    assert unflushed_at_rename == {"checkpoint-last": [], "final": []}


def test_a_new_run_over_an_earlier_checkpoint_warns(tmp_path, make_model, train_examples, caplog):
    _interrupted_run(tmp_path, make_model, train_examples)
    model, tokenizer = make_model(seed=0)
    args = _args(tmp_path, save_checkpoints=True, max_steps=1, num_train_epochs=2)
    with caplog.at_level("WARNING", logger="ragkit.finetuning.trainer"):
        RagTrainer(model, tokenizer, args, train_examples).train()
    assert "holds the checkpoint of an earlier run" in caplog.text and "--resume" in caplog.text


def test_resume_refuses_another_model_type(tmp_path, make_model, train_examples):
    # The weights of RAG-Sequence and RAG-Token are the same, so they load; the loss is another.
    _interrupted_run(tmp_path, make_model, train_examples)
    model, tokenizer = make_model(seed=0, model_type="rag_token")
    args = _args(tmp_path, save_checkpoints=True, num_train_epochs=2, resume=True)
    with pytest.raises(
        RagInputError, match=r"RagSequenceForGeneration in the checkpoint, RagTokenForGeneration now"
    ):
        RagTrainer(model, tokenizer, args, train_examples).train()


def test_resume_in_another_precision(tmp_path, make_model, train_examples):
    # E.g. a run started on CPU (fp32) continued on a GPU without bf16 (fp16 with loss scaling): the
    # checkpoint has no loss-scaler state, so the scaler starts fresh.
    _interrupted_run(tmp_path, make_model, train_examples)
    model, tokenizer = make_model(seed=0)
    args = _args(tmp_path, save_checkpoints=True, num_train_epochs=2, resume=True, precision="fp16")
    result = RagTrainer(model, tokenizer, args, train_examples).train()
    assert result.global_step == 6 and result.final_dir is not None


@pytest.mark.parametrize("frozen", ["question_encoder", "generator"])
def test_frozen_parts_run_without_dropout(tmp_path, make_model, train_examples, frozen):
    model, tokenizer = make_model(seed=0, dropout=0.1)
    trained = "generator" if frozen == "question_encoder" else "question_encoder"
    modes = {"question_encoder": set(), "generator": set()}
    for name in modes:
        getattr(model.rag, name).register_forward_hook(
            lambda module, inputs, output, name=name: modes[name].add(module.training)
        )
    args = _args(tmp_path, num_train_epochs=2, do_validation=True, **{f"freeze_{frozen}": True})
    RagTrainer(model, tokenizer, args, train_examples[:8], train_examples[:2]).train()
    # Validation generates in eval mode; the training steps of the second epoch run after it.
    assert modes[frozen] == {False} and modes[trained] == {True, False}


def test_cached_retrieval_trains_as_live_retrieval_with_dropout(tmp_path, make_model, train_examples):
    """Dropout in the frozen question encoder does not make live retrieval differ from the cache."""

    def model_with_dropout():
        model, tokenizer = make_model(seed=0, dropout=0.1)  # the generator's: its RNG draws must line up too
        for module in model.rag.question_encoder.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.3
        return model, tokenizer

    settings = dict(freeze_question_encoder=True, num_train_epochs=2, learning_rate=3e-3)
    live = RagTrainer(*model_with_dropout(), _args(tmp_path / "a", **settings), train_examples).train()
    cached_args = _args(tmp_path / "b", cache_retrieval=True, **settings)
    cached = RagTrainer(*model_with_dropout(), cached_args, train_examples).train()
    assert cached.losses == pytest.approx(live.losses, rel=1e-5)
