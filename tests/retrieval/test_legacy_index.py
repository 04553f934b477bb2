"""index_name="legacy": DPR's phi-trick files, the pickle opt-in, and the pickle-free conversion."""

from __future__ import annotations

import collections
import pickle

import faiss
import numpy as np
import pytest
import torch
import transformers
from retrieval_helpers import DIM
from transformers.models.rag.retrieval_rag import LegacyIndex as RefLegacyIndex

from ragkit import RagRetriever
from ragkit.cli import main as cli_main
from ragkit.errors import MissingFileError
from ragkit.retrieval import LegacyIndex, convert_legacy_index
from ragkit.retrieval.legacy import CONVERTED_MANIFEST, INDEX_FILENAME, PASSAGE_FILENAME
from ragkit.testing import TINY_PASSAGES, assert_doc_dicts_equal, tiny_rag_config


def _write_legacy_files(directory, embeddings):
    """DPR-style files: HNSW-SQ8 index over [x, sqrt(phi - |x|^2)], pickled id map and passages."""
    directory.mkdir(parents=True, exist_ok=True)
    norms = (embeddings**2).sum(1)
    phi = norms.max()
    vectors = np.hstack([embeddings, np.sqrt(phi - norms)[:, None]]).astype("float32")
    order = np.random.RandomState(3).permutation(len(embeddings))  # index positions != passage order
    index = faiss.IndexHNSWSQ(DIM + 1, faiss.ScalarQuantizer.QT_8bit, 8)
    index.train(vectors)
    index.add(vectors[order])
    faiss.write_index(index, str(directory / f"{INDEX_FILENAME}.index.dpr"))
    passage_ids = [str(1000 + 7 * i) for i in range(len(embeddings))]  # sparse, string ids as in DPR
    with open(directory / f"{INDEX_FILENAME}.index_meta.dpr", "wb") as f:
        pickle.dump([passage_ids[i] for i in order], f)
    with open(directory / PASSAGE_FILENAME, "wb") as f:
        pickle.dump({pid: (text, title) for pid, (title, text) in zip(passage_ids, TINY_PASSAGES)}, f)
    return directory


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory):
    embeddings = np.random.RandomState(0).randn(len(TINY_PASSAGES), DIM).astype("float32")
    return _write_legacy_files(tmp_path_factory.mktemp("legacy") / "dpr", embeddings)


@pytest.fixture(scope="module")
def converted_dir(legacy_dir, tmp_path_factory):
    return convert_legacy_index(legacy_dir, tmp_path_factory.mktemp("converted") / "legacy")


@pytest.fixture
def trusted_env(monkeypatch):
    monkeypatch.setenv("TRUST_REMOTE_CODE", "True")


@pytest.fixture(autouse=True)
def _untrusted_by_default(monkeypatch):
    monkeypatch.delenv("TRUST_REMOTE_CODE", raising=False)


def _reference_index(legacy_dir):
    index = RefLegacyIndex(DIM, str(legacy_dir))
    index.init_index()
    return index


def test_pickled_files_match_reference(legacy_dir, queries, trusted_env):
    ref = _reference_index(legacy_dir)
    ours = LegacyIndex(DIM, legacy_dir)
    ours.init_index()
    ids, vectors = ours.get_top_docs(queries, 4)
    ref_ids, ref_vectors = ref.get_top_docs(queries, 4)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(vectors, ref_vectors)
    assert_doc_dicts_equal(ours.get_doc_dicts(ids), ref.get_doc_dicts(ref_ids))
    assert ids.min() >= 1000  # passage ids, not index positions


def test_retriever_call_matches_reference(legacy_dir, retriever_dir, queries, question_ids, trusted_env):
    kwargs = dict(index_name="legacy", index_path=str(legacy_dir))
    ours = RagRetriever.from_pretrained(retriever_dir, **kwargs)
    ref = transformers.RagRetriever.from_pretrained(str(retriever_dir), **kwargs)
    out = ours(question_ids, queries, return_tensors="pt")
    expected = ref(question_ids, queries, return_tensors="pt")
    for key in expected:
        assert out[key].dtype == expected[key].dtype, key
        assert torch.equal(out[key], expected[key]), key


def test_pickles_refused_without_opt_in(legacy_dir, retriever_dir):
    with pytest.raises(ValueError, match="allow_pickle=True") as info:
        LegacyIndex(DIM, legacy_dir)
    assert "convert-legacy" in str(info.value) and "TRUST_REMOTE_CODE" in str(info.value)
    with pytest.raises(ValueError, match="pickle"):
        RagRetriever.from_pretrained(retriever_dir, index_name="legacy", index_path=str(legacy_dir))
    retriever = RagRetriever.from_pretrained(
        retriever_dir, index_name="legacy", index_path=str(legacy_dir), allow_pickle=True
    )
    assert retriever.index.is_initialized()


def test_converted_index_loads_without_opt_in_and_matches(legacy_dir, converted_dir, queries):
    assert (converted_dir / CONVERTED_MANIFEST).is_file()
    assert not any(p.suffix in (".pkl", ".dpr") for p in converted_dir.iterdir())
    pickled = LegacyIndex(DIM, legacy_dir, allow_pickle=True)
    pickled.init_index()
    converted = LegacyIndex(DIM, converted_dir)  # no opt-in needed
    converted.init_index()
    assert converted.converted and not pickled.converted
    ids, vectors = converted.get_top_docs(queries, 5)
    ref_ids, ref_vectors = pickled.get_top_docs(queries, 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(vectors, ref_vectors)
    assert_doc_dicts_equal(converted.get_doc_dicts(ids), pickled.get_doc_dicts(ref_ids))


def test_numpy_integer_n_docs(converted_dir, queries):
    index = LegacyIndex(DIM, converted_dir)
    index.init_index()
    np.testing.assert_array_equal(
        index.get_top_docs(queries, np.int64(3))[0], index.get_top_docs(queries, 3)[0]
    )


def test_retriever_on_converted_dir_needs_no_opt_in(
    legacy_dir, converted_dir, retriever_dir, queries, question_ids
):
    converted = RagRetriever.from_pretrained(
        retriever_dir, index_name="legacy", index_path=str(converted_dir)
    )
    pickled = RagRetriever.from_pretrained(
        retriever_dir, index_name="legacy", index_path=str(legacy_dir), allow_pickle=True
    )
    out = converted(question_ids, queries, return_tensors="pt")
    expected = pickled(question_ids, queries, return_tensors="pt")
    for key in expected:
        assert torch.equal(out[key], expected[key]), key


def test_cli_convert_legacy(legacy_dir, tmp_path, queries, capsys):
    assert cli_main(["convert-legacy", str(legacy_dir), str(tmp_path / "out")]) == 0
    assert "index_name='legacy'" in capsys.readouterr().out
    index = LegacyIndex(DIM, tmp_path / "out")
    index.init_index()
    assert index.get_top_docs(queries, 2)[0].shape == (len(queries), 2)
    assert cli_main(["convert-legacy", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def _copy_with_passages(legacy_dir, source):
    """A copy of the legacy files at ``source``, and its passages (id -> (text, title)) to rewrite."""
    source.mkdir()
    for path in legacy_dir.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    with open(source / PASSAGE_FILENAME, "rb") as f:
        return source, pickle.load(f)


def test_converter_refuses_pickles_with_code(legacy_dir, tmp_path):
    # A pickle that names any class or function (here OrderedDict) is refused unless trusted.
    source, passages = _copy_with_passages(legacy_dir, tmp_path / "src")
    with open(source / PASSAGE_FILENAME, "wb") as f:
        pickle.dump(collections.OrderedDict(passages), f)
    with pytest.raises(pickle.UnpicklingError, match=r"collections\.OrderedDict"):
        convert_legacy_index(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    convert_legacy_index(source, tmp_path / "out", allow_pickle=True)
    assert (tmp_path / "out" / CONVERTED_MANIFEST).is_file()


def test_converter_refuses_passages_missing_ids_of_the_index(legacy_dir, tmp_path):
    # Converted anyway, the index would return a passage id whose text is not there: a KeyError at search time.
    source, passages = _copy_with_passages(legacy_dir, tmp_path / "src")
    dropped = sorted(passages, key=int)[3]
    del passages[dropped]
    with open(source / PASSAGE_FILENAME, "wb") as f:
        pickle.dump(passages, f)
    with pytest.raises(
        ValueError, match=rf"names 1 passage id\(s\) .* \(for example {dropped}\); .* do not belong"
    ):
        convert_legacy_index(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_interrupted_conversion_leaves_nothing(legacy_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ragkit.retrieval.legacy.shutil.copyfile", fail)
    with pytest.raises(KeyboardInterrupt):
        convert_legacy_index(legacy_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_legacy_bad_files(legacy_dir, tmp_path, queries):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in legacy_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    index_file = broken / f"{INDEX_FILENAME}.index.dpr"
    index_file.write_bytes(index_file.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        LegacyIndex(DIM, broken, allow_pickle=True).init_index()
    index_file.unlink()
    with pytest.raises(MissingFileError, match=r"index\.dpr"):
        LegacyIndex(DIM, broken, allow_pickle=True).init_index()
    with pytest.raises(ValueError, match="retrieval_vector_size"):
        LegacyIndex(DIM + 1, legacy_dir, allow_pickle=True).init_index()
    index = LegacyIndex(DIM, legacy_dir, allow_pickle=True)
    with pytest.raises(RuntimeError, match="init_retrieval"):
        index.get_top_docs(queries, 2)


def test_missing_local_directory_is_named(tmp_path):
    # A mistyped directory is not a valid Hub repo id: say it is missing, not "Repo id must be in the form".
    missing = tmp_path / "no_such_dir"
    for allow_pickle in (False, True):
        with pytest.raises(FileNotFoundError, match="neither a local directory"):
            LegacyIndex(DIM, missing, allow_pickle=allow_pickle)
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        convert_legacy_index(missing, tmp_path / "out")


def test_converting_into_the_source_directory_is_refused(legacy_dir, tmp_path):
    # dst is replaced whole: converting in place (or into a parent) used to delete DPR's original files.
    source = tmp_path / "dpr" / "files"
    source.mkdir(parents=True)
    for path in legacy_dir.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    for dst in (source, tmp_path / "dpr"):
        with pytest.raises(ValueError, match="inside the output directory"):
            convert_legacy_index(source, dst)
        assert (source / PASSAGE_FILENAME).is_file()


def test_converting_into_a_directory_with_foreign_files_is_refused(legacy_dir, tmp_path):
    dst = tmp_path / "project"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="ragkit did not write"):
        convert_legacy_index(legacy_dir, dst, allow_pickle=True)
    assert (dst / "notes.txt").read_text() == "mine"


def test_hub_token_and_revision_reach_every_legacy_download(legacy_dir, monkeypatch):
    # A private mirror of DPR's files needs the token (and the config's dataset revision) on every request.
    from ragkit.retrieval import _hub

    seen = []

    def resolve(location, filename, **kwargs):
        seen.append(kwargs)
        path = legacy_dir / filename  # the "downloaded" copy
        if not path.is_file():
            raise FileNotFoundError(filename)
        return str(path)

    monkeypatch.setattr(_hub, "resolve_file", resolve)
    monkeypatch.setattr(_hub, "is_local", lambda location: False)
    config = tiny_rag_config(
        hidden_size=DIM, index_name="legacy", index_path="someone/private-dpr", dataset_revision="v1"
    )
    RagRetriever._build_index(config, allow_pickle=True, token="hf_secret")
    assert seen and all(kwargs.get("token") == "hf_secret" for kwargs in seen)
    assert all(kwargs.get("revision") == "v1" for kwargs in seen)
