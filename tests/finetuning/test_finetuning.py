"""Fine-tuning: loss falls and held-out EM improves, exact resume, end2end index refresh, CLI round trip."""

from __future__ import annotations

import time

import pytest
import torch

from ragkit.errors import CorruptFileError
from ragkit.evaluation import evaluate_answers, generate_answers
from ragkit.finetuning import RagTrainer, TrainingArguments


def _held_out_em(model, tokenizer, examples) -> float:
    predictions = generate_answers(
        model, tokenizer, [e.source for e in examples], batch_size=8, max_length=8, show_progress=False
    )
    return evaluate_answers(predictions, [e.answers for e in examples]).metrics["em"]


def _args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "run"),
        num_train_epochs=60,
        train_batch_size=4,
        learning_rate=1e-2,
        max_target_length=8,
        val_max_target_length=8,
        precision="fp32",
        show_progress=False,
        do_validation=False,
    )
    values.update(overrides)
    return TrainingArguments(**values)


@pytest.mark.parametrize("model_type", ["rag_sequence", "rag_token"])
def test_miniature_finetuning_learns(tmp_path, make_model, train_examples, held_out_examples, model_type):
    model, tokenizer = make_model(seed=0, model_type=model_type)
    untrained_em = _held_out_em(model, tokenizer, held_out_examples)
    started = time.perf_counter()
    result = RagTrainer(
        model, tokenizer, _args(tmp_path, save_checkpoints=False), train_examples, held_out_examples
    ).train()
    print(f"{model_type}: {result.global_step} steps in {time.perf_counter() - started:.1f} s")
    trained_em = _held_out_em(model, tokenizer, held_out_examples)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    print(f"loss {first:.3f} -> {last:.3f}; held-out EM {untrained_em:.2f} -> {trained_em:.2f}")
    assert last < 0.5 * first
    assert trained_em > untrained_em
    assert trained_em >= 0.5


def test_resume_after_interruption_continues_exactly(tmp_path, make_model, train_examples, monkeypatch):
    """A run killed mid-epoch and resumed from its last checkpoint ends where an uninterrupted run ends."""
    settings = dict(num_train_epochs=3, save_steps=2, learning_rate=3e-3)  # 3 steps per epoch, 9 in all

    model_a, tokenizer = make_model(seed=0, dropout=0.1)  # dropout: the RNG state must be restored too
    reference = RagTrainer(model_a, tokenizer, _args(tmp_path / "a", **settings), train_examples).train()
    assert reference.global_step == 9 and reference.final_dir is not None

    model_b, tokenizer = make_model(seed=0, dropout=0.1)
    trainer_b = RagTrainer(model_b, tokenizer, _args(tmp_path / "b", **settings), train_examples)
    real_step, calls = trainer_b._optimizer_step, []

    def crash_on_fifth_step():
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed in the middle of epoch 2, one step after the step-4 checkpoint
        real_step()

    monkeypatch.setattr(trainer_b, "_optimizer_step", crash_on_fifth_step)
    with pytest.raises(KeyboardInterrupt):
        trainer_b.train()
    # The trainer state is plain data: it loads without unpickling arbitrary objects.
    state = torch.load(tmp_path / "b" / "run" / "checkpoint-last" / "trainer_state.pt", weights_only=True)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (4, 1, 1)

    # A new process: different initial weights and RNG state; everything must come from the checkpoint.
    model_c, tokenizer = make_model(seed=123, dropout=0.1)
    torch.manual_seed(999)
    resumed = RagTrainer(
        model_c, tokenizer, _args(tmp_path / "b", resume=True, **settings), train_examples
    ).train()
    assert resumed.global_step == 9
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-5, abs=1e-6)
    reference_state = model_a.state_dict()
    for name, tensor in model_c.state_dict().items():
        torch.testing.assert_close(tensor, reference_state[name], msg=f"{name} differs after resume")


def test_end2end_trains_context_encoder_and_refreshes_index(
    tmp_path, make_model, train_examples, question_encoder_tokenizer
):
    from transformers import DPRContextEncoder

    from ragkit.encoders import TextEncoder
    from ragkit.testing import tiny_dpr_config

    model, tokenizer = make_model(seed=0)
    torch.manual_seed(1)
    context_encoder = DPRContextEncoder(tiny_dpr_config(hidden_size=32))
    initial = {n: p.detach().clone() for n, p in context_encoder.named_parameters()}
    original_embeddings = model.retriever.index.passages.all_embeddings().copy()
    refreshed_at = []
    trainer = RagTrainer(
        model,
        tokenizer,
        _args(
            tmp_path,
            end2end=True,
            index_rebuild_steps=2,
            num_train_epochs=2,
            learning_rate=1e-3,
            save_checkpoints=False,
        ),
        train_examples,
        context_encoder=context_encoder,
        context_encoder_tokenizer=question_encoder_tokenizer,
    )
    default_refresher = trainer.index_refresher
    trainer.index_refresher = lambda encoder: (
        refreshed_at.append(trainer.global_step),
        default_refresher(encoder),
    )
    result = trainer.train()
    assert result.global_step == 6 and refreshed_at == [2, 4, 6]
    assert any(not torch.equal(p, initial[n]) for n, p in context_encoder.named_parameters())
    # The index now holds the trained context encoder's embeddings of the same passages.
    titles, texts = model.retriever.index.dataset["title"], model.retriever.index.dataset["text"]
    expected = TextEncoder(
        context_encoder.eval(), question_encoder_tokenizer, "pooler", False, torch.device("cpu")
    ).encode(titles, text_pairs=texts, show_progress=False)
    current = model.retriever.index.passages.all_embeddings()
    assert current.shape == original_embeddings.shape
    assert abs(current - expected).max() < 1e-4
    assert abs(current - original_embeddings).max() > 1e-2


class _RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_resume_refuses_a_trainer_state_that_runs_code(tmp_path, make_model, train_examples, monkeypatch):
    # load_checkpoint used torch.load(weights_only=False): a tampered checkpoint ran code on --resume.
    monkeypatch.chdir(tmp_path)
    model, tokenizer = make_model(seed=0)
    trainer = RagTrainer(model, tokenizer, _args(tmp_path, num_train_epochs=1), train_examples)
    checkpoint = trainer.save_checkpoint()
    trainer.load_checkpoint()  # a genuine checkpoint loads
    torch.save({"global_step": _RunsCode()}, checkpoint / "trainer_state.pt")
    with pytest.raises(CorruptFileError, match=r"trainer_state\.pt holds objects other than tensors"):
        trainer.load_checkpoint()
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("stop_at", [1, 3])  # before the first index rebuild; between the first two
def test_end2end_resume_rebuilds_the_index_the_run_was_using(
    tmp_path, make_model, train_examples, question_encoder_tokenizer, stop_at
):
    from transformers import DPRContextEncoder

    from ragkit.testing import tiny_dpr_config

    settings = dict(end2end=True, index_rebuild_steps=2, num_train_epochs=2, learning_rate=1e-3)

    def run(directory, seed=0, **extra):
        """Train; return the result and, per index rebuild, the sum of the context encoder's weights used."""
        model, tokenizer = make_model(seed=seed)
        torch.manual_seed(1)
        encoder = DPRContextEncoder(tiny_dpr_config(hidden_size=32))
        trainer = RagTrainer(
            model,
            tokenizer,
            _args(directory, save_checkpoints=True, **settings, **extra),
            train_examples,
            context_encoder=encoder,
            context_encoder_tokenizer=question_encoder_tokenizer,
        )
        rebuilds, default_refresher = [], trainer.index_refresher

        def recording_refresher(used):
            rebuilds.append(sum(float(p.double().sum()) for p in used.parameters()))
            default_refresher(used)

        trainer.index_refresher = recording_refresher
        return trainer.train(), rebuilds

    reference, reference_rebuilds = run(tmp_path / "a")
    assert len(reference_rebuilds) == 3  # steps 2, 4, 6
    run(tmp_path / "b", max_steps=stop_at)
    resumed, rebuilds = run(tmp_path / "b", seed=5, resume=True)
    # At step 1 the run was still on the starting index (nothing to rebuild); at step 3, on the one rebuilt
    # at step 2 (rebuilt again from the context encoder of step 2); then the rebuilds of steps 4 and 6.
    assert rebuilds == pytest.approx(reference_rebuilds, rel=1e-9)
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-6)


@pytest.mark.parametrize("show_progress", [True, False])
def test_end2end_index_rebuild_shows_progress_as_the_run(
    tmp_path, make_model, train_examples, question_encoder_tokenizer, monkeypatch, show_progress
):
    from transformers import DPRContextEncoder

    import ragkit.finetuning.trainer as trainer_module
    from ragkit.testing import tiny_dpr_config

    shown = []
    monkeypatch.setattr(
        trainer_module,
        "refresh_index",
        lambda *args, show_progress=False, **kwargs: shown.append(show_progress),
    )
    model, tokenizer = make_model(seed=0)
    args = _args(tmp_path, end2end=True, index_rebuild_steps=1, max_steps=1, show_progress=show_progress)
    RagTrainer(
        model,
        tokenizer,
        args,
        train_examples,
        context_encoder=DPRContextEncoder(tiny_dpr_config(hidden_size=32)),
        context_encoder_tokenizer=question_encoder_tokenizer,
    ).train()
    assert shown == [show_progress]  # re-embedding every passage is long work: a bar unless hidden
