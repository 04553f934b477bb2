"""RagConfig: same fields and defaults as transformers.RagConfig, files readable both ways, clear errors."""

from __future__ import annotations

import inspect
import json
import re

import pytest
import transformers
from transformers import BartConfig, BertConfig, DPRConfig, T5Config

from ragkit import RagConfig
from ragkit.testing import tiny_bart_config, tiny_dpr_config, tiny_t5_config

RAGKIT_ONLY_FIELDS = {
    "index_nprobe",
    "index_ef_search",
    "embeddings_name",
    "question_encoder_pooling",
    "question_encoder_normalize",
}
# In the documented RagConfig signature; transformers 5 moved it to the generation config, so its RagConfig lacks it.
SEED_ONLY_FIELDS = {"forced_eos_token_id"}


def _reference_defaults() -> dict:
    reference = transformers.RagConfig(
        question_encoder=DPRConfig().to_dict(), generator=BartConfig().to_dict()
    )
    return reference.to_dict()


def test_every_reference_field_has_the_same_default():
    ours = RagConfig(question_encoder=DPRConfig().to_dict(), generator=BartConfig().to_dict()).to_dict()
    reference = _reference_defaults()
    for key, value in reference.items():
        if key in ("question_encoder", "generator", "transformers_version"):
            continue
        assert key in ours, f"ragkit's RagConfig lacks the reference field {key!r}"
        assert ours[key] == value, f"default of {key!r}: ragkit {ours[key]!r} != reference {value!r}"
    assert set(ours) - set(reference) <= RAGKIT_ONLY_FIELDS | SEED_ONLY_FIELDS | {"transformers_version"}


def test_seed_signature_defaults():
    config = RagConfig(question_encoder=DPRConfig().to_dict(), generator=BartConfig().to_dict())
    expected = dict(
        title_sep=" / ",
        doc_sep=" // ",
        n_docs=5,
        max_combined_length=300,
        retrieval_vector_size=768,
        retrieval_batch_size=8,
        dataset="wiki_dpr",
        dataset_split="train",
        index_name="compressed",
        index_path=None,
        passages_path=None,
        use_dummy_dataset=False,
        reduce_loss=False,
        label_smoothing=0.0,
        do_deduplication=True,
        exclude_bos_score=False,
        do_marginalize=False,
        output_retrieved=False,
        use_cache=True,
        forced_eos_token_id=None,
        dataset_revision=None,
        is_encoder_decoder=True,
    )
    for key, value in expected.items():
        assert getattr(config, key) == value, key


@pytest.mark.parametrize(
    "question_encoder, generator",
    [
        (tiny_dpr_config(), tiny_bart_config()),
        (tiny_dpr_config(), tiny_t5_config()),
        (
            BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
            tiny_bart_config(),
        ),
    ],
)
def test_from_question_encoder_generator_configs_keeps_sub_config_types(question_encoder, generator):
    config = RagConfig.from_question_encoder_generator_configs(question_encoder, generator, n_docs=2)
    assert type(config.question_encoder) is type(question_encoder)
    assert type(config.generator) is type(generator)
    assert config.question_encoder.hidden_size == question_encoder.hidden_size
    assert config.generator.d_model == generator.d_model
    assert config.n_docs == 2


def test_config_json_round_trips_with_transformers(tmp_path):
    ours = RagConfig.from_question_encoder_generator_configs(
        tiny_dpr_config(), tiny_t5_config(), n_docs=4, index_name="custom", title_sep=" | ", index_nprobe=64
    )
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "rag"
    reference = transformers.RagConfig.from_pretrained(tmp_path / "ours")
    assert isinstance(reference.generator, T5Config)
    assert (reference.n_docs, reference.index_name, reference.title_sep) == (4, "custom", " | ")
    assert reference.generator.d_model == ours.generator.d_model

    reference.n_docs = 7
    reference.save_pretrained(tmp_path / "theirs")
    back = RagConfig.from_pretrained(tmp_path / "theirs")
    assert back.n_docs == 7
    assert isinstance(back.question_encoder, DPRConfig)
    assert back.generator.to_dict()["d_model"] == ours.generator.d_model
    assert back.index_nprobe == 64  # transformers keeps fields it does not know


@pytest.mark.parametrize("generator", [tiny_bart_config(), tiny_t5_config()], ids=["bart", "t5"])
def test_config_json_holds_both_parts_in_full_as_transformers_writes_them(tmp_path, generator):
    # A checkpoint must not depend on the sub-config defaults of the library version that reads it.
    ours = RagConfig.from_question_encoder_generator_configs(tiny_dpr_config(), generator, n_docs=4)
    theirs = transformers.RagConfig.from_question_encoder_generator_configs(
        tiny_dpr_config(), generator, n_docs=4
    )
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    expected = json.loads((tmp_path / "theirs" / "config.json").read_text())
    for part in ("question_encoder", "generator"):
        assert saved[part] == expected[part], part
        assert {"architectures", "dtype", "id2label", "return_dict"} <= set(saved[part])
    assert saved["n_docs"] == 4


def test_ragkit_fields_survive_a_transformers_round_trip(tmp_path):
    ours = RagConfig.from_question_encoder_generator_configs(
        tiny_dpr_config(), tiny_bart_config(), index_ef_search=128, question_encoder_pooling="mean"
    )
    ours.save_pretrained(tmp_path / "a")
    transformers.RagConfig.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    back = RagConfig.from_pretrained(tmp_path / "b")
    assert back.index_ef_search == 128
    assert back.question_encoder_pooling == "mean"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_docs", 0, "n_docs"),
        ("n_docs", -3, "n_docs"),
        ("index_name", "faiss", "index_name"),
        ("max_combined_length", 0, "max_combined_length"),
        ("label_smoothing", 1.5, "label_smoothing"),
        ("index_nprobe", 0, "index_nprobe"),
        ("question_encoder_pooling", "max", "question_encoder_pooling"),
        ("embeddings_name", "squad", "embeddings_name"),
        ("index_name", "psgs_w100.nq.flat", "index_name"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        RagConfig.from_question_encoder_generator_configs(
            tiny_dpr_config(), tiny_bart_config(), **{field: value}
        )


@pytest.mark.parametrize("missing", ["question_encoder", "generator"])
def test_missing_sub_config_is_a_value_error(missing):
    kwargs = {"question_encoder": tiny_dpr_config().to_dict(), "generator": tiny_bart_config().to_dict()}
    del kwargs[missing]
    with pytest.raises(ValueError, match=missing):
        RagConfig(**kwargs)


def test_sub_config_dict_without_model_type_is_rejected():
    generator = tiny_bart_config().to_dict()
    del generator["model_type"]
    with pytest.raises(ValueError, match="model_type"):
        RagConfig(question_encoder=tiny_dpr_config().to_dict(), generator=generator)


def test_from_question_encoder_generator_configs_signature_matches_reference():
    ours = inspect.signature(RagConfig.from_question_encoder_generator_configs)
    reference = inspect.signature(transformers.RagConfig.from_question_encoder_generator_configs)
    assert list(ours.parameters) == list(reference.parameters)


def test_wiki_dpr_config_names_are_valid_index_names():
    config = RagConfig.from_question_encoder_generator_configs(
        tiny_dpr_config(), tiny_bart_config(), index_name="psgs_w100.multiset.compressed"
    )
    assert config.index_name == "psgs_w100.multiset.compressed"


@pytest.mark.parametrize(
    "field, value",
    [
        ("label_smoothing", "a lot"),
        ("label_smoothing", None),
        ("label_smoothing", True),
        ("n_docs", "5"),
        ("n_docs", 5.0),
        ("n_docs", True),
        ("max_combined_length", None),
        ("max_combined_length", 300.5),
        ("retrieval_batch_size", "8"),
        ("retrieval_vector_size", [768]),
        ("index_ef_search", "128"),
        ("title_sep", 3),
        ("doc_sep", None),
        ("dataset_split", ["train"]),
        ("dataset", 7),
        ("index_path", 3.5),
        ("passages_path", {"a": 1}),
        ("dataset_revision", 2),
        ("use_dummy_dataset", "yes"),
        ("reduce_loss", "False"),
        ("do_deduplication", 2),
        ("exclude_bos_score", None),
        ("do_marginalize", "true"),
        ("output_retrieved", 1.0),
        ("question_encoder_normalize", "no"),
        ("forced_eos_token_id", "2"),
    ],
)
def test_wrong_typed_fields_are_named(field, value):
    """Each RAG field of the wrong type gives a RagInputError naming it and the value (not a bare float() error)."""
    from ragkit.errors import RagInputError

    with pytest.raises(RagInputError, match=rf"RagConfig: `{field}` must be .*got {re.escape(repr(value))}"):
        RagConfig.from_question_encoder_generator_configs(
            tiny_dpr_config(), tiny_bart_config(), **{field: value}
        )


def test_well_typed_fields_are_still_accepted(tmp_path):
    config = RagConfig.from_question_encoder_generator_configs(
        tiny_dpr_config(),
        tiny_bart_config(),
        label_smoothing=0,  # an int is a number
        reduce_loss=1,  # JSON written by hand may hold 0/1 for booleans
        dataset=tmp_path,  # a path object for a local mirror
        index_path=str(tmp_path / "index.faiss"),
        dataset_revision="main",
        forced_eos_token_id=2,
        index_ef_search=64,
    )
    assert config.label_smoothing == 0 and config.reduce_loss == 1 and config.dataset == tmp_path


def test_config_errors_are_assertion_errors_too():
    """Transformers' RagConfig asserts that both sub-configs are given; code catching AssertionError still works."""
    with pytest.raises(AssertionError, match="question_encoder"):
        RagConfig(generator=tiny_bart_config().to_dict())


def test_directory_without_config_json_is_a_missing_file_error(tmp_path):
    from ragkit.errors import MissingFileError

    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(MissingFileError, match=r"config\.json does not exist") as raised:
        RagConfig.from_pretrained(tmp_path)
    assert str(tmp_path) in str(raised.value) and "RagConfig needs" not in str(raised.value)


def test_a_hub_checkpoint_offline_is_a_ragkit_error(monkeypatch):
    """Offline, a Hub id not in the cache is an OfflineFileError naming it, not transformers' OSError."""
    from huggingface_hub import constants

    from ragkit.errors import OfflineFileError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineFileError, match=r"'no-such-user/no-such-rag'.*HF_HUB_OFFLINE=1"):
        RagConfig.from_pretrained("no-such-user/no-such-rag")


def test_a_hub_checkpoint_without_network_fails_fast_with_what_to_do(tmp_path):
    """No connection (a closed local port as the endpoint): one quick probe, then HubUnreachableError."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    code = (
        "from ragkit import RagConfig\n"
        "from ragkit.errors import HubUnreachableError\n"
        "try:\n    RagConfig.from_pretrained('no-such-user/no-such-rag')\n"
        "except HubUnreachableError as err:\n    print('unreachable:', err)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "unreachable:" in result.stdout and "HF_HUB_OFFLINE=1" in result.stdout
    assert time.monotonic() - started < 60  # no five retries with back-off
