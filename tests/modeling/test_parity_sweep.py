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

Tolerances: 1e-5 absolute on float tensors (float32, CPU); token ids, doc ids and file keys exactly.
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
from rag_helpers import build_pair, retrieved_contexts
from safetensors.torch import load_file

import ragkit
import ragkit.modeling_rag as rk

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
            assert our_positional[position] in accepted, f"{name}.{method}: position {position} is not {param.name}"
        # ... and every keyword with the reference's default (None where the reference's mutable [] means none).
        for param in theirs.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                assert any(p.kind is param.kind for p in ours.values()), f"{name}.{method} lacks {param}"
                continue
            key = _ALIASES.get(param.name, param.name) if param.kind is param.POSITIONAL_OR_KEYWORD else param.name
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
def test_return_dict_false_gives_the_reference_tuple_without_its_none_placeholder(pairs, questions, labels, head):
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
        as_dict = pair.ours(**kwargs, output_retrieved=output_retrieved).to_tuple()
        for position, (theirs, mine, from_dict) in enumerate(zip(expected, ours, as_dict)):
            assert type(mine) is type(theirs), f"position {position}"
            if isinstance(mine, torch.Tensor):
                if mine.dim() == 3 and mine.shape[-1] == pair.config.generator.d_model:
                    continue  # generator_enc_last_hidden_state: padding positions differ (documented)
                _close(theirs, mine, f"tuple position {position}")
                _close(from_dict, mine, f"tuple position {position} vs to_tuple()")
        if head != "model":
            _close(ref.loss, ours[0], "loss first")


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", list(HEADS))
def test_every_output_field_is_none_where_the_reference_has_none(pairs, questions, labels, head, generator_kind):
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
    filled_by_ragkit_only = {"question_enc_hidden_states", "generator_enc_hidden_states", "generator_dec_hidden_states"}
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
        for a, b in ((ours.logits, plain.logits), (ours.loss, plain.loss))
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
        ref, ours = _call_both(pair, input_ids=questions.input_ids, n_docs=n_docs, output_retrieved=True, **target)
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
            input_ids=contexts["context_input_ids"], attention_mask=contexts["context_attention_mask"], return_dict=True
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
