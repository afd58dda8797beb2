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
    ("rm.micro_batch=-1", "rm.micro_batch=-1 must be positive"),
    ("pretrain.dtype=fp8", "expected auto, fp32 or bf16"),
    ("pref.rank_temperatures=[1.0, 0.0]", r"pref.rank_temperatures=\[1.0, 0.0\] must be positive"),
    # every stage's settings are checked when the config is built, before the first stage runs
    ("pretrain.lr_matrix=-1", "pretrain.lr_matrix=-1.0 must be a finite number > 0"),
    ("pretrain.lr_matrix=nan", "pretrain.lr_matrix=nan must be a finite number > 0"),
    ("dpo.max_minutes=inf", "dpo.max_minutes=inf must be a finite number >= 0"),
    ("rm.adam_betas=[0.9, 1.5]", "adam_betas"),
    ("grpo.group_size=1", "grpo.group_size=1 must be >= 2"),
    ("grpo.prompts_per_step=0", "grpo.prompts_per_step=0 must be >= 1"),
    ("grpo.eval_samples=0", "grpo.eval_samples=0 must be >= 1"),
    ("grpo.tasks=[]", "grpo.tasks is empty"),
    ('grpo.tasks=["nosuch"]', "grpo.tasks: 'nosuch': unknown task"),
    ("grpo.temperature=-1", "grpo.temperature=-1.0 must be a finite number > 0"),
    ("grpo.aggregation=mean", "grpo.aggregation must be token, sequence or constant"),
    ("ppo.algorithm=foo", "ppo.algorithm must be ppo, rloo, grpo or best, got 'foo'"),
    ("ppo.max_tokens=-1", "ppo.max_tokens=-1 must be >= 1"),
    ("ppo.algorithm=rloo", "needs ppo.samples_per_prompt >= 2"),
    ("ppo.lam=2", "ppo.lam=2.0 must be in"),
])
def test_training_settings_are_validated(bad, words):
    with pytest.raises(EchoError, match=words):
        load_config("micro", [bad])


@pytest.mark.parametrize("field, words", [
    ("rl.micro_batch=4", "rl.micro_batch is not read by the rl stage: one step is one batch of "
                         "rollouts: its size is grpo.prompts_per_step x grpo.group_size"),
    ("rlhf.seq_len=64", "rlhf.seq_len is not read by the rlhf stage"),
    ("rl.eval_every=5", "RL measures pass@k before and after only"),
    ("sft.eval_tokens=1024", "sft.eval_tokens is not read by the sft stage"),
    ("dpo.sample_every=10", "dpo.sample_every is not read by the dpo stage"),
])
def test_a_field_its_stage_does_not_read_is_refused(field, words):
    with pytest.raises(EchoError, match=words):
        load_config("micro", [field])


def test_saved_config_holds_only_fields_that_act_and_old_ones_still_load():
    from echolm.config import UNREAD_FIELDS

    d = load_config("cpu").to_dict()
    for section, unread in UNREAD_FIELDS.items():
        assert not set(d[section]) & set(unread), section
    assert "micro_batch" in d["pretrain"] and "micro_batch" in d["dpo"]
    # a run saved before these fields were hidden (or log_every retired) still loads
    old = load_config("cpu").to_dict()
    old["rl"].update(micro_batch=4, seq_len=512, log_every=1)
    assert config_from_dict(old).to_dict() == d


@pytest.mark.parametrize("name", ["micro", "cpu", "gpu-small", "gpu-d20"])
def test_presets_print_as_a_preset_file_with_every_field_documented(name, tmp_path):
    import dataclasses

    from echolm.config import field_docs, to_toml

    cfg = load_config(name)
    text = to_toml(cfg)
    path = tmp_path / f"{name}-copy.toml"
    path.write_text(text)
    again = load_config(str(path)).to_dict()  # the printed file is a preset that loads back
    assert {**again, "preset": name} == cfg.to_dict()
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            docs = field_docs(type(section))
            for key in cfg.to_dict()[f.name]:
                assert docs.get(key), f"{f.name}.{key} has no one-line doc"
                assert f"{key} = " in text


def test_a_stage_help_lists_its_settings_with_their_docs(echolm_cli):
    r = echolm_cli("rl", "--help")
    assert r.returncode == 0
    assert "grpo.group_size = 8  samples per prompt" in r.stdout
    assert "rl.max_minutes = 0.0  0 = no time limit" in r.stdout
    assert "rl.micro_batch" not in r.stdout  # not read by the rl stage
