import pytest

from echolm.errors import EchoError
from echolm.settings import config_from_dict, list_presets, load_config


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


def test_compile_is_accepted_where_it_reaches_the_training_forward():
    cfg = load_config("micro", ["pretrain.compile=true", "sft.compile=true", "rm.compile=true"])
    assert cfg.pretrain.compile and cfg.sft.compile and cfg.rm.compile


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
    ("rank.temperatures=[1.0, 0.0]", r"rank.temperatures=\[1.0, 0.0\] must be positive"),
    # every stage's settings are checked when the config is built, before the first stage runs
    ("pretrain.lr_matrix=-1", "pretrain.lr_matrix=-1.0 must be a finite number > 0"),
    ("pretrain.lr_matrix=nan", "pretrain.lr_matrix=nan must be a finite number > 0"),
    ("dpo.max_minutes=inf", "dpo.max_minutes=inf must be a finite number >= 0"),
    ("rm.adam_betas=[0.9, 1.5]", "adam_betas"),
    ("rl.group_size=1", "rl.group_size=1 must be >= 2"),
    ("rl.prompts_per_step=0", "rl.prompts_per_step=0 must be >= 1"),
    ("rl.eval_samples=0", "rl.eval_samples=0 must be >= 1"),
    ("rl.tasks=[]", "rl.tasks is empty"),
    ('rl.tasks=["nosuch"]', "rl.tasks: 'nosuch': unknown task"),
    ('sft.tasks=["nosuch"]', "sft.tasks: 'nosuch': unknown task"),
    ("rl.temperature=-1", "rl.temperature=-1.0 must be a finite number > 0"),
    ("rl.aggregation=mean", "rl.aggregation must be token, sequence or constant"),
    ("rl.tis_cap=0.5", r"rl.tis_cap=0.5 must be 0 \(off\) or >= 1"),
    ("rl.tis_cap=-1", "rl.tis_cap=-1.0 must be a finite number >= 0"),
    ("rlhf.algorithm=foo", "rlhf.algorithm must be ppo, rloo, grpo or best, got 'foo'"),
    ("rlhf.max_tokens=-1", "rlhf.max_tokens=-1 must be >= 1"),
    ("rlhf.algorithm=rloo", "needs rlhf.samples_per_prompt >= 2"),
    ("rlhf.lam=2", "rlhf.lam=2.0 must be in"),
    # compile would not reach the hidden-state passes these stages train through
    ("dpo.compile=true", "dpo.compile=true has no effect in this stage"),
    ("rl.compile=true", "rl.compile=true has no effect in this stage"),
    ("rlhf.compile=true", "rlhf.compile=true has no effect in this stage"),
])
def test_training_settings_are_validated(bad, words):
    with pytest.raises(EchoError, match=words):
        load_config("micro", [bad])


@pytest.mark.parametrize("field, words", [
    ("rl.micro_batch=4", "rl.micro_batch is not a setting of the rl stage: one step is one batch "
                         "of rl.prompts_per_step x rl.group_size rollouts"),
    ("rlhf.seq_len=64", "rlhf.seq_len is not a setting of the rlhf stage"),
    ("sft.eval_tokens=1024", "sft.eval_tokens is not a setting of the sft stage"),
    ("grpo.group_size=4", "grpo.group_size is now rl.group_size"),
    ("ppo.kl_beta=0", "ppo.kl_beta is now rlhf.kl_beta"),
    ("pref.dpo_beta=0.2", "pref.dpo_beta is now dpo.beta"),
    ("pref.heldout_fraction=0.2", "pref.heldout_fraction is now data.rankings_heldout_fraction"),
])
def test_each_stage_has_one_section_and_old_names_say_where_they_went(field, words):
    with pytest.raises(EchoError, match=words):
        load_config("micro", [field])


def test_every_section_holds_only_what_its_stage_reads():
    d = load_config("cpu").to_dict()
    assert set(d) == {"tokenizer", "model", "data", "pretrain", "sft", "rl", "rank", "rm",
                      "rlhf", "dpo", "run", "preset"}
    rollout_free = {"seq_len", "micro_batch", "grad_accum", "eval_tokens", "sample_every"}
    assert not rollout_free & set(d["rl"]) and not rollout_free & set(d["rlhf"])
    assert "eval_every" not in d["rl"] and d["rlhf"]["eval_every"] == 5  # the guard's
    assert {"group_size", "tasks", "max_minutes"} <= set(d["rl"])
    assert {"beta", "nll_coef", "ptx_rows", "micro_batch"} <= set(d["dpo"])
    assert "eval_tokens" in d["pretrain"] and "eval_tokens" not in d["sft"]


def test_a_run_saved_with_the_earlier_layout_still_loads():
    """config.json of an earlier run: [grpo], [ppo], [pref] and loop fields of rl / rlhf that
    nothing read; read back under the new names, with the same values."""
    now = load_config("cpu")
    old = now.to_dict()
    rl_loop = {k: v for k, v in old["rl"].items() if k in old["pretrain"]}
    old["grpo"] = {k: v for k, v in old["rl"].items() if k not in rl_loop}
    old["rl"] = {**rl_loop, "micro_batch": 4, "seq_len": 512, "log_every": 1}
    rlhf_loop = {k: v for k, v in old["rlhf"].items() if k in old["pretrain"]
                 and k != "eval_every"}
    old["ppo"] = {k: v for k, v in old["rlhf"].items() if k not in rlhf_loop}
    old["rlhf"] = {**rlhf_loop, "eval_every": 100}
    old["pref"] = {"annotator": "", "heldout_fraction": 0.15, "rank_prompts": 1000,
                   "rank_minutes": 1.5, "rank_k": 4, "rank_temperatures": [1.0, 1.0, 1.0, 1.5],
                   "annotator_noise": 0.03, "rm_loss": "bt", "dpo_beta": 0.1,
                   "dpo_nll_coef": 1.0, "dpo_ptx_coef": 1.0}
    for key in ("rank", "data"):
        old.pop(key) if key == "rank" else old["data"].pop("rankings_heldout_fraction")
    for key in ("beta", "nll_coef", "ptx_coef", "ptx_rows"):
        old["dpo"].pop(key)
    assert config_from_dict(old).to_dict() == now.to_dict()


@pytest.mark.parametrize("name", ["micro", "cpu", "gpu-small", "gpu-d20"])
def test_presets_print_as_a_preset_file_with_every_field_documented(name, tmp_path):
    import dataclasses

    from echolm.settings import field_docs, to_toml

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
    assert "rl.group_size = 8  samples per prompt" in r.stdout
    assert "rl.max_minutes = 0.0  0 = no time limit" in r.stdout
    assert "rl.micro_batch" not in r.stdout  # not read by the rl stage
