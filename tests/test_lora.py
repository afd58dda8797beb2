"""LoRA (echolm/lora.py) with peft really installed as the reference: a fresh adapter changes
nothing; only the adapters train; the merged model computes what the adapted one does;
adapters_disabled is the base model exactly; Echo's saved adapter, loaded by
`peft.PeftModel.from_pretrained` onto the exported model, gives Echo's logits and peft's merge
equals Echo's; a real `echolm dpo` run with LoRA writes the adapter and the merged model and
resumes bit-identical after a SIGKILL; bad settings are one line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from safetensors.torch import load_file
from test_reward_model import pref_run, pref_template, quiet  # noqa: F401  (fixtures)

from echolm.checkpoint import load_model
from echolm.config import LORA_TARGETS, ModelConfig
from echolm.lora import (
    BaseView,
    adapters_disabled,
    add_lora,
    free_casts,
    frozen_reference,
    has_lora,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    save_adapter,
)
from echolm.model import Transformer
from echolm.optim import build_optimizers
from echolm.settings import load_config

os.environ["HF_HUB_OFFLINE"] = "1"  # every model is built here, nothing from the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _random_model(seed: int = 0, **fields) -> Transformer:
    """A tiny model with every weight random (Echo zeroes o_proj, down_proj and the head at
    init: zeros would hide a transposed or misplaced update)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, max_seq_len=64)
    m = Transformer(ModelConfig(**{**cfg, **fields}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return m


def _train(model: Transformer, steps: int = 4, lr: float = 0.05, **settings) -> None:
    """A few real optimizer updates (build_optimizers: AdamW for the adapters) on a next-token
    loss, so B moves away from zero."""
    cfg = load_config("micro").sft
    cfg.lr_matrix = lr
    for k, v in settings.items():
        setattr(cfg, k, v)
    opts = build_optimizers(model, cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, model.cfg.vocab_size, (4, 16), generator=g)
        model(x[:, :-1], targets=x[:, 1:]).backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)


def test_a_fresh_adapter_changes_nothing_and_only_adapters_train():
    m = _random_model()
    x = torch.randint(0, 64, (3, 20))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        want = m(x)
    n = add_lora(m, rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"], seed=0)
    # per layer: q (32->32) 4*(32+32), v (32->16) 4*(32+16), down (d_mlp->32) 4*(d_mlp+32)
    d_mlp = m.cfg.d_mlp
    assert n == 2 * 4 * ((32 + 32) + (32 + 16) + (d_mlp + 32))
    assert n == sum(p.numel() for p in m.parameters() if p.requires_grad)
    trainable = sorted(k for k, p in m.named_parameters() if p.requires_grad)
    assert trainable[:2] == ["layers.0.mlp.down_proj.lora_A.weight",
                             "layers.0.mlp.down_proj.lora_B.weight"]
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in trainable)
    assert len(trainable) == 2 * 3 * 2
    with torch.no_grad():
        assert torch.equal(m(x), want)  # B = 0: exactly the model it was

    _train(m)
    after = m.state_dict()
    for k, v in before.items():  # every base weight byte-identical, under its peft name
        peft_key = k if k in after else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(after[peft_key], v), k
    for k in trainable:
        if k.endswith("lora_B.weight"):
            assert after[k].abs().min() > 0, k  # every entry of B moved off zero
    with torch.no_grad():
        assert not torch.allclose(m(x), want, atol=1e-3)  # the adapters do something
        with adapters_disabled(m):
            assert torch.equal(m(x), want)  # the frozen base model, exactly
        assert torch.equal(BaseView(m)(x), want)
        assert torch.equal(BaseView(m).hidden_states(x), _hidden(before, m.cfg, x))
        # a shared prompt read through the base view: the base model's numbers too
        rows, real = torch.tensor([0, 0]), torch.ones(1, 3, dtype=torch.bool)
        shared = BaseView(m).prompt_answer_states(x[:1, :3], real, x[:2, 3:6], rows)
        assert torch.allclose(shared[0], _hidden(before, m.cfg, x[:1, :5])[0, 2:], atol=1e-5)


def _hidden(sd: dict, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    plain = Transformer(cfg)
    plain.load_state_dict(sd)
    with torch.no_grad():
        return plain.hidden_states(x)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_merged_model_computes_what_the_adapted_one_does(dropout):
    m = _random_model(seed=1)
    add_lora(m, rank=8, alpha=16.0, targets=list(LORA_TARGETS), dropout=dropout, seed=3)
    _train(m, lr=0.02)
    m.eval()  # dropout off: the adapted model's function
    x = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        adapted = m(x)
        copy = merged_state_dict(m)  # does not change the model
        assert has_lora(m) and torch.equal(m(x), adapted)
        merge_lora(m)
        merged = m(x)
    assert not has_lora(m)
    assert type(m.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert (merged - adapted).abs().max() < 1e-5
    plain = m.state_dict()
    assert plain.keys() == copy.keys() and all(torch.equal(plain[k], copy[k]) for k in plain)


def test_under_bf16_autocast_the_frozen_base_is_cast_once_and_computes_the_same():
    """Autocast re-casts a frozen weight at every call (it caches only weights that require
    grad); LoRA's base keeps one bf16 copy instead: the same numbers as autocast's own cast
    (forward and gradients), one copy per weight over many forwards, remade when the weight
    changes in place (a merge, a load)."""
    m = _random_model(seed=2)
    add_lora(m, rank=4, alpha=8.0, targets=list(LORA_TARGETS), seed=0)
    _train(m, steps=2)
    layer = m.layers[0].self_attn.q_proj
    x0 = torch.randn(3, 5, 32, requires_grad=True)

    def run(use_copy: bool) -> tuple[torch.Tensor, ...]:
        x0.grad = None
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.grad = None
        x = x0 * 1.0  # an activation, as in a model (autocast caches the cast of a leaf)
        with torch.autocast("cpu", torch.bfloat16):
            if use_copy:
                y = layer(x)
            else:  # what autocast computes without the copy: the base layer itself
                y = layer.base_layer(x).add_(layer.lora_B(layer.lora_A(x)) * layer.scaling)
        y.float().square().sum().backward()
        return y, x0.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad

    for got, want in zip(run(True), run(False), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    copy = layer._cast[2]
    assert copy.dtype == torch.bfloat16
    run(True)
    assert layer._cast[2] is copy  # cast once
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)  # changed in place: the copy is remade
    run(True)
    assert torch.equal(layer._cast[2], layer.base_layer.weight.to(torch.bfloat16))
    free_casts(m)  # before a rollout (rollout.sample_responses): the copies go
    assert all(mod._cast is None for mod in m.modules() if hasattr(mod, "_cast"))
    # a forward under inference_mode first (an evaluation): its copy is not kept, so the
    # next training forward can still save its copy for the backward
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        layer(x0.detach())
    assert layer._cast is None
    for got, want in zip(run(True), run(False), strict=True):
        assert torch.equal(got, want)
    with torch.no_grad():  # fp32 (no autocast): the base layer as it is, no copy involved
        assert torch.equal(layer(x0), layer.base_layer(x0) + layer.lora_B(layer.lora_A(x0))
                           * layer.scaling)


def test_a_bf16_stages_reference_stores_its_projections_in_bf16_and_scores_the_same():
    """Full fine-tuning in bf16: the frozen reference keeps its projections in bf16 (half
    their memory, no cast at every pass); under autocast its log-probs equal, bit for bit,
    those of an fp32 copy under the same autocast. The tied head gets its own bf16 copy, the
    embedding stays fp32; outside autocast it still runs (its weights cast up). fp32 stages
    get a plain copy; an untied model's head is stored in bf16 too."""
    from echolm.rollout import token_logprobs

    m = _random_model(seed=3, tie_embeddings=True)
    ref = frozen_reference(m, torch.bfloat16)
    plain = frozen_reference(m)
    assert ref.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert ref.lm_head.weight.dtype == torch.bfloat16  # its own copy of the tied head
    assert ref.embed_tokens.weight.dtype == torch.float32  # lookups as before
    assert m.lm_head.weight is m.embed_tokens.weight  # the policy untouched
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    assert not any(p.requires_grad for p in ref.parameters())
    x = torch.randint(0, 64, (4, 9))
    y = torch.randint(0, 64, (4, 9))
    mask = torch.zeros(4, 9)
    mask[:, 4:] = 1
    mask[1:3, 7:] = 0  # answers of different lengths
    x[1] = x[0]  # a shared prompt too
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(token_logprobs(ref, x, y, mask)[0],
                           token_logprobs(plain, x, y, mask)[0])
        assert torch.equal(ref(x), plain(x))
    with torch.no_grad():
        assert torch.allclose(ref(x), plain(x), atol=0.05)  # bf16-rounded weights, fp32 math
    untied = frozen_reference(_random_model(seed=3), torch.bfloat16)
    assert untied.lm_head.weight.dtype == torch.bfloat16
    assert untied.embed_tokens.weight.dtype == torch.float32


def test_adapters_in_the_optimizers_adamw_at_lr_matrix_and_no_muon():
    m = _random_model()
    full, matmul = m.flops_per_token(16), m.num_params(non_embedding=True) + 64 * 32
    n = add_lora(m, 2, 4.0, ["q_proj", "o_proj"], seed=0)
    # MFU's count: 6 FLOPs per trained weight, 4 per frozen one (no weight gradient)
    assert m.flops_per_token(16) == full + 6 * n - 2 * matmul
    cfg = load_config("micro").sft
    opts = build_optimizers(m, cfg)
    assert len(opts) == 1 and isinstance(opts[0], torch.optim.AdamW)
    (group,) = opts[0].param_groups
    assert group["lr"] == cfg.lr_matrix and len(group["params"]) == 2 * 2 * 2
    assert not m.embed_tokens.weight.requires_grad and not m.norm.weight.requires_grad


def test_bad_arguments_are_refused():
    from echolm.errors import EchoError

    m = _random_model()
    with pytest.raises(EchoError, match="expected one or more of q_proj"):
        add_lora(m, 4, 8.0, ["lm_head"])
    with pytest.raises(EchoError, match="rank 0 must be positive"):
        add_lora(m, 0, 8.0, ["q_proj"])
    add_lora(m, 4, 8.0, ["q_proj"])
    with pytest.raises(EchoError, match="has LoRA adapters already"):
        add_lora(m, 4, 8.0, ["q_proj"])


# ---- peft as the reference ------------------------------------------------------------------

@pytest.mark.parametrize("qk_norm", [True, False])  # Qwen3ForCausalLM, LlamaForCausalLM
def test_peft_loads_echos_adapter_and_merges_as_echo_does(qk_norm, pref_template,  # noqa: F811
                                                          tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from echolm.hf import hf_config, hf_state_dict
    from echolm.tokenizer import Tokenizer

    tok = Tokenizer.load(pref_template / "tokenizer")
    m = _random_model(seed=2, vocab_size=tok.vocab_size, qk_norm=qk_norm)
    base_sd = hf_state_dict(m)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # not gate
    n = add_lora(m, rank=4, alpha=12.0, targets=targets, seed=5)
    _train(m, lr=0.02)
    save_adapter(m, tmp_path / "adapter", "echo-base")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout",
                                   "target_modules", "bias", "base_model_name_or_path",
                                   "fan_in_fan_out")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 12.0,
        "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
        "base_model_name_or_path": "echo-base", "fan_in_fan_out": False}
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == lora_state_dict(m).keys()
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in saved

    hf_cfg = transformers.AutoConfig.for_model(**hf_config(m.cfg, tok))
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(base_sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    # peft's own adapter on the same model: the same keys and the same number of parameters
    fresh = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                                                    task_type="CAUSAL_LM"))
    assert set(peft.get_peft_model_state_dict(fresh)) == set(saved)
    assert fresh.get_nb_trainable_parameters()[0] == n
    hf = fresh.unload()  # the plain model again

    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    m.eval()
    x = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        ours, theirs = m(x), pm(x).logits
        assert (ours - theirs).abs().max() < 1e-4  # names, A/B orientation, alpha / r
        with pm.disable_adapter(), adapters_disabled(m):
            assert (m(x) - pm(x).logits).abs().max() < 1e-4
    merged_hf = pm.merge_and_unload().state_dict()
    merge_lora(m)
    for k, v in hf_state_dict(m).items():
        assert torch.allclose(merged_hf[k], v, atol=1e-6, rtol=0), k


# ---- settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ('rl.lora_targets=["q_proj", "lm_head"]',
     "rl.lora_targets=[\"q_proj\", \"lm_head\"]: unknown 'lm_head'; expected one or more of "
     "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
    ("dpo.lora_targets=[]", "dpo.lora_targets=[]: none; expected one or more of q_proj"),
    ('sft.lora_targets=["v_proj", "v_proj"]', "a name twice"),
    ("rl.lora_rank=-1", "rl.lora_rank=-1 must be >= 0"),
    ("rlhf.lora_alpha=0", "rlhf.lora_alpha=0.0 must be a finite number > 0"),
    ("sft.lora_dropout=1", "sft.lora_dropout=1.0 must be in [0, 1)"),
    ("pretrain.lora_rank=8", "pretrain.lora_rank=8: pretrain trains the whole model"),
    ("rm.lora_rank=8", "rm.lora_rank=8: rm trains the whole model"),
])
def test_bad_lora_settings_are_one_line(override, message):
    from echolm.errors import EchoError

    with pytest.raises(EchoError) as e:
        load_config("micro", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_cli_refuses_a_bad_target_with_one_line_and_exit_2(tmp_path, echolm_cli):
    r = echolm_cli("dpo", "--out", tmp_path / "run", "--preset", "micro", "--set",
                   'dpo.lora_targets=["q_proj", "qproj"]')
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("echolm: error: dpo.lora_targets=[\"q_proj\", \"qproj\"]: unknown "
                        "'qproj'; expected one or more of q_proj, k_proj, v_proj, o_proj, "
                        "gate_proj, up_proj, down_proj\n")
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---- the stages -----------------------------------------------------------------------------

def _check_merged(stage: Path, start: Path) -> dict:
    """`stage`/model.safetensors is `start`'s model with `stage`/adapter folded in (W + B A
    alpha / r on every adapted projection) and every other tensor byte-identical: the base
    stayed frozen, the adapter is the model's and it was trained. Returns its config."""
    config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(start)
    adapter = load_file(str(stage / "adapter" / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    base, merged = load_file(str(start / "model.safetensors")), load_file(
        str(stage / "model.safetensors"))
    assert base.keys() == merged.keys()
    adapted = 0
    for k, w in base.items():
        name = "base_model.model.model." + k.removesuffix(".weight")
        if f"{name}.lora_A.weight" in adapter:
            a, b = adapter[f"{name}.lora_A.weight"], adapter[f"{name}.lora_B.weight"]
            assert a.shape == (config["r"], w.shape[1]) and b.shape == (w.shape[0], config["r"])
            assert torch.allclose(merged[k], w + (b @ a) * scale, atol=1e-6, rtol=0), k
            adapted += 1
        else:
            assert torch.equal(merged[k], w), k  # frozen
    assert adapted == len(adapter) // 2 == 2 * len(config["target_modules"])  # 2 layers
    moved = [k for k, v in adapter.items() if k.endswith("lora_B.weight") and v.any()]
    assert moved, "the stage never updated its adapters"
    return config


def _stage_metrics(run: Path, stage: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("stage") == stage and "loss" in r]


DPO_ARGS = ("--preset", "micro", "--set", "dpo.lora_rank=4", "--set", "dpo.lora_alpha=8",
            "--set", 'dpo.lora_targets=["q_proj", "v_proj", "o_proj", "down_proj"]',
            "--set", "dpo.max_steps=12", "--set", "dpo.ckpt_every=2", "--set", "dpo.eval_every=0")


def _dpo(run: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "echolm", "dpo", "--out", str(run),
                             *DPO_ARGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=subprocess_env())


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_lora_dpo_writes_adapter_and_merged_model_and_resumes_exactly(pref_run,  # noqa: F811
                                                                      tmp_path):
    from test_resume import _kill, _wait_for

    ref = tmp_path / "ref"
    shutil.copytree(pref_run, ref)
    out = _finish(_dpo(ref))
    assert out.count("dpo: LoRA r=4: 4,864 trainable parameters of 0.164M") == 1
    # 2 layers x 4 x (q 64+64, v 64+32, o 64+64, down 192+64) = 4,864

    # killed (SIGKILL) once a checkpoint is written, mid-run; the same command resumes it
    ckpt = pref_run / "dpo" / "ckpt"
    proc = _dpo(pref_run)
    assert _wait_for(lambda: (ckpt / "latest").exists(), proc), "no checkpoint"
    _kill(proc)
    assert not (pref_run / "dpo" / "done.json").exists()
    step = int((ckpt / "latest").read_text().removeprefix("step_"))
    assert step < 12
    assert f"dpo: resuming from step {step}" in _finish(_dpo(pref_run))

    # the same run as the uninterrupted one, bit for bit: losses, merged model, adapter
    assert [r["loss"] for r in _stage_metrics(pref_run, "dpo")] == [
        r["loss"] for r in _stage_metrics(ref, "dpo")]
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        want, have = load_file(str(ref / "dpo" / name)), load_file(str(pref_run / "dpo" / name))
        assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)

    config = _check_merged(pref_run / "dpo", pref_run / "sft")
    assert config["target_modules"] == ["q_proj", "v_proj", "o_proj", "down_proj"]
    done = json.loads((pref_run / "dpo" / "done.json").read_text())
    assert done["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "trainable_params": 4864,
                            "targets": ["q_proj", "v_proj", "o_proj", "down_proj"]}
    assert json.loads((pref_run / "summary.json").read_text())["dpo"]["lora"] == done["lora"]
    assert not has_lora(load_model(pref_run / "dpo"))  # a plain model for chat, eval, export

    # `echolm export hf` exports the merged model; peft's adapter on the exported SFT model
    # computes the same logits
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from echolm.cli import main

    for stage in ("sft", "dpo"):
        assert main(["export", "hf", "--run", str(pref_run), "--stage", stage,
                     "--out", str(tmp_path / stage)]) == 0
    load = transformers.AutoModelForCausalLM.from_pretrained
    dpo_hf = load(tmp_path / "dpo", dtype=torch.float32).eval()
    sft_peft = peft.PeftModel.from_pretrained(load(tmp_path / "sft", dtype=torch.float32),
                                              pref_run / "dpo" / "adapter").eval()
    x = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (dpo_hf(x).logits - sft_peft(x).logits).abs().max() < 1e-4


def test_lora_rl_with_a_kl_penalty_measures_against_the_base(pref_run):  # noqa: F811
    from echolm.train.grpo import run_rl

    logs: list[str] = []
    cfg = load_config("micro", ["rl.lora_rank=2", "rl.kl_beta=0.1", "rl.format_reward=0.5",
                                "rl.dynamic_sampling=false", "rl.lr_matrix=0.01"])
    res = run_rl(cfg, pref_run, log=logs.append)
    assert res["lora"]["trainable_params"] == 2 * 2 * (128 + 96 + 96 + 128 + 3 * 256)
    assert sum("LoRA r=2" in m for m in logs) == 1
    recs = _stage_metrics(pref_run, "rl")
    assert len(recs) == 3 and recs[0]["kl"] == 0.0  # the reference is the starting policy
    # in fp32 the decoder's log-probs (merged LoRA weights, fused projections, a KV cache)
    # are the trainer's: the mismatch truncated importance sampling corrects is ~0
    assert res["sampler"]["steps"] == 3 and res["sampler"]["tis_cap"] == 2.0
    assert res["sampler"]["sampler_kl"] < 1e-5 and res["sampler"]["tis_capped"] == 0.0
    _check_merged(pref_run / "rl", pref_run / "sft")


def test_lora_rlhf_ppo_keeps_the_value_head_out_of_the_model(pref_run):  # noqa: F811
    from echolm.checkpoint import save_model
    from echolm.reward import reward_model_from_backbone
    from echolm.train.rlhf import run_rlhf

    save_model(reward_model_from_backbone(pref_run / "sft"), pref_run / "rm")
    cfg = load_config("micro", ["rlhf.lora_rank=4", "rlhf.guard=false", "rlhf.ptx_coef=0",
                                "rlhf.lr_matrix=0.01", "rlhf.max_steps=2",
                                'rlhf.lora_targets=["gate_proj", "up_proj"]'])
    res = run_rlhf(cfg, pref_run, log=quiet)
    assert res["algorithm"] == "ppo" and res["best_step"] == 2 and res["lora"]["rank"] == 4
    _check_merged(pref_run / "rlhf", pref_run / "sft")  # no value head in it, base frozen


def test_lora_sft_trains_adapters_and_hands_on_the_merged_model(pref_run):  # noqa: F811
    from echolm.train.sft import run_sft

    os.replace(pref_run / "sft", pref_run / "base")  # the random backbone as a base model
    cfg = load_config("micro", ["sft.lora_rank=4", "sft.max_steps=4", "sft.eval_every=0",
                                "sft.lr_matrix=0.01", "data.open_examples=0",
                                "data.task_examples=20", "data.eval_problems=4"])
    logs: list[str] = []
    res = run_sft(cfg, pref_run, log=logs.append)
    assert res["steps"] == 4 and res["lora"]["trainable_params"] == 2 * 4 * (
        2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 192))
    assert [m for m in logs if "LoRA" in m] == [
        "sft: LoRA r=4: 9,728 trainable parameters of 0.164M"]
    _check_merged(pref_run / "sft", pref_run / "base")
