"""A sweep of drop-in details the other parity tests leave out, against Transformers' RAG.

What the other files already compare (so this one does not): forward logits/doc scores/encoder
states of the three classes with and without a retriever (BART and T5); every loss option one at a
time and label smoothing alone; RAG-Token ``n_docs`` at call time; ``output_retrieved`` on
RAG-Sequence with BART; cross-attentions with eager attention; the cache under both names;
RAG-Sequence generate (beams, ``num_return_sequences``, deduplication, ``min_length``,
``forced_bos_token_id``) on given contexts; RAG-Token generate (greedy, beams, ``n_docs``, logits
processors, stopping criteria, ``prefix_allowed_tokens_fn``, ``no_repeat_ngram_size``, sampling with a
seed); checkpoint round trips both ways; config defaults; the tokenizer's ``text_target``.

Here: public signatures, output field order, ``return_dict=False`` tuples, the ``config``-level
switches (``reduce_loss``, ``do_marginalize``, ``exclude_bos_score``, ``output_retrieved``,
``use_cache``, ``n_docs``), loss options combined with label smoothing, ``n_docs`` at call time on the
other classes, ``decoder_attention_mask``, ``encoder_outputs``, every output field's ``None``-ness,
more generation options on both heads, embeddings accessors and resizing, checkpoint file keys,
``RagConfig.to_dict()``, the tokenizer's decode side and the retriever's call options.

Tolerances: 1e-5 absolute on float tensors (float32, CPU), plus 1e-6 relative where ``get_nll`` sums
losses of random logits; token ids, doc ids, file keys and config values exactly.
"""

from __future__ import annotations

import copy
import inspect
import json

import numpy as np
import pytest
import torch
import transformers
import transformers.models.rag.modeling_rag as reference_modeling
from safetensors.torch import load_file

import ragkit
import ragkit.modeling_rag as rk
from rag_helpers import build_pair, retrieved_contexts

ATOL = 1e-5
GENERATORS = ["bart", "t5"]
HEADS = {"model": "RagModel", "sequence": "RagSequenceForGeneration", "token": "RagTokenForGeneration"}
MAX_LENGTH = 8


def _close(a, b, what: str) -> None:
    """Equal shapes and values within ATOL."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert diff <= ATOL, f"{what}: max abs difference {diff}"


def _close_relative(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Within ATOL plus 1e-6 relative: random logits give losses in the hundreds, summed in float32."""
    torch.testing.assert_close(b, a, atol=ATOL, rtol=1e-6, msg=what)


def _call_both(pair, **kwargs):
    with torch.no_grad():
        return pair.reference(**kwargs), pair.ours(**kwargs)


def _generate_both(pair, **kwargs):
    with torch.no_grad():
        return pair.reference.generate(**kwargs), pair.ours.generate(**kwargs)


def _same_ids(ref: torch.Tensor, ours: torch.Tensor) -> None:
    assert ref.shape == ours.shape, f"shape {tuple(ref.shape)} != {tuple(ours.shape)}"
    assert torch.equal(ref, ours), f"\nreference {ref.tolist()}\nragkit    {ours.tolist()}"


class _ConfigFields:
    """Set RAG config fields on both models of a pair for a block, then restore them."""

    def __init__(self, pair, **fields):
        self.pair, self.fields, self.saved = pair, fields, []

    def __enter__(self):
        for config in (self.pair.reference.config, self.pair.ours.config):
            self.saved.append({k: getattr(config, k) for k in self.fields})
            for key, value in self.fields.items():
                setattr(config, key, value)

    def __exit__(self, *exc):
        for config, saved in zip((self.pair.reference.config, self.pair.ours.config), self.saved):
            for key, value in saved.items():
                setattr(config, key, value)


# --- public API surface ------------------------------------------------------------------------------

_CLASSES = [
    "RagConfig",
    "RagTokenizer",
    "RagRetriever",
    "RagModel",
    "RagSequenceForGeneration",
    "RagTokenForGeneration",
]
# Transformers 5 calls the decoder cache `cache`; ragkit keeps Transformers 4's `past_key_values` at that
# position and takes `cache` as a keyword (both names work, see test_modeling_parity.py).
_ALIASES = {"cache": "past_key_values"}


def _public_methods(cls) -> list[str]:
    names = []
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__call__"):
            continue
        if isinstance(value, property) or not callable(getattr(cls, name)):
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("name", _CLASSES)
def test_every_public_method_takes_the_reference_arguments(name):
    reference_cls, our_cls = getattr(transformers, name), getattr(ragkit, name)
    for method in _public_methods(reference_cls):
        if method == "config_class":
            continue
        assert hasattr(our_cls, method), f"{name}.{method} is missing"
        theirs = inspect.signature(getattr(reference_cls, method)).parameters
        ours = inspect.signature(getattr(our_cls, method)).parameters
        positional = [p for p in theirs.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        our_positional = [p.name for p in ours.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        # Same positions for positional arguments (a call by position means the same thing) ...
        for position, param in enumerate(positional):
            accepted = {param.name, _ALIASES.get(param.name, param.name)}
            assert our_positional[position] in accepted, (
                f"{name}.{method}: position {position} is not {param.name}"
            )
        # ... and every keyword with the reference's default (None where the reference's mutable [] means none).
        for param in theirs.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                assert any(p.kind is param.kind for p in ours.values()), f"{name}.{method} lacks {param}"
                continue
            key = (
                _ALIASES.get(param.name, param.name)
                if param.kind is param.POSITIONAL_OR_KEYWORD
                else param.name
            )
            assert key in ours or param.name in ours, f"{name}.{method} lacks argument {param.name}"
            mine = ours.get(key, ours.get(param.name))
            default = param.default
            if isinstance(default, list) and not default:
                assert mine.default in (None, []), f"{name}.{method}({param.name}) default"
            else:
                assert mine.default == default, f"{name}.{method}({param.name}) default {mine.default!r}"


@pytest.mark.parametrize("name", ["RetrievAugLMOutput", "RetrievAugLMMarginOutput"])
def test_output_classes_have_the_reference_fields_in_order(name):
    theirs = list(inspect.signature(getattr(reference_modeling, name)).parameters)
    ours = list(inspect.signature(getattr(ragkit, name)).parameters)
    assert ours[: len(theirs)] == theirs


# --- forward: tuples, fields and their None-ness -----------------------------------------------------


@pytest.mark.parametrize("head", list(HEADS))
def test_return_dict_false_gives_the_reference_tuple_without_its_none_placeholder(
    pairs, questions, labels, head
):
    # The reference ignores return_dict=False and returns its output object; indexing that object by
    # position reads its to_tuple(), which holds context_input_ids=(None,) when nothing is returned.
    # ragkit returns a real tuple in the same order, without that placeholder (context_input_ids is None).
    pair = pairs(head, "bart")
    kwargs = {"input_ids": questions.input_ids, "attention_mask": questions.attention_mask}
    kwargs.update({"decoder_input_ids": labels} if head == "model" else {"labels": labels})
    for output_retrieved in (False, True):
        ref, ours = _call_both(pair, **kwargs, output_retrieved=output_retrieved, return_dict=False)
        assert isinstance(ours, tuple) and not isinstance(ours, transformers.utils.ModelOutput)
        expected = [v for v in ref.to_tuple() if not (isinstance(v, tuple) and v == (None,))]
        assert len(ours) == len(expected), f"output_retrieved={output_retrieved}"
        as_output = pair.ours(**kwargs, output_retrieved=output_retrieved)
        as_dict = as_output.to_tuple()
        names = [name for name, value in as_output.items() if value is not None]
        assert len(names) == len(ours)
        compared = []
        for position, (name, theirs, mine, from_dict) in enumerate(zip(names, expected, ours, as_dict)):
            assert type(mine) is type(theirs), f"position {position} ({name})"
            if isinstance(mine, torch.Tensor):
                if name == "generator_enc_last_hidden_state":
                    continue  # padding positions differ (documented)
                compared.append(name)
                _close(theirs, mine, f"tuple position {position}")
                _close(from_dict, mine, f"tuple position {position} vs to_tuple()")
        if output_retrieved:
            assert "retrieved_doc_embeds" in compared
        if head != "model":
            _close(ref.loss, ours[0], "loss first")


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", list(HEADS))
def test_every_output_field_is_none_where_the_reference_has_none(
    pairs, questions, labels, head, generator_kind
):
    # Field by field, for the calls users make; the documented differences are listed explicitly.
    pair = pairs(head, generator_kind)
    base = {"input_ids": questions.input_ids, "attention_mask": questions.attention_mask}
    calls = [
        {"decoder_input_ids": labels},
        {"decoder_input_ids": labels, "use_cache": False},
        {"decoder_input_ids": labels, "output_retrieved": True},
        {"decoder_input_ids": labels, "output_hidden_states": True},
    ]
    if head != "model":
        calls.append({"labels": labels})
    contexts = retrieved_contexts(pair, questions)
    calls.append({"decoder_input_ids": labels, "output_retrieved": True, **contexts})  # nothing retrieved
    filled_by_ragkit_only = {
        "question_enc_hidden_states",
        "generator_enc_hidden_states",
        "generator_dec_hidden_states",
    }
    for extra in calls:
        ref, ours = _call_both(pair, **base, **extra)
        for field in ref.__dataclass_fields__:
            theirs, mine = getattr(ref, field), getattr(ours, field)
            if field == "context_input_ids" and theirs == (None,):
                assert mine is None, f"{extra}: context_input_ids"
            elif extra.get("output_hidden_states") and field in filled_by_ragkit_only:
                assert theirs is None and len(mine) > 0, f"{extra}: {field}"
            else:
                assert (theirs is None) == (mine is None), f"{extra}: {field} {type(theirs)} vs {type(mine)}"
            if isinstance(theirs, torch.Tensor) and field != "generator_enc_last_hidden_state":
                _close(theirs, mine, f"{extra}: {field}")


# --- forward: config-level switches, combined loss options, n_docs, masks, encoder outputs ------------


@pytest.mark.parametrize(
    "head,fields",
    [
        ("sequence", {"reduce_loss": True}),
        ("sequence", {"exclude_bos_score": True, "reduce_loss": True}),
        ("sequence", {"label_smoothing": 0.1, "reduce_loss": True}),
        ("token", {"reduce_loss": True}),
        ("token", {"do_marginalize": True}),
        ("token", {"label_smoothing": 0.2, "do_marginalize": True}),
        ("sequence", {"n_docs": 2}),
        ("token", {"n_docs": 2}),
        ("model", {"n_docs": 2}),
    ],
)
def test_config_fields_are_the_defaults_of_forward(pairs, questions, labels, head, fields):
    # Options left to None read the config, as in the reference (the retriever then fetches config.n_docs).
    pair = pairs(head, "bart")
    kwargs = {"input_ids": questions.input_ids, "attention_mask": questions.attention_mask}
    kwargs.update({"decoder_input_ids": labels} if head == "model" else {"labels": labels})
    with _ConfigFields(pair, **fields):
        ref, ours = _call_both(pair, **kwargs)
    _, plain = _call_both(pair, **kwargs)
    if head != "model":
        _close(ref.loss, ours.loss, f"loss with config {fields}")
    _close(ref.logits, ours.logits, f"logits with config {fields}")
    changed = [
        a.shape != b.shape or (a - b).abs().max() > 1e-4
        for a, b in ((ours.logits, plain.logits), (getattr(ours, "loss", None), getattr(plain, "loss", None)))
        if a is not None
    ]
    assert any(changed), f"config {fields} had no effect"
    _close(ref.doc_scores, ours.doc_scores, f"doc_scores with config {fields}")


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_config_output_retrieved_and_use_cache(pairs, questions, labels, generator_kind):
    pair = pairs("token", generator_kind)
    kwargs = {"input_ids": questions.input_ids, "decoder_input_ids": labels}
    with _ConfigFields(pair, output_retrieved=True, use_cache=False):
        ref, ours = _call_both(pair, **kwargs)
    assert ref.cache is None and ours.cache is None
    assert torch.equal(ref.context_input_ids, ours.context_input_ids)
    assert torch.equal(torch.as_tensor(ref.retrieved_doc_ids), torch.as_tensor(ours.retrieved_doc_ids))
    _close(ref.retrieved_doc_embeds, ours.retrieved_doc_embeds, "retrieved_doc_embeds")
    _close(ref.logits, ours.logits, "logits")


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize(
    "options",
    [
        {"reduce_loss": True},
        {"exclude_bos_score": True},
        {"exclude_bos_score": True, "reduce_loss": True},
        {"n_docs": 2},
        {"n_docs": 2, "reduce_loss": True},
    ],
    ids=str,
)
def test_sequence_loss_options_with_label_smoothing(pairs, questions, labels, generator_kind, options):
    pair = pairs("sequence", generator_kind)
    contexts = retrieved_contexts(pair, questions, n_docs=options.get("n_docs"))
    with _ConfigFields(pair, label_smoothing=0.1):
        ref, ours = _call_both(pair, **contexts, labels=labels, **options)
    _close(ref.loss, ours.loss, f"loss {options} label_smoothing=0.1")
    _close(ref.logits, ours.logits, f"logits {options}")


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize(
    "options",
    [
        {"reduce_loss": True},
        {"do_marginalize": True, "reduce_loss": True},
        {"n_docs": 2, "do_marginalize": True},
    ],
    ids=str,
)
def test_token_loss_options_with_label_smoothing(pairs, questions, labels, generator_kind, options):
    pair = pairs("token", generator_kind)
    contexts = retrieved_contexts(pair, questions, n_docs=options.get("n_docs"))
    with _ConfigFields(pair, label_smoothing=0.2):
        ref, ours = _call_both(pair, **contexts, labels=labels, **options)
    _close(ref.loss, ours.loss, f"loss {options} label_smoothing=0.2")
    _close(ref.logits, ours.logits, f"logits {options}")


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", ["model", "sequence"])
def test_n_docs_at_call_time(pairs, questions, labels, head, generator_kind):
    pair = pairs(head, generator_kind)
    target = {"decoder_input_ids": labels} if head == "model" else {"labels": labels}
    for n_docs in (1, 2):
        ref, ours = _call_both(
            pair, input_ids=questions.input_ids, n_docs=n_docs, output_retrieved=True, **target
        )
        assert ours.doc_scores.shape == (2, n_docs)
        assert ours.context_input_ids.shape[0] == 2 * n_docs
        _close(ref.logits, ours.logits, f"logits n_docs={n_docs}")
        _close(ref.doc_scores, ours.doc_scores, f"doc_scores n_docs={n_docs}")
        if head != "model":
            _close(ref.loss, ours.loss, f"loss n_docs={n_docs}")
        contexts = retrieved_contexts(pair, questions, n_docs=n_docs)
        ref, ours = _call_both(pair, **contexts, n_docs=n_docs, **target)
        _close(ref.logits, ours.logits, f"logits n_docs={n_docs} from contexts")


@pytest.mark.parametrize("head", list(HEADS))
def test_decoder_attention_mask_is_repeated_per_document(pairs, questions, labels, head):
    pair = pairs(head, "bart")
    mask = torch.ones_like(labels)
    mask[0, 2:] = 0
    target = {"decoder_input_ids": labels, "decoder_attention_mask": mask}
    if head != "model":
        target["labels"] = labels
    ref, ours = _call_both(pair, input_ids=questions.input_ids, **target)
    _close(ref.logits, ours.logits, "logits with decoder_attention_mask")
    _, unmasked = _call_both(pair, input_ids=questions.input_ids, decoder_input_ids=labels)
    assert (ours.logits - unmasked.logits).abs().max() > 1e-4, "the mask must change the logits"


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", list(HEADS))
def test_precomputed_encoder_outputs_with_doc_scores(pairs, questions, labels, head, generator_kind):
    # As RAG-Token generation does: the generator's encoder ran once, only the decoder runs now.
    pair = pairs(head, generator_kind)
    contexts = retrieved_contexts(pair, questions)
    with torch.no_grad():
        encoder = pair.ours.generator.get_encoder()
        encoder_outputs = encoder(
            input_ids=contexts["context_input_ids"],
            attention_mask=contexts["context_attention_mask"],
            return_dict=True,
        )
    kwargs = {
        "encoder_outputs": encoder_outputs,
        "doc_scores": contexts["doc_scores"],
        "attention_mask": contexts["context_attention_mask"],
        "context_attention_mask": contexts["context_attention_mask"],
        "decoder_input_ids": labels,
    }
    ref, ours = _call_both(pair, **kwargs)
    _close(ref.logits, ours.logits, "logits from encoder_outputs")
    full_ref, _ = _call_both(pair, **contexts, decoder_input_ids=labels)
    _close(full_ref.logits, ours.logits, "encoder_outputs vs contexts")
    assert ours.question_encoder_last_hidden_state is None


@pytest.mark.parametrize("head", list(HEADS))
def test_contexts_without_doc_scores_are_retrieved_again(pairs, questions, labels, head):
    # With a retriever, contexts are only used when all three of ids, mask and doc scores are given.
    pair = pairs(head, "bart")
    contexts = retrieved_contexts(pair, questions, n_docs=pair.config.n_docs)
    contexts.pop("doc_scores")
    ref, ours = _call_both(pair, input_ids=questions.input_ids, decoder_input_ids=labels, **contexts)
    _close(ref.logits, ours.logits, "logits")
    _close(ref.doc_scores, ours.doc_scores, "doc_scores")
    assert ours.question_encoder_last_hidden_state is not None


# --- generate ----------------------------------------------------------------------------------------

_TOKEN_GENERATE_CASES = [
    {"bad_words_ids": [[5], [6, 7]], "num_beams": 2},
    {"forced_bos_token_id": 0, "num_beams": 3, "num_return_sequences": 2},
    {"num_beams": 3, "length_penalty": -2.0, "early_stopping": True},
    {"num_beams": 3, "length_penalty": 3.0, "early_stopping": "never"},
    {"repetition_penalty": 1.5},
    {"min_new_tokens": 4, "num_beams": 2},
    {"min_length": 6},
    {"num_beams": 4, "num_return_sequences": 4, "output_scores": True},
]


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("options", _TOKEN_GENERATE_CASES, ids=str)
def test_token_generate_options_on_given_contexts(pairs, questions, generator_kind, options):
    pair = pairs("token", generator_kind)
    if generator_kind == "t5" and "forced_bos_token_id" in options:
        options = {**options, "forced_bos_token_id": 5}
    contexts = retrieved_contexts(pair, questions)
    ref, ours = _generate_both(pair, **contexts, max_length=MAX_LENGTH, **options)
    _same_ids(ref, ours)


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_token_generate_returns_the_reference_dict_when_asked(pairs, questions, generator_kind):
    pair = pairs("token", generator_kind)
    contexts = retrieved_contexts(pair, questions)
    for options in ({"num_beams": 1}, {"num_beams": 3, "num_return_sequences": 2}):
        kwargs = dict(
            **contexts,
            max_length=MAX_LENGTH,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            **options,
        )
        ref, ours = _generate_both(pair, **kwargs)
        assert type(ref) is type(ours)
        _same_ids(ref.sequences, ours.sequences)
        assert len(ref.scores) == len(ours.scores)
        for step, (theirs, mine) in enumerate(zip(ref.scores, ours.scores)):
            finite = torch.isfinite(theirs)
            assert torch.equal(finite, torch.isfinite(mine)), f"step {step}: masked tokens"
            _close(theirs[finite], mine[finite], f"scores step {step}")
        if options["num_beams"] > 1:
            _close(ref.sequences_scores, ours.sequences_scores, "sequences_scores")


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_token_generate_reads_n_docs_from_the_config(pairs, questions, generator_kind):
    pair = pairs("token", generator_kind)
    with _ConfigFields(pair, n_docs=2):
        ref, ours = _generate_both(pair, input_ids=questions.input_ids, num_beams=2, max_length=MAX_LENGTH)
    _same_ids(ref, ours)


def _unpadded_contexts(pair, questions) -> dict:
    """Retrieved contexts cut to the shortest real context, so that no row holds padding.

    The reference's RAG-Sequence generate attends to context padding (a documented difference); on
    contexts without padding its output is the one ragkit must reproduce.
    """
    contexts = retrieved_contexts(pair, questions)
    width = int(contexts["context_attention_mask"].sum(1).min())
    contexts["context_input_ids"] = contexts["context_input_ids"][:, :width].contiguous()
    contexts["context_attention_mask"] = contexts["context_attention_mask"][:, :width].contiguous()
    assert bool(contexts["context_attention_mask"].bool().all())
    return contexts


_SEQUENCE_GENERATE_CASES = [
    {"bad_words_ids": [[5], [6, 7]], "num_beams": 2},
    {"num_beams": 3, "length_penalty": -2.0, "early_stopping": True, "num_return_sequences": 2},
    {"num_beams": 2, "num_return_sequences": 2, "do_deduplication": False},
    {"repetition_penalty": 1.5, "num_beams": 2},
    {"min_new_tokens": 3},
]


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("options", _SEQUENCE_GENERATE_CASES, ids=str)
def test_sequence_generate_options_on_given_contexts(pairs, questions, generator_kind, options):
    pair = pairs("sequence", generator_kind)
    contexts = _unpadded_contexts(pair, questions)
    ref, ours = _generate_both(pair, **contexts, max_length=MAX_LENGTH, **options)
    _same_ids(ref, ours)


def test_sequence_generate_with_prefix_allowed_tokens_fn(pairs, questions):
    pair = pairs("sequence", "bart")
    contexts = _unpadded_contexts(pair, questions)
    allowed = list(range(2, 120))

    def only_low_ids(batch_id: int, ids: torch.Tensor) -> list[int]:
        return allowed

    ref, ours = _generate_both(
        pair, **contexts, prefix_allowed_tokens_fn=only_low_ids, num_beams=2, max_length=MAX_LENGTH
    )
    _same_ids(ref, ours)
    assert all(t in allowed or t in (0, 1) for t in ours.flatten().tolist())


def test_sequence_sampling_draws_the_reference_samples_one_question_at_a_time(pairs, questions):
    # The reference samples one question after the other; ragkit samples the whole batch in one search,
    # so a fixed seed gives other (equally distributed) draws, and the reference's with questions_per_batch=1.
    pair = pairs("sequence", "bart")
    contexts = _unpadded_contexts(pair, questions)
    for options in (
        {"do_sample": True, "top_k": 20},
        {"do_sample": True, "num_beams": 2, "num_return_sequences": 2},
    ):
        kwargs = dict(**contexts, max_length=MAX_LENGTH, **options)
        with torch.no_grad():
            torch.manual_seed(7)
            ref = pair.reference.generate(**kwargs)
            torch.manual_seed(7)
            one_at_a_time = pair.ours.generate(**kwargs, questions_per_batch=1)
            torch.manual_seed(7)
            batched = pair.ours.generate(**kwargs)
            torch.manual_seed(7)
            again = pair.ours.generate(**kwargs)
        _same_ids(ref, one_at_a_time)
        assert batched.shape[0] == ref.shape[0]
        _same_ids(batched, again)  # reproducible under a seed


# --- embeddings, checkpoints, config -----------------------------------------------------------------


def _outcome(call):
    try:
        return "value", call()
    except Exception as error:  # the error type is what is compared
        return "error", type(error)


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", list(HEADS))
def test_embedding_accessors_return_what_the_reference_returns(retrievers, head, generator_kind):
    pair = build_pair(head, generator_kind, retrievers, seed=5)  # own modules: resizing is attempted below
    for method in ("get_input_embeddings", "get_output_embeddings"):
        theirs = _outcome(getattr(pair.reference, method))
        mine = _outcome(getattr(pair.ours, method))
        assert theirs[0] == mine[0], f"{method}: {theirs} vs {mine}"
        # Both models share their modules, so the same object (or the same error type) comes back.
        assert theirs[1] is mine[1], f"{method}: {theirs} vs {mine}"
    if head == "token":
        assert pair.ours.get_input_embeddings() is pair.ours.generator.get_input_embeddings()
        assert pair.ours.get_output_embeddings() is pair.ours.generator.get_output_embeddings()
    # The reference raises NotImplementedError (after resizing half of the generator); ragkit resizes the
    # generator whole (tests/modeling/test_resize_embeddings.py).
    theirs = _outcome(lambda: copy.deepcopy(pair.reference).resize_token_embeddings(410))
    assert theirs == ("error", NotImplementedError)
    resized = copy.deepcopy(pair.ours)
    assert resized.resize_token_embeddings(410) is resized.generator.get_input_embeddings()
    assert resized.generator.get_output_embeddings().weight.shape[0] == 410
    assert resized.config.generator.vocab_size == 410


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", list(HEADS))
def test_saved_files_equal_the_references(tmp_path, pairs, head, generator_kind):
    pair = pairs(head, generator_kind)
    pair.reference.save_pretrained(tmp_path / "reference")
    pair.ours.save_pretrained(tmp_path / "ragkit")
    theirs, ours = (
        load_file(tmp_path / "reference" / "model.safetensors"),
        load_file(tmp_path / "ragkit" / "model.safetensors"),
    )
    assert sorted(ours) == sorted(theirs)
    # Every stored tensor under the reference's state_dict name (tied copies are stored once, as there).
    assert set(ours) <= set(pair.reference.state_dict())
    for key in theirs:
        assert torch.equal(theirs[key], ours[key]), key
    assert sorted(p.name for p in (tmp_path / "ragkit").iterdir()) == sorted(
        p.name for p in (tmp_path / "reference").iterdir()
    )
    config_theirs = json.loads((tmp_path / "reference" / "config.json").read_text())
    config_ours = json.loads((tmp_path / "ragkit" / "config.json").read_text())
    if generator_kind == "t5":
        # rag_helpers gives the reference's T5 config a bos_token_id (None) that T5Config lacks.
        assert config_theirs["generator"].pop("bos_token_id") is None
    _assert_same_config_dicts(config_theirs, config_ours)


_RAGKIT_ONLY_FIELDS = {
    "index_nprobe",
    "index_ef_search",
    "embeddings_name",
    "question_encoder_pooling",
    "question_encoder_normalize",
    # In the documented (Transformers 4) RagConfig signature; Transformers 5 dropped it from RagConfig.
    "forced_eos_token_id",
}


def _assert_same_config_dicts(theirs: dict, ours: dict, where: str = "") -> None:
    """Equal, apart from ragkit's own fields, which hold their defaults or given values."""
    missing = set(theirs) - set(ours)
    assert not missing, f"{where}fields the reference writes and ragkit does not: {sorted(missing)}"
    extra = set(ours) - set(theirs) - _RAGKIT_ONLY_FIELDS
    assert not extra, f"{where}fields only ragkit writes: {sorted(extra)}"
    for key, value in theirs.items():
        if key == "transformers_version":
            continue
        if isinstance(value, dict):
            _assert_same_config_dicts(value, ours[key], f"{where}{key}.")
        else:
            assert ours[key] == value, f"{where}{key}: {ours[key]!r} != {value!r}"


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"n_docs": 2, "reduce_loss": True, "label_smoothing": 0.1, "do_marginalize": True},
        {"index_name": "custom", "passages_path": "/p", "index_path": "/i", "use_dummy_dataset": True},
        {"output_retrieved": True, "use_cache": False, "exclude_bos_score": True, "do_deduplication": False},
        {"title_sep": " | ", "doc_sep": " || ", "max_combined_length": 64, "retrieval_batch_size": 3},
    ],
    ids=str,
)
@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_config_to_dict_equals_the_references(generator_kind, fields):
    from ragkit.testing import tiny_rag_config

    ours = tiny_rag_config(generator_kind, hidden_size=32)
    parts = {"question_encoder": ours.question_encoder.to_dict(), "generator": ours.generator.to_dict()}
    mine = ragkit.RagConfig(**parts, **fields)
    theirs = transformers.RagConfig(**parts, **fields)
    _assert_same_config_dicts(theirs.to_dict(), mine.to_dict())
    _assert_same_config_dicts(theirs.to_diff_dict(), mine.to_diff_dict())
    # from the sub-configs, as consolidate scripts build it
    mine = ragkit.RagConfig.from_question_encoder_generator_configs(
        ours.question_encoder, ours.generator, **fields
    )
    theirs = transformers.RagConfig.from_question_encoder_generator_configs(
        transformers.DPRConfig(**parts["question_encoder"]),
        type(theirs.generator)(**parts["generator"]),
        **fields,
    )
    _assert_same_config_dicts(theirs.to_dict(), mine.to_dict())


# --- tokenizer and retriever -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rag_tokenizers(question_encoder_tokenizer, generator_tokenizer):
    return (
        transformers.RagTokenizer(question_encoder=question_encoder_tokenizer, generator=generator_tokenizer),
        ragkit.RagTokenizer(question_encoder=question_encoder_tokenizer, generator=generator_tokenizer),
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"padding": True},
        {"padding": "max_length", "max_length": 12, "truncation": True},
        {"return_tensors": "pt", "padding": True},
        {"return_tensors": "np", "padding": True, "return_token_type_ids": False},
        {"add_special_tokens": False},
    ],
    ids=str,
)
def test_tokenizer_call_on_questions_equals_the_references(rag_tokenizers, options):
    theirs, ours = rag_tokenizers
    texts = ["How many people live in Paris?", "Which river flows through London and then Oxford?"]
    expected, got = theirs(texts, **options), ours(texts, **options)
    assert type(got) is type(expected) and set(got) == set(expected)
    for key in expected:
        assert type(got[key]) is type(expected[key]), key
        assert _as_lists(got[key]) == _as_lists(expected[key]), key
    single_theirs, single_ours = theirs(texts[0], **options), ours(texts[0], **options)
    for key in single_theirs:
        assert _as_lists(single_ours[key]) == _as_lists(single_theirs[key]), key


def _as_lists(value):
    return value.tolist() if hasattr(value, "tolist") else value


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_tokenizer_decodes_with_the_generator_vocabulary(
    rag_tokenizers, generator_tokenizer, skip_special_tokens
):
    theirs, ours = rag_tokenizers
    ids = generator_tokenizer(["about 2 million", "the Thames"], padding=True, return_tensors="pt").input_ids
    kwargs = {"skip_special_tokens": skip_special_tokens}
    assert ours.batch_decode(ids, **kwargs) == theirs.batch_decode(ids, **kwargs)
    assert ours.batch_decode(ids.tolist(), **kwargs) == theirs.batch_decode(ids.tolist(), **kwargs)
    assert ours.decode(ids[0], **kwargs) == theirs.decode(ids[0], **kwargs)
    assert ours.decode(ids[1].tolist(), **kwargs) == theirs.decode(ids[1].tolist(), **kwargs)
    assert ours.question_encoder is theirs.question_encoder and ours.generator is theirs.generator
    assert ours.current_tokenizer is ours.question_encoder  # questions by default, as in the reference


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("return_tensors", [None, "np", "pt"])
def test_retriever_call_output_types_and_values(retrievers, questions, generator_kind, return_tensors):
    ref, ours = retrievers[generator_kind]
    vectors = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
    for options in ({}, {"n_docs": 2}, {"prefix": "question: "}, {"n_docs": 4, "prefix": "q "}):
        expected = ref(questions.input_ids, vectors, return_tensors=return_tensors, **options)
        got = ours(questions.input_ids, vectors, return_tensors=return_tensors, **options)
        assert type(got) is type(expected), options
        assert list(got.keys()) == list(expected.keys()), options
        for key in expected:
            assert type(got[key]) is type(expected[key]), f"{options} {key}"
            if isinstance(expected[key], (np.ndarray, torch.Tensor)):
                assert got[key].dtype == expected[key].dtype, f"{options} {key}"
            np.testing.assert_array_equal(
                np.asarray(got[key]), np.asarray(expected[key]), err_msg=f"{options} {key}"
            )


@pytest.mark.parametrize(
    "fields",
    [{"title_sep": " | ", "doc_sep": " || "}, {"max_combined_length": 20}],
    ids=str,
)
def test_retriever_reads_the_context_fields_of_its_config(retrievers, questions, fields):
    ref, ours = retrievers["bart"]
    vectors = np.random.default_rng(4).standard_normal((2, 32)).astype(np.float32)
    saved = [{k: getattr(r.config, k) for k in fields} for r in (ref, ours)]
    try:
        for retriever in (ref, ours):
            for key, value in fields.items():
                setattr(retriever.config, key, value)
        expected = ref(questions.input_ids, vectors, return_tensors="pt")
        got = ours(questions.input_ids, vectors, return_tensors="pt")
    finally:
        for retriever, values in zip((ref, ours), saved):
            for key, value in values.items():
                setattr(retriever.config, key, value)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    default = ours(questions.input_ids, vectors, return_tensors="pt")
    assert not all(
        default[k].shape == got[k].shape and torch.equal(default[k], got[k])
        for k in ("context_input_ids", "doc_ids")
    ), "the config change had no effect"


# --- forward: inputs given in other combinations -----------------------------------------------------


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", ["sequence", "token"])
def test_labels_with_their_own_decoder_input_ids(pairs, questions, labels, head, generator_kind):
    # Teacher forcing on decoder_input_ids while the loss reads labels, as the reference does.
    pair = pairs(head, generator_kind)
    contexts = retrieved_contexts(pair, questions)
    shifted = pair.ours.generator.config.decoder_start_token_id * torch.ones_like(labels)
    shifted[:, 1:] = labels[:, :-1]
    for decoder_input_ids in (labels, shifted):
        ref, ours = _call_both(pair, **contexts, labels=labels, decoder_input_ids=decoder_input_ids)
        _close(ref.loss, ours.loss, "loss")
        _close(ref.logits, ours.logits, "logits")


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", list(HEADS))
def test_encoder_outputs_as_a_plain_tuple(pairs, questions, labels, head, generator_kind):
    pair = pairs(head, generator_kind)
    contexts = retrieved_contexts(pair, questions)
    with torch.no_grad():
        hidden = pair.ours.generator.get_encoder()(
            input_ids=contexts["context_input_ids"], attention_mask=contexts["context_attention_mask"]
        ).last_hidden_state
    kwargs = {
        "encoder_outputs": (hidden,),
        "doc_scores": contexts["doc_scores"],
        "context_attention_mask": contexts["context_attention_mask"],
        "attention_mask": contexts["context_attention_mask"],
        "decoder_input_ids": labels,
    }
    ref, ours = _call_both(pair, **kwargs)
    _close(ref.logits, ours.logits, "logits from a tuple of encoder outputs")


@pytest.mark.parametrize("head", list(HEADS))
def test_given_contexts_win_over_input_ids(pairs, questions, labels, head):
    # With all three of context ids, mask and doc scores, nothing is retrieved and input_ids are not encoded.
    pair = pairs(head, "bart")
    contexts = retrieved_contexts(pair, questions, n_docs=2)
    target = {"decoder_input_ids": labels} if head == "model" else {"labels": labels}
    ref, ours = _call_both(pair, input_ids=questions.input_ids, **contexts, n_docs=2, **target)
    _close(ref.logits, ours.logits, "logits")
    _close(contexts["doc_scores"], ours.doc_scores, "doc_scores are the given ones")
    assert ours.question_encoder_last_hidden_state is None is ref.question_encoder_last_hidden_state
    if head != "model":
        _close(ref.loss, ours.loss, "loss")


# --- public helpers of the heads ---------------------------------------------------------------------


def _random_logits(pair, n_docs: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    vocab = pair.config.generator.vocab_size
    return torch.randn(2 * n_docs, length, vocab, generator=generator), torch.randn(
        2, n_docs, generator=generator
    )


@pytest.mark.parametrize("n_docs", [None, 2])
def test_sequence_get_nll_equals_the_references(pairs, labels, n_docs):
    pair = pairs("sequence", "bart")
    seq_logits, doc_scores = _random_logits(pair, n_docs or pair.config.n_docs, labels.shape[1], seed=11)
    for options in (
        {},
        {"reduce_loss": True},
        {"epsilon": 0.1},
        {"exclude_bos_score": True, "epsilon": 0.2, "reduce_loss": True},
    ):
        theirs = pair.reference.get_nll(seq_logits, doc_scores, labels, n_docs=n_docs, **options)
        ours = pair.ours.get_nll(seq_logits, doc_scores, labels, n_docs=n_docs, **options)
        _close_relative(theirs, ours, f"get_nll {options} n_docs={n_docs}")


@pytest.mark.parametrize("n_docs", [None, 2])
def test_token_helpers_equal_the_references(pairs, labels, n_docs):
    pair = pairs("token", "bart")
    seq_logits, doc_scores = _random_logits(pair, n_docs or pair.config.n_docs, labels.shape[1], seed=12)
    _close(
        pair.reference.marginalize(seq_logits, doc_scores, n_docs=n_docs),
        pair.ours.marginalize(seq_logits, doc_scores, n_docs=n_docs),
        "marginalize",
    )
    for options in ({}, {"reduce_loss": True}, {"epsilon": 0.1}, {"epsilon": 0.3, "reduce_loss": True}):
        theirs = pair.reference.get_nll(seq_logits, doc_scores, labels, n_docs=n_docs, **options)
        ours = pair.ours.get_nll(seq_logits, doc_scores, labels, n_docs=n_docs, **options)
        _close_relative(theirs, ours, f"get_nll {options} n_docs={n_docs}")
    for start in (None, 7):
        assert torch.equal(
            pair.ours.shift_tokens_right(labels, start), pair.reference.shift_tokens_right(labels, start)
        )


# --- generate: more input combinations ---------------------------------------------------------------


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", ["sequence", "token"])
def test_generate_without_cache_and_with_overridden_special_tokens(pairs, questions, head, generator_kind):
    pair = pairs(head, generator_kind)
    contexts = _unpadded_contexts(pair, questions)
    for options in (
        {"use_cache": False, "num_beams": 2},
        {"decoder_start_token_id": 3, "eos_token_id": 5},
        {"pad_token_id": 4, "num_beams": 2, "num_return_sequences": 2},
    ):
        ref, ours = _generate_both(pair, **contexts, max_length=MAX_LENGTH, **options)
        _same_ids(ref, ours)
        if "decoder_start_token_id" in options:
            assert ours[:, 0].eq(3).all()


def test_token_generate_prefers_given_contexts_to_input_ids(pairs, questions):
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions, n_docs=2)
    kwargs = dict(**contexts, n_docs=2, num_beams=2, max_length=MAX_LENGTH)
    ref, ours = _generate_both(
        pair, input_ids=questions.input_ids, attention_mask=questions.attention_mask, **kwargs
    )
    _same_ids(ref, ours)
    _same_ids(ours, pair.ours.generate(**kwargs))


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_sequence_generate_scores_the_given_contexts_even_with_input_ids(pairs, questions, generator_kind):
    # The reference decodes the given contexts but, when input_ids are passed too, scores the hypotheses
    # against documents it retrieves again for those input_ids (and their doc scores), ignoring the given
    # ones. ragkit scores against the contexts and doc scores it was given, so input_ids change nothing.
    pair = pairs("sequence", generator_kind)
    contexts = _unpadded_contexts(pair, questions)
    contexts["doc_scores"] = contexts["doc_scores"].flip(1)  # scores the retriever would not give
    kwargs = dict(**contexts, num_beams=2, num_return_sequences=2, max_length=MAX_LENGTH)
    with torch.no_grad():
        ours = pair.ours.generate(
            input_ids=questions.input_ids, attention_mask=questions.attention_mask, **kwargs
        )
        context_only = pair.ours.generate(**kwargs)
        reference_context_only = pair.reference.generate(**kwargs)
        reference = pair.reference.generate(input_ids=questions.input_ids, **kwargs)
    _same_ids(reference_context_only, context_only)
    _same_ids(context_only, ours)
    assert not torch.equal(reference, reference_context_only), "the reference re-retrieves to score"


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_sequence_generate_returns_more_answers_than_beams(pairs, questions, generator_kind):
    # The candidates are num_beams per document, so num_return_sequences may exceed num_beams.
    pair = pairs("sequence", generator_kind)
    contexts = _unpadded_contexts(pair, questions)
    for options in (
        {"num_beams": 1, "num_return_sequences": 2},
        {"num_beams": 2, "num_return_sequences": 3},
        {"num_beams": 1, "num_return_sequences": 3, "do_deduplication": False},
    ):
        ref, ours = _generate_both(pair, **contexts, max_length=MAX_LENGTH, **options)
        _same_ids(ref, ours)
        assert ours.shape[0] == 2 * options["num_return_sequences"]


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_token_generate_refuses_what_the_reference_refuses(pairs, questions, generator_kind):
    pair = pairs("token", generator_kind)
    contexts = retrieved_contexts(pair, questions)
    for options in ({"num_beams": 1, "num_return_sequences": 2}, {"num_beams": 2, "num_return_sequences": 3}):
        with pytest.raises(ValueError):
            pair.reference.generate(**contexts, max_length=MAX_LENGTH, **options)
        with pytest.raises(ValueError, match="num_return_sequences"):
            pair.ours.generate(**contexts, max_length=MAX_LENGTH, **options)


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize(
    "options",
    [{"num_beams": 2}, {"temperature": 0.7, "top_p": 0.9}, {"top_k": 3, "temperature": 1.5}],
    ids=str,
)
def test_token_sampling_variants_draw_the_reference_samples(pairs, questions, generator_kind, options):
    pair = pairs("token", generator_kind)
    contexts = retrieved_contexts(pair, questions)
    with torch.no_grad():
        torch.manual_seed(21)
        ref = pair.reference.generate(**contexts, do_sample=True, max_length=MAX_LENGTH, **options)
        torch.manual_seed(21)
        ours = pair.ours.generate(**contexts, do_sample=True, max_length=MAX_LENGTH, **options)
    _same_ids(ref, ours)


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", list(HEADS))
def test_generator_prefix_reaches_the_retrieved_contexts(pairs, questions, labels, head, generator_kind):
    # T5-style task prefixes: the generator config's `prefix` is put before each question in the contexts.
    pair = pairs(head, generator_kind)
    generator_config = pair.ours.generator.config
    assert generator_config is pair.reference.generator.config
    saved = getattr(generator_config, "prefix", None)
    generator_config.prefix = "answer the question: "
    try:
        ref, ours = _call_both(
            pair, input_ids=questions.input_ids, decoder_input_ids=labels, output_retrieved=True
        )
    finally:
        generator_config.prefix = saved
    _, plain = _call_both(
        pair, input_ids=questions.input_ids, decoder_input_ids=labels, output_retrieved=True
    )
    assert torch.equal(ref.context_input_ids, ours.context_input_ids)
    assert ours.context_input_ids.shape != plain.context_input_ids.shape or not torch.equal(
        ours.context_input_ids, plain.context_input_ids
    )
    _close(ref.logits, ours.logits, "logits with a generator prefix")


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", list(HEADS))
def test_decoding_step_by_step_with_the_cache(pairs, questions, head, generator_kind):
    # Each step feeds one token and the previous cache; the reference takes it as `cache`, ragkit as either name.
    pair = pairs(head, generator_kind)
    contexts = retrieved_contexts(pair, questions)
    start = torch.full((2, 1), pair.ours.generator.config.decoder_start_token_id)
    steps = [start, torch.tensor([[7], [9]]), torch.tensor([[11], [13]])]
    with torch.no_grad():
        ref = pair.reference(**contexts, decoder_input_ids=steps[0], use_cache=True)
        ours = pair.ours(**contexts, decoder_input_ids=steps[0], use_cache=True)
        ref_cache, our_cache = ref.cache, ours.cache
        for step in steps[1:]:
            ref = pair.reference(**contexts, decoder_input_ids=step, cache=ref_cache, use_cache=True)
            ours = pair.ours(**contexts, decoder_input_ids=step, past_key_values=our_cache, use_cache=True)
            _close(ref.logits, ours.logits, "cached step logits")
            _close(ref.doc_scores, ours.doc_scores, "cached step doc_scores")
            ref_cache, our_cache = ref.cache, ours.cache
        assert our_cache.get_seq_length() == ref_cache.get_seq_length() == len(steps)
        full = pair.ours(**contexts, decoder_input_ids=torch.cat(steps, 1), use_cache=False)
    _close(full.logits[:, -1:], ours.logits, "cached steps vs one full pass")


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", list(HEADS))
def test_generation_config_and_config_built_from_the_parts(pairs, head, generator_kind):
    pair = pairs(head, generator_kind)
    theirs = getattr(pair.reference, "generation_config", None)
    mine = getattr(pair.ours, "generation_config", None)
    assert (theirs is None) == (mine is None)
    if theirs is not None:
        assert mine.to_dict() == theirs.to_dict()
    # Built from a question encoder and a generator alone, the config is the reference's.
    reference = getattr(transformers, HEADS[head])(
        question_encoder=pair.reference.question_encoder, generator=pair.reference.generator
    )
    ours = getattr(ragkit, HEADS[head])(
        question_encoder=pair.ours.question_encoder, generator=pair.ours.generator
    )
    expected = reference.config.to_dict()
    got = {k: v for k, v in ours.config.to_dict().items() if k not in _RAGKIT_ONLY_FIELDS}
    for key in ("question_encoder", "generator", "transformers_version"):
        expected.pop(key), got.pop(key)
    assert got == expected


def test_sequence_generate_honours_n_docs_with_the_retriever(pairs, questions):
    # Documented fix (Transformers issue 14394): retrieval and scoring both use the n_docs of the call, so
    # generating with the retriever equals generating on the contexts it retrieves for that n_docs.
    pair = pairs("sequence", "bart")
    question = {"input_ids": questions.input_ids[:1], "attention_mask": questions.attention_mask[:1]}
    contexts = retrieved_contexts(pair, type(questions)(question), n_docs=2)
    kwargs = dict(n_docs=2, num_beams=2, num_return_sequences=2, max_length=MAX_LENGTH)
    with torch.no_grad():
        with_retriever = pair.ours.generate(**question, **kwargs)
        from_contexts = pair.ours.generate(**contexts, **kwargs)
    _same_ids(with_retriever, from_contexts)


@pytest.mark.parametrize(
    "settings",
    [
        {"max_length": 5},
        {"max_new_tokens": 3, "num_beams": 2},
        {
            "max_length": 8,
            "min_length": 6,
            "forced_bos_token_id": 0,
            "eos_token_id": 2,
            "decoder_start_token_id": 2,
        },
        # As in the reference, RAG-Sequence takes num_beams and num_return_sequences from its own
        # arguments (default 1), not from a generation_config.
        {"max_length": MAX_LENGTH, "num_beams": 3, "num_return_sequences": 2},
    ],
    ids=str,
)
def test_sequence_generate_with_a_generation_config(pairs, questions, settings):
    pair = pairs("sequence", "bart")
    contexts = _unpadded_contexts(pair, questions)
    config = transformers.GenerationConfig(**settings)
    ref, ours = _generate_both(pair, **contexts, generation_config=config)
    _same_ids(ref, ours)


@pytest.mark.parametrize("head", list(HEADS))
def test_module_tree_and_attributes_are_the_references(pairs, head):
    pair = pairs(head, "bart")
    assert [n for n, _ in pair.ours.named_children()] == [n for n, _ in pair.reference.named_children()]
    public = {k for k in vars(pair.ours) if not k.startswith("_")}
    assert public == {k for k in vars(pair.reference) if not k.startswith("_")}
    assert pair.ours.question_encoder is pair.reference.question_encoder
    assert pair.ours.generator is pair.reference.generator
    rag = pair.ours if head == "model" else pair.ours.rag
    assert rag.context_encoder_training is False and rag.ctx_encoder is None
    assert pair.ours.retriever is pair.our_retriever
    for name in ("n_docs", "batch_size", "return_tokenized_docs"):
        assert getattr(pair.our_retriever, name) == getattr(pair.ref_retriever, name), name


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(retrievers, questions, labels, head):
    # Transformers' RAG heads refuse gradient_checkpointing_enable() (ValueError); ragkit's checkpoint
    # both parts, with the loss and gradients of a run without checkpointing (dropout off).
    plain = build_pair(head, "bart", retrievers, seed=9)
    with pytest.raises(ValueError, match="checkpointing"):
        plain.reference.gradient_checkpointing_enable()
    checkpointed = copy.deepcopy(plain.ours)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.generator.is_gradient_checkpointing
    assert checkpointed.question_encoder.is_gradient_checkpointing
    results = []
    for model in (plain.ours, checkpointed):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.config.generator.dropout = 0.0
        model.train()
        loss = model(**questions, labels=labels, reduce_loss=True, use_cache=False).loss
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        )
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    _close(loss, loss_checkpointed, "loss with gradient checkpointing")
    assert grads.keys() == grads_checkpointed.keys() and grads
    for name in grads:
        _close(grads[name], grads_checkpointed[name], f"gradient of {name}")


@pytest.mark.parametrize(
    "options,named",
    [
        ({"encoder_repetition_penalty": 1.3}, "encoder_repetition_penalty"),
        ({"encoder_no_repeat_ngram_size": 2}, "encoder_no_repeat_ngram_size"),
        ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions"),
        (
            {"output_hidden_states": True, "return_dict_in_generate": True, "num_beams": 2},
            "output_hidden_states",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_token_generate_refuses_options_the_reference_crashes_on(pairs, questions, options, named):
    # The reference fails deep in the search loop (a shape RuntimeError, a ZeroDivisionError, an
    # AttributeError on its output class); ragkit refuses before any model runs, naming the option.
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    with pytest.raises((RuntimeError, ZeroDivisionError, AttributeError)):
        pair.reference.generate(**contexts, max_length=MAX_LENGTH, **options)
    with pytest.raises(ragkit.errors.RagInputError, match=named):
        pair.ours.generate(**contexts, max_length=MAX_LENGTH, **options)
    # The same options through a generation config.
    config = transformers.GenerationConfig(max_length=MAX_LENGTH, **options)
    with pytest.raises(ragkit.errors.RagInputError, match=named):
        pair.ours.generate(**contexts, generation_config=config)
    # Attentions and hidden states without return_dict_in_generate are ignored, as in the reference.
    if "return_dict_in_generate" in options:
        plain = {k: v for k, v in options.items() if k != "return_dict_in_generate"}
        ref, ours = _generate_both(pair, **contexts, max_length=MAX_LENGTH, **plain)
        _same_ids(ref, ours)


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_index_and_postprocessing_return_the_reference_types(retrievers, generator_kind):
    ref, ours = retrievers[generator_kind]
    vectors = np.random.default_rng(5).standard_normal((3, 32)).astype(np.float32)
    for n_docs in (1, 4):
        theirs, mine = ref.index.get_top_docs(vectors, n_docs), ours.index.get_top_docs(vectors, n_docs)
        for a, b in zip(theirs, mine):
            assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    theirs, mine = ref.retrieve(vectors, 2), ours.retrieve(vectors, 2)
    assert [type(x) for x in theirs] == [type(x) for x in mine]
    questions = ["q one", "q two", "q three"]
    for prefix, return_tensors in ((None, None), ("pre ", None), (None, "pt"), ("pre ", "np")):
        a = ref.postprocess_docs(theirs[2], questions, prefix, 2, return_tensors=return_tensors)
        b = ours.postprocess_docs(mine[2], questions, prefix, 2, return_tensors=return_tensors)
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert type(x) is type(y)
            assert _as_lists(x) == _as_lists(y), (prefix, return_tensors)


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_transformers_4_checkpoint_with_generation_settings_in_config_json(tmp_path, head):
    # The facebook/rag-* configs carry generation settings (forced_eos_token_id at the top, beams, lengths
    # and n-gram blocking in the generator's config) and no generation_config.json: both libraries must
    # derive the same generation settings from them and decode alike.
    from ragkit.testing import write_tiny_rag_checkpoint

    checkpoint = write_tiny_rag_checkpoint(tmp_path / "checkpoint", getattr(rk, HEADS[head]), seed=3)
    config = json.loads((checkpoint / "config.json").read_text())
    config["forced_eos_token_id"] = 2
    config["generator"].update(
        {"forced_bos_token_id": 0, "forced_eos_token_id": 2, "no_repeat_ngram_size": 3, "num_beams": 4}
    )
    config["generator"].update({"max_length": 12, "min_length": 3, "early_stopping": True})
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "generation_config.json").unlink(missing_ok=True)
    reference = getattr(transformers, HEADS[head]).from_pretrained(checkpoint).eval()
    ours = getattr(rk, HEADS[head]).from_pretrained(checkpoint).eval()
    for model_theirs, model_ours in ((reference, ours), (reference.generator, ours.generator)):
        theirs, mine = (
            getattr(model_theirs, "generation_config", None),
            getattr(model_ours, "generation_config", None),
        )
        assert (theirs is None) == (mine is None)
        if theirs is not None:
            assert mine.to_diff_dict() == theirs.to_diff_dict()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (6, 10), generator=generator)
    contexts = {
        "context_input_ids": ids,
        "context_attention_mask": torch.ones_like(ids),
        "doc_scores": torch.randn(2, 3, generator=generator),
    }
    with torch.no_grad():
        _same_ids(reference.generate(**contexts), ours.generate(**contexts))
    reference.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    names = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "theirs").iterdir())
    if "generation_config.json" in names:
        assert json.loads((tmp_path / "ours" / "generation_config.json").read_text()) == json.loads(
            (tmp_path / "theirs" / "generation_config.json").read_text()
        )


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", ["sequence", "token"])
def test_one_question_and_one_document(pairs, questions, labels, head, generator_kind):
    # Size-1 batch and n_docs=1: no dimension may be squeezed away.
    pair = pairs(head, generator_kind)
    question = {"input_ids": questions.input_ids[:1], "attention_mask": questions.attention_mask[:1]}
    ref, ours = _call_both(pair, **question, labels=labels[:1], n_docs=1)
    assert ours.loss.shape == ref.loss.shape == (1,) and ours.doc_scores.shape == (1, 1)
    _close(ref.loss, ours.loss, "loss")
    _close(ref.logits, ours.logits, "logits")
    generated = _generate_both(pair, **question, n_docs=1, num_beams=2, max_length=6)
    _same_ids(*generated)
