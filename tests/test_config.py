import pytest

from echolm.config import config_from_dict, list_presets, load_config
from echolm.errors import EchoError


def test_presets_load_and_are_data():
    assert {"micro", "cpu", "gpu-small", "gpu-d20"} <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.model.vocab_size == cfg.tokenizer.vocab_size


def test_overrides_are_typed():
    cfg = load_config("micro", ["pretrain.max_steps=7", "pretrain.dtype=bf16",
                                "model.qk_norm=false", "pretrain.lr_matrix=1e-3",
                                'data.pretrain=["a.txt", "b.jsonl"]', "model.n_embd=128"])
    assert cfg.pretrain.max_steps == 7 and cfg.pretrain.dtype == "bf16"
    assert cfg.model.qk_norm is False and cfg.pretrain.lr_matrix == 1e-3
    assert cfg.data.pretrain == ["a.txt", "b.jsonl"]
    assert cfg.model.d_head == 32  # derived from the overridden width


def test_round_trip_through_dict():
    cfg = load_config("cpu", ["pretrain.max_steps=3"])
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad, words", [
    (["nosection.x=1"], "unknown section 'nosection'"),
    (["pretrain.nofield=1"], "unknown field 'pretrain.nofield'"),
    (["pretrain.max_steps=ten"], "pretrain.max_steps: expected int"),
    (["pretrain.max_steps"], "expected section.field=value"),
    (["model.n_kv_head=3"], "multiple of model.n_kv_head=3"),
])
def test_bad_overrides_name_the_field(bad, words):
    with pytest.raises(EchoError, match=words.replace(".", r"\.").replace("(", r"\(")):
        load_config("micro", bad)


def test_unknown_preset_lists_known():
    with pytest.raises(EchoError, match="unknown preset 'nope'.*micro"):
        load_config("nope")


@pytest.mark.parametrize("bad, words", [
    ("pretrain.seq_len=0", "pretrain.seq_len=0 must be positive"),
    ("sft.ckpt_every=0", "sft.ckpt_every=0 must be positive"),
    ("rl.micro_batch=-1", "rl.micro_batch=-1 must be positive"),
    ("pretrain.dtype=fp8", "expected auto, fp32 or bf16"),
    ("pref.rank_temperatures=[1.0, 0.0]", r"pref.rank_temperatures=\[1.0, 0.0\] must be positive"),
])
def test_training_settings_are_validated(bad, words):
    with pytest.raises(EchoError, match=words):
        load_config("micro", [bad])
