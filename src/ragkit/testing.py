"""Tiny, offline building blocks: tokenizers, configs, passages, retrievers and random-weight models
small enough for tests and demos.

Nothing here downloads anything. Tokenizers are built from vocabularies written on the fly (as
Transformers' own tests do): a WordPiece vocabulary for the DPR question encoder and a byte-level
BPE trained on an embedded corpus for the BART generator, so every string tokenizes without
unknown tokens. Models are seeded, so every process builds the same weights; nothing here imports
Transformers' RAG (a parity test builds its reference over a tiny model's own modules).
"""

from __future__ import annotations

import os
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import BartConfig, BartTokenizer, DPRConfig, DPRQuestionEncoderTokenizer, T5Config

from .configuration_rag import RagConfig

if TYPE_CHECKING:  # optional dependencies: imported inside the functions that need them
    import faiss
    from datasets import Dataset

__all__ = [
    "TINY_PASSAGES",
    "assert_doc_dicts_equal",
    "redraw_weights",
    "tiny_bart_config",
    "tiny_dpr_config",
    "tiny_indexed_dataset",
    "tiny_passage_embeddings",
    "tiny_question_vectors",
    "tiny_rag_config",
    "tiny_rag_model",
    "tiny_retriever",
    "tiny_t5_config",
    "train_bart_tokenizer",
    "write_tiny_custom_index",
    "write_tiny_generator_tokenizer",
    "write_tiny_question_encoder_tokenizer",
    "write_tiny_rag_checkpoint",
    "write_tiny_retriever_dir",
    "write_tiny_wiki_dpr_mirror",
]

#: (title, text) pairs: a small encyclopedia used for tiny indexes in tests and examples.
TINY_PASSAGES: tuple[tuple[str, str], ...] = (
    ("Paris", "Paris is the capital and most populous city of France, with about 2.1 million residents."),
    ("Berlin", "Berlin is the capital and largest city of Germany by both area and population."),
    ("London", "London is the capital of England and the United Kingdom, on the river Thames."),
    ("Seine", "The Seine is a river in northern France that flows through Paris into the English Channel."),
    ("Thames", "The Thames is a river that flows through southern England, including London."),
    ("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889."),
    ("Brandenburg Gate", "The Brandenburg Gate is an 18th-century monument in Berlin."),
    ("Big Ben", "Big Ben is the nickname for the great bell of the clock at the Palace of Westminster."),
    ("Louvre", "The Louvre is the world's most-visited art museum, located in Paris."),
    ("Rhine", "The Rhine is a river that flows from the Alps through Germany to the North Sea."),
    ("Madrid", "Madrid is the capital and most populous city of Spain."),
    ("Rome", "Rome is the capital city of Italy and was the centre of the Roman Empire."),
    ("Tiber", "The Tiber is the third-longest river in Italy and flows through Rome."),
    ("Vienna", "Vienna is the capital of Austria and lies on the river Danube."),
    ("Danube", "The Danube is the second-longest river in Europe, after the Volga."),
    ('"Quoted Title"', '"A passage whose title and text carry quotes, which the retriever strips."'),
)

_QUESTIONS = (
    "How many people live in Paris?",
    "What is the capital of Germany?",
    "Which river flows through London?",
    "When was the Eiffel Tower completed?",
    "Where is the Louvre?",
)

_GENERATOR_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
_QUESTION_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _corpus() -> list[str]:
    """Texts the tiny tokenizers are built from."""
    texts = [f"{title} / {text}" for title, text in TINY_PASSAGES] + list(_QUESTIONS)
    return texts * 4


def train_bart_tokenizer(
    texts: Iterable[str], directory: str | os.PathLike, vocab_size: int
) -> BartTokenizer:
    """Train a byte-level BPE with BART's special tokens on ``texts``, offline.

    Args:
        texts: The corpus.
        directory: Where ``vocab.json`` and ``merges.txt`` are written (created if needed).
        vocab_size: Target vocabulary size (specials included).

    Returns:
        A ``BartTokenizer`` over the trained files (ids: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3,
        ``<mask>`` 4).
    """
    os.makedirs(directory, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_GENERATOR_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer)
    bpe.model.save(str(directory))
    return BartTokenizer(
        vocab=os.path.join(directory, "vocab.json"), merges=os.path.join(directory, "merges.txt")
    )


#: Former private name of :func:`train_bart_tokenizer`, kept for callers not yet moved to the public one.
_train_bart_tokenizer = train_bart_tokenizer


def assert_doc_dicts_equal(actual: list[dict], expected: list[dict]) -> None:
    """Assert two retrievers' ``doc_dicts`` are equal: same columns, same values, equal embedding arrays.

    ``doc_dicts`` hold numpy arrays under ``embeddings`` (as Transformers' do), which ``==`` cannot compare.
    """
    assert len(actual) == len(expected), f"{len(actual)} questions != {len(expected)}"
    for i, (got, want) in enumerate(zip(actual, expected)):
        assert sorted(got) == sorted(want), f"question {i}: columns {sorted(got)} != {sorted(want)}"
        for column in want:
            if column == "embeddings":
                np.testing.assert_array_equal(
                    np.asarray(got[column]), np.asarray(want[column]), err_msg=f"question {i}, embeddings"
                )
            else:
                assert list(got[column]) == list(want[column]), f"question {i}, column {column!r}"


def write_tiny_question_encoder_tokenizer(directory: str | os.PathLike) -> DPRQuestionEncoderTokenizer:
    """Write a WordPiece vocabulary to ``directory`` and return a DPR question encoder tokenizer over it.

    Every lowercase word of the tiny corpus is a token; single characters and their ``##``
    continuations make any other ASCII text tokenizable without ``[UNK]``.
    """
    os.makedirs(directory, exist_ok=True)
    words: dict[str, None] = {}
    for text in _corpus():
        for word in text.lower().replace('"', " ").split():
            words.setdefault(word.strip(string.punctuation), None)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = _QUESTION_SPECIALS + list(chars) + [f"##{c}" for c in string.ascii_lowercase + string.digits]
    vocab += [w for w in words if w and w not in vocab]
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    return DPRQuestionEncoderTokenizer(vocab=path)


def write_tiny_generator_tokenizer(directory: str | os.PathLike, vocab_size: int = 400) -> BartTokenizer:
    """Train a byte-level BPE on the tiny corpus, write ``vocab.json``/``merges.txt``, return a BART tokenizer.

    Ids: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4, as in BART.
    """
    return train_bart_tokenizer(_corpus(), directory, vocab_size)


def tiny_dpr_config(vocab_size: int = 256, hidden_size: int = 32, **kwargs: Any) -> DPRConfig:
    """A 2-layer DPR question encoder config of width ``hidden_size``."""
    defaults = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    defaults.update(kwargs)
    return DPRConfig(**defaults)


def tiny_bart_config(vocab_size: int = 400, d_model: int = 32, **kwargs: Any) -> BartConfig:
    """A 2+2-layer BART config with BART's special token ids."""
    defaults = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=512,
        dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    defaults.update(kwargs)
    return BartConfig(**defaults)


def tiny_t5_config(vocab_size: int = 400, d_model: int = 32, **kwargs: Any) -> T5Config:
    """A 2+2-layer T5 config; pad 1 and eos 2 match the tiny generator tokenizer."""
    defaults = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    defaults.update(kwargs)
    return T5Config(**defaults)


def tiny_rag_config(generator: str = "bart", hidden_size: int = 32, **kwargs: Any) -> RagConfig:
    """A RAG config over a tiny DPR encoder and a tiny BART or T5 generator, with a custom index.

    Args:
        generator: ``"bart"`` or ``"t5"``.
        hidden_size: Width of the question encoder, hence of the retrieval vectors.
        **kwargs: RAG fields to override (``n_docs``, ``max_combined_length``, ...).

    Returns:
        RagConfig
    """
    if generator == "bart":
        gen_config = tiny_bart_config()
    elif generator == "t5":
        gen_config = tiny_t5_config()
    else:
        raise ValueError(f"`generator` must be 'bart' or 't5', got {generator!r}.")
    rag_fields = dict(
        n_docs=3,
        max_combined_length=48,
        retrieval_vector_size=hidden_size,
        index_name="custom",
        pad_token_id=gen_config.pad_token_id,
        eos_token_id=gen_config.eos_token_id,
        bos_token_id=getattr(gen_config, "bos_token_id", None),
        decoder_start_token_id=gen_config.decoder_start_token_id,
    )
    if generator == "t5":
        rag_fields["prefix"] = ""
    rag_fields.update(kwargs)
    return RagConfig.from_question_encoder_generator_configs(
        tiny_dpr_config(hidden_size=hidden_size), gen_config, **rag_fields
    )


def tiny_passage_embeddings(dim: int = 32, seed: int = 0) -> np.ndarray:
    """Seeded random embeddings, one per :data:`TINY_PASSAGES` entry.

    Args:
        dim: Width of each vector (the RAG config's ``retrieval_vector_size``).
        seed: Seed of the ``numpy.random.RandomState`` that draws them (standard normal).

    Returns:
        A float32 array of shape ``(num_passages, dim)``, ``num_passages = len(TINY_PASSAGES)``.
    """
    return np.random.RandomState(seed).randn(len(TINY_PASSAGES), dim).astype("float32")


def tiny_indexed_dataset(embeddings: np.ndarray | None = None, index: faiss.Index | None = None) -> Dataset:
    """A fresh ``datasets.Dataset`` of :data:`TINY_PASSAGES` with a faiss index on its ``embeddings``.

    Args:
        embeddings: Shape ``(num_passages, dim)``, row ``i`` for ``TINY_PASSAGES[i]``; defaults to
            :func:`tiny_passage_embeddings` ``()`` (width 32, seed 0).
        index: The faiss index ``add_faiss_index`` fills (and trains if needed); defaults to an exact
            inner-product ``faiss.IndexFlatIP(dim)``.

    Returns:
        A dataset with columns ``title``, ``text`` and ``embeddings`` and a faiss index named
        ``"embeddings"``, as ``CustomHFIndex`` and ``RagRetriever(indexed_dataset=...)`` take it.
    """
    import faiss
    from datasets import Dataset

    embeddings = tiny_passage_embeddings() if embeddings is None else embeddings
    dataset = Dataset.from_dict(
        {
            "title": [title for title, _ in TINY_PASSAGES],
            "text": [text for _, text in TINY_PASSAGES],
            "embeddings": list(embeddings),
        }
    )
    if index is None:
        index = faiss.IndexFlatIP(embeddings.shape[1])
    dataset.add_faiss_index("embeddings", custom_index=index)
    return dataset


def write_tiny_custom_index(
    directory: str | os.PathLike, embeddings: np.ndarray | None = None
) -> tuple[Path, Path]:
    """Save :func:`tiny_indexed_dataset` the way ``index_name="custom"`` loads it from disk.

    Args:
        directory: Where to write ``passages/`` (``Dataset.save_to_disk``, without the index) and
            ``index.faiss`` (the exact inner-product index).
        embeddings: Shape ``(num_passages, dim)``; defaults to :func:`tiny_passage_embeddings` ``()``.

    Returns:
        ``(passages_path, index_path)``, the config's ``passages_path`` and ``index_path``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dataset = tiny_indexed_dataset(embeddings)
    passages_path, index_path = directory / "passages", directory / "index.faiss"
    dataset.get_index("embeddings").save(str(index_path))
    dataset.drop_index("embeddings")
    dataset.save_to_disk(str(passages_path))
    return passages_path, index_path


def write_tiny_wiki_dpr_mirror(root: str | os.PathLike, dim: int = 32, seed: int = 0) -> Path:
    """Write a miniature wiki_dpr mirror (Hub layout) of :data:`TINY_PASSAGES` with random embeddings.

    Holds the ``nq`` passages (one parquet shard) and their dummy variant, an "exact" and a
    "compressed" index and the dummy index, all exact inner-product searches over width ``dim``, so
    ``RagRetriever.from_pretrained(..., dataset=root, index_name=..., use_dummy_dataset=...)`` works offline.

    Returns:
        The mirror's root directory.
    """
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    embeddings = tiny_passage_embeddings(dim, seed)
    table = pa.table(
        {
            "id": [str(i + 1) for i in range(len(TINY_PASSAGES))],
            "text": [text for _, text in TINY_PASSAGES],
            "title": [title for title, _ in TINY_PASSAGES],
            "embeddings": pa.array(list(embeddings), pa.list_(pa.float32())),
        }
    )
    for variant in ("nq", "dummy.nq"):
        shard_dir = root / "data" / "psgs_w100" / variant
        shard_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, shard_dir / "train-00000-of-00001.parquet")
    index = faiss.IndexFlatIP(dim)
    index.add(embeddings)
    (root / "index").mkdir(parents=True, exist_ok=True)
    for name in (
        "index/psgs_w100.nq.HNSW128_SQ8-IP-train.faiss",
        "index/psgs_w100.nq.IVF4096_HNSW128_PQ128-IP-train.faiss",
        "dummy.psgs_w100.nq.IndexHNSWFlat-IP-train.faiss",
    ):
        faiss.write_index(index, str(root / name))
    return root


def write_tiny_rag_checkpoint(
    directory: str | os.PathLike,
    model_class: type | None = None,
    generator: str = "bart",
    seed: int = 0,
    **rag_fields: Any,
) -> Path:
    """Save a random-weight tiny RAG checkpoint in the facebook/rag-* layout (config, weights, tokenizers).

    Args:
        directory: Where to write it.
        model_class: ``RagSequenceForGeneration`` (default), ``RagTokenForGeneration`` or ``RagModel``.
        generator: ``"bart"`` or ``"t5"``.
        seed: Seed of the random weights.
        **rag_fields: RAG config fields, e.g. ``dataset=<a tiny wiki_dpr mirror>``, ``index_name="exact"``.

    Returns:
        The checkpoint directory.
    """
    import torch
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    from .modeling_rag import RagSequenceForGeneration
    from .tokenization_rag import RagTokenizer

    directory = Path(directory)
    model_class = model_class or RagSequenceForGeneration
    config = tiny_rag_config(generator, **rag_fields)
    torch.manual_seed(seed)
    model = model_class(
        config=config,
        question_encoder=AutoModel.from_config(config.question_encoder),
        generator=AutoModelForSeq2SeqLM.from_config(config.generator),
    )
    model.save_pretrained(directory)
    with tempfile.TemporaryDirectory() as vocab_dir:
        RagTokenizer(
            question_encoder=write_tiny_question_encoder_tokenizer(
                os.path.join(vocab_dir, "question_encoder")
            ),
            generator=write_tiny_generator_tokenizer(os.path.join(vocab_dir, "generator")),
        ).save_pretrained(directory)
    return directory


def tiny_question_vectors(batch_size: int, dim: int = 32, seed: int = 1) -> np.ndarray:
    """Seeded random question vectors of shape `(batch_size, dim)`, float32 (standard normal)."""
    return np.random.RandomState(seed).randn(batch_size, dim).astype("float32")


def tiny_retriever(
    config: RagConfig | None = None,
    question_encoder_tokenizer: Any = None,
    generator_tokenizer: Any = None,
    dataset: Dataset | None = None,
) -> Any:
    """A ``RagRetriever`` over an exact in-memory index of :data:`TINY_PASSAGES` (the answers to match).

    Args:
        config: RAG config (copied: retrievers modify theirs); defaults to :func:`tiny_rag_config` ``()``.
        question_encoder_tokenizer: Defaults to a fresh :func:`write_tiny_question_encoder_tokenizer`.
        generator_tokenizer: Defaults to a fresh :func:`write_tiny_generator_tokenizer`.
        dataset: Indexed passages; defaults to :func:`tiny_indexed_dataset` with vectors of the config's width.

    Returns:
        RagRetriever: initialized, ``index_name="custom"``.
    """
    import copy

    from .retrieval.custom import CustomHFIndex
    from .retrieval_rag import RagRetriever

    config = copy.deepcopy(config) if config is not None else tiny_rag_config()
    if question_encoder_tokenizer is None or generator_tokenizer is None:
        vocab_dir = tempfile.mkdtemp(prefix="ragkit-tiny-tokenizers-")
        question_encoder_tokenizer = question_encoder_tokenizer or write_tiny_question_encoder_tokenizer(
            os.path.join(vocab_dir, "question_encoder")
        )
        generator_tokenizer = generator_tokenizer or write_tiny_generator_tokenizer(
            os.path.join(vocab_dir, "generator")
        )
    if dataset is None:
        dataset = tiny_indexed_dataset(tiny_passage_embeddings(config.retrieval_vector_size))
    return RagRetriever(
        config,
        question_encoder_tokenizer,
        generator_tokenizer,
        index=CustomHFIndex(config.retrieval_vector_size, dataset),
    )


def write_tiny_retriever_dir(
    directory: str | os.PathLike,
    config: RagConfig | None = None,
    question_encoder_tokenizer: Any = None,
    generator_tokenizer: Any = None,
) -> Path:
    """Save a RAG config and both tokenizers into ``directory``, as a checkpoint holds them (no weights).

    Args:
        directory: Where to write ``config.json``, ``question_encoder_tokenizer/`` and ``generator_tokenizer/``.
        config: Defaults to :func:`tiny_rag_config` ``()``.
        question_encoder_tokenizer: Defaults to :func:`write_tiny_question_encoder_tokenizer`.
        generator_tokenizer: Defaults to :func:`write_tiny_generator_tokenizer`.

    Returns:
        The directory, loadable with ``RagRetriever.from_pretrained(directory, ...)``.
    """
    from .tokenization_rag import RagTokenizer

    directory = Path(directory)
    (config or tiny_rag_config()).save_pretrained(directory)
    with tempfile.TemporaryDirectory() as vocab_dir:
        RagTokenizer(
            question_encoder=question_encoder_tokenizer
            or write_tiny_question_encoder_tokenizer(os.path.join(vocab_dir, "question_encoder")),
            generator=generator_tokenizer
            or write_tiny_generator_tokenizer(os.path.join(vocab_dir, "generator")),
        ).save_pretrained(directory)
    return directory


def redraw_weights(module: Any, seed: int, std: float = 0.2) -> None:
    """Redraw every weight matrix of ``module`` from ``N(0, std)``, seeded, in place.

    Rows of embeddings and of the LM head (parameters named ``shared``, ``embed_tokens`` or
    ``lm_head``) are then scaled to unit norm, so that no token outscores all others at every step:
    greedy and beam decoding of a tiny model vary from token to token instead of repeating one
    token, as they do with PyTorch's default initialization. Biases and norms are left as they are.

    Args:
        module: A ``torch.nn.Module`` (a question encoder, a generator).
        seed: Seed of the ``torch.Generator`` that draws the weights, in ``named_parameters`` order.
        std: Standard deviation of the redrawn weights.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, std, generator=generator)
                if "shared" in name or "embed_tokens" in name or "lm_head" in name:
                    param.div_(param.norm(dim=-1, keepdim=True))


def tiny_rag_model(
    config: RagConfig | None = None,
    retriever: Any = None,
    model_class: type | None = None,
    seed: int = 0,
    weight_std: float | None = None,
) -> Any:
    """A random-weight tiny RAG model (DPR + the config's generator), seeded: the same weights in every process.

    Args:
        config: Defaults to :func:`tiny_rag_config` ``()``.
        retriever: Attached to the model (None: pass contexts yourself).
        model_class: ``RagSequenceForGeneration`` (default), ``RagTokenForGeneration`` or ``RagModel``.
        seed: ``torch.manual_seed`` before the weights are drawn.
        weight_std: When given, the weight matrices are redrawn with :func:`redraw_weights` (the
            question encoder's with ``seed``, the generator's with ``seed + 1``) so that decoding
            varies from token to token; ``None`` keeps PyTorch's initialization.

    Returns:
        The model, in training mode as PyTorch creates it. Its ``question_encoder`` and ``generator``
        are plain Transformers models: a reference RAG implementation built over the same two modules
        computes with the very same weights.
    """
    import torch
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    from .modeling_rag import RagSequenceForGeneration

    config = config or tiny_rag_config()
    torch.manual_seed(seed)
    question_encoder = AutoModel.from_config(config.question_encoder)
    generator = AutoModelForSeq2SeqLM.from_config(config.generator)
    if weight_std is not None:
        redraw_weights(question_encoder, seed, weight_std)
        redraw_weights(generator, seed + 1, weight_std)
    return (model_class or RagSequenceForGeneration)(
        config=config, question_encoder=question_encoder, generator=generator, retriever=retriever
    )
