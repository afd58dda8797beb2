"""Hugging Face interop with `transformers` really installed: `echolm export hf` gives a folder
`transformers` loads and that computes Echo's logits, chat ids and greedy tokens; `echolm
import hf` turns small Llama / Qwen2 / Qwen3 checkpoints (built here from a config, never
downloaded) into runs whose logits equal HF's, which SFT can continue; export -> import is
bit-exact. The largest logit difference of every comparison is printed (pytest -s)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub: every model is built here
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from echolm.chat_format import ECHO_TEMPLATE as CHAT_TEMPLATE  # noqa: E402
from echolm.checkpoint import load_model, save_model  # noqa: E402
from echolm.cli import main  # noqa: E402
from echolm.config import ModelConfig  # noqa: E402
from echolm.engine import SamplingParams, generate  # noqa: E402
from echolm.model import Transformer  # noqa: E402
from echolm.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

TOL = 1e-4
CONVERSATION = [
    {"role": "system", "content": "You are terse. Answer in one line."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42.\nAnswer: 42"},
    {"role": "user", "content": "And spell 'cat', please!"},
    {"role": "assistant", "content": "c-a-t"},
]

# varied text: unicode, digits, runs of newlines and spaces, contractions, code, emoji
PLAIN_TEXTS = [
    "The quick brown fox", " leading space", "It's 12:30 -- we'll see; they'RE here, I'd go",
    "x = 1234567890\n\n\n\tdef f(a, b):\n        return a+b  # sum\r\n",
    "naïve café, Zürich 北京 東京 🙂👍🏽 — “quoted” ‘single’", "   \n \n  trailing   ",
    "3.14159e-10 +42 -7 ١٢٣ ²³", "",
]

# (echo model fields, the class transformers should load)
VARIANTS = {
    "llama": ({"qk_norm": False, "tie_embeddings": False}, "LlamaForCausalLM"),
    "llama-tied": ({"qk_norm": False, "tie_embeddings": True}, "LlamaForCausalLM"),
    "qwen3": ({"qk_norm": True, "tie_embeddings": False}, "Qwen3ForCausalLM"),
    "qwen3-tied": ({"qk_norm": True, "tie_embeddings": True}, "Qwen3ForCausalLM"),
    "qwen3-head_dim": ({"qk_norm": True, "head_dim": 32, "mlp_hidden": 96},
                       "Qwen3ForCausalLM"),
    "qwen2-bias": ({"qk_norm": False, "attention_bias": True}, "Qwen2ForCausalLM"),
    "qwen3-bias": ({"qk_norm": True, "attention_bias": True, "tie_embeddings": True},
                   "Qwen3ForCausalLM"),
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # 2 shared cores: more threads are far slower on tiny matmuls


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random, including those Echo starts at zero (o_proj, down_proj, head) and
    the norms (around 1): zeros would hide a transposed or misnamed tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.1 * noise)


def _hf_model(folder: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def _max_diff(echo: Transformer, hf_model, ids: torch.Tensor, columns: int | None = None
              ) -> float:
    with torch.no_grad():
        a, b = echo.eval()(ids), hf_model(ids).logits
    if columns is not None:
        a, b = a[..., :columns], b[..., :columns]
    assert a.shape == b.shape
    return float((a - b).abs().max())


def _export(run: Path, out: Path, stage: str = "base") -> None:
    assert main(["export", "hf", "--run", str(run), "--stage", stage, "--out", str(out)]) == 0


# ---- export ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_random_weights_logits_match(variant, run_dir, tmp_path):
    fields, arch = VARIANTS[variant]
    tok = Tokenizer.load(run_dir / "tokenizer")
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                      max_seq_len=128, **fields)
    model = Transformer(cfg)
    _randomise(model)
    save_model(model, run_dir / "base")
    out = tmp_path / "hf"
    _export(run_dir, out)
    hf_model = _hf_model(out)
    assert type(hf_model).__name__ == arch
    ids = torch.randint(0, tok.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    diff = _max_diff(model, hf_model, ids)
    print(f"\nexport {variant} random weights: max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@pytest.fixture(scope="module")
def trained_runs(prepared_run, tmp_path_factory) -> dict[str, Path]:
    """A few Muon steps of real pretraining per variant (llama/qwen3, tied/untied)."""
    from echolm.pipeline import run_config
    from echolm.train.pretrain import run_pretrain

    runs = {}
    for name in ("llama", "llama-tied", "qwen3", "qwen3-tied"):
        fields = VARIANTS[name][0]
        run = tmp_path_factory.mktemp("trained") / name
        shutil.copytree(prepared_run, run)
        overrides = [f"model.{k}={str(v).lower()}" for k, v in fields.items()] + [
            "pretrain.max_steps=4", "pretrain.eval_every=0", "pretrain.eval_tokens=512",
            "pretrain.ckpt_every=100", "pretrain.warmup_steps=1"]
        with run_config(run, "micro", overrides, reconfigure=True) as cfg:
            run_pretrain(cfg, run, log=lambda *_: None)
        # pretend the base model was fine-tuned, so that `--stage sft` exists too
        shutil.copytree(run / "base", run / "sft", ignore=shutil.ignore_patterns("ckpt"))
        runs[name] = run
    return runs


@pytest.mark.parametrize("variant", ["llama", "llama-tied", "qwen3", "qwen3-tied"])
def test_export_trained_model_logits_and_greedy_generation_match(variant, trained_runs,
                                                                  tmp_path):
    run = trained_runs[variant]
    out = tmp_path / "hf"
    _export(run, out, stage="sft")
    model = load_model(run / "sft")
    assert model.cfg.qk_norm == VARIANTS[variant][0]["qk_norm"]
    assert bool(model.lm_head.weight.abs().sum()) and bool(
        model.layers[0].mlp.down_proj.weight.abs().sum())  # really trained: no zero tensors
    hf_model = _hf_model(out)
    assert type(hf_model).__name__ == VARIANTS[variant][1]
    tok = Tokenizer.load(run / "tokenizer")
    text = "Once upon a time, the farmer saw the wooden bridge at dawn."
    ids = torch.tensor([[tok.bos, *tok.encode(text)]])
    diff = _max_diff(model, hf_model, ids)
    print(f"\nexport {variant} trained weights: max |logit diff| = {diff:.3g}")
    assert diff <= TOL

    # greedy generation: HF's generate (its generation_config) vs Echo's engine
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = hf_tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    assert prompt == tok.render_prompt(CONVERSATION[:2])
    n = 24
    echo_out = generate(model, tok, [prompt], SamplingParams(
        max_tokens=n, temperature=0.0, stop_ids=(tok.assistant_end,)))[0]
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                   attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    hf_new = hf_out[0, len(prompt):].tolist()
    if hf_new and hf_new[-1] == tok.assistant_end:
        hf_new = hf_new[:-1]
    assert hf_new == echo_out and len(echo_out) > 0


def test_chat_template_gives_echo_ids(run_dir, tmp_path):
    tok = Tokenizer.load(run_dir / "tokenizer")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2,
                                    n_kv_head=1, max_seq_len=64))
    save_model(model, run_dir / "sft")
    out = tmp_path / "hf"
    _export(run_dir, out, stage="sft")
    ht = transformers.AutoTokenizer.from_pretrained(out)
    ids, mask = tok.render_conversation(CONVERSATION)
    got = ht.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    assert got["input_ids"] == ids
    assert got["assistant_masks"] == mask  # {% generation %} marks what Echo trains on
    assert ids[0] == tok.bos and ids[1] != tok.bos  # exactly one BOS
    prompt = ht.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"]
    assert prompt == tok.render_prompt(CONVERSATION[:4])
    text = ht.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith("<|bos|><|system_start|>You are terse.")
    # the rendered text already holds its BOS: tokenized again, as Llama's tokenizers, it
    # needs add_special_tokens=False (apply_chat_template above does exactly that)
    assert ht(text, add_special_tokens=False)["input_ids"] == ids
    assert ht(text)["input_ids"] == [tok.bos, *ids]
    assert ht.bos_token == "<|bos|>" and ht.eos_token == "<|assistant_end|>"
    assert ht.pad_token_id == tok.pad
    with pytest.raises(Exception, match="system message must come first"):
        ht.apply_chat_template([CONVERSATION[1], CONVERSATION[0]], tokenize=False)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.assistant_end
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == \
        CHAT_TEMPLATE
    # plain text: the ids of a document as Echo trains on and explains it, <|bos|> first
    for plain in PLAIN_TEXTS:
        assert ht(plain)["input_ids"] == [tok.bos, *tok.encode(plain)], plain
    assert ht.decode(ht("The quick brown fox")["input_ids"], skip_special_tokens=True) == \
        "The quick brown fox"
    assert ht("a", "b")["input_ids"] == [tok.bos, *tok.encode("a"), tok.bos, *tok.encode("b")]
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    # the same vocabulary, merges and split as the run's: only the post-processor differs
    exported = json.loads((out / "tokenizer.json").read_text())
    own = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())
    assert exported.pop("post_processor")["type"] == "TemplateProcessing"
    assert own.pop("post_processor") is None and exported == own


def test_export_errors_are_one_line(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "hf", "--run", str(run_dir), "--stage", "sft",
                 "--out", str(out)]) == 2
    assert "no finished 'sft' model" in capsys.readouterr().err
    model = Transformer(ModelConfig(vocab_size=Tokenizer.load(run_dir / "tokenizer").vocab_size,
                                    n_layer=1, n_embd=32, n_head=2, n_kv_head=1))
    save_model(model, run_dir / "base")
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", "hf", "--run", str(run_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    # --force replaces only an earlier export: keep.txt is someone's, never deleted
    assert main(["export", "hf", "--run", str(run_dir), "--out", str(out), "--force"]) == 2
    assert "not an earlier export as written (it holds keep.txt)" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x" and not (out / "model.safetensors").exists()
    (out / "keep.txt").unlink()
    assert main(["export", "hf", "--run", str(run_dir), "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists()


# ---- import ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def foreign_tokenizer(tmp_path_factory, corpus):
    """A locally trained GPT-2-style byte-level BPE (not Echo's split pattern) with ChatML
    special tokens, a post-processor adding its BOS and a chat template, as transformers
    saves it (PreTrainedTokenizerFast)."""
    texts = [f.read_text() for f in sorted(corpus.glob("*.txt"))]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    return tok


def _hf_source(kind: str, folder: Path, tok, vocab_size: int = 448, **extra) -> Path:
    """A small random model of the `kind` family saved with save_pretrained."""
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config}[kind]
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rope_theta=5000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2)
    kw.update(extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**kw))
    _randomise(model, seed=3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


IMPORTS = {
    "llama": ("llama", {}),
    "llama-tied-bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "qwen3-tied": ("qwen3", {"head_dim": 16, "tie_word_embeddings": True}),
    "llama-exact-vocab": ("llama", {"vocab_size": 400}),  # no spare rows: the matrices grow
}


@pytest.mark.parametrize("name", list(IMPORTS))
def test_import_logits_match_hf(name, foreign_tokenizer, tmp_path):
    kind, extra = IMPORTS[name]
    src = _hf_source(kind, tmp_path / "src", foreign_tokenizer, **extra)
    hf_model = _hf_model(src)
    if extra.get("attention_bias"):  # Llama's attention_bias includes o_proj: Echo needs 0
        with torch.no_grad():
            for layer in hf_model.model.layers:
                layer.self_attn.o_proj.bias.zero_()
        hf_model.save_pretrained(src)
    run = tmp_path / "run"
    assert main(["import", "hf", str(src), "--out", str(run)]) == 0
    model = load_model(run / "base")
    n_src = len(foreign_tokenizer)  # 400 source tokens; Echo's 12 follow
    ids = torch.randint(0, n_src, (2, 40), generator=torch.Generator().manual_seed(2))
    diff = _max_diff(model, hf_model, ids, columns=n_src)
    print(f"\nimport {name}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    cfg = model.cfg
    assert cfg.qk_norm == (kind == "qwen3")
    assert cfg.attention_bias == (kind == "qwen2" or bool(extra.get("attention_bias")))
    assert cfg.tie_embeddings == bool(extra.get("tie_word_embeddings"))
    assert cfg.vocab_size == max(extra.get("vocab_size", 448), n_src + len(SPECIAL_TOKENS))

    # the tokenizer: the source's ids unchanged, Echo's special tokens appended
    tok = Tokenizer.load(run / "tokenizer")
    assert not tok.native
    assert [tok.special[t] for t in SPECIAL_TOKENS] == list(range(n_src, n_src + 12))
    text = "Yesterday, the baker sold 1234 apples <|im_start|> <|user_end|> twice!"
    expect = foreign_tokenizer(text, add_special_tokens=False, split_special_tokens=True)
    assert tok.encode(text) == expect["input_ids"]  # special-token text stays text
    assert b"".join(tok.token_bytes[i] for i in tok.encode(text)) == text.encode()
    conv_ids, _ = tok.render_conversation(CONVERSATION)
    assert conv_ids[0] == tok.bos and tok.decode(conv_ids).startswith("<|bos|><|system_start|>")

    # new rows: the mean of the source's rows; <|bos|> copies the source's BOS (id 0)
    emb = model.embed_tokens.weight.detach()
    src_emb = hf_model.model.embed_tokens.weight.detach()
    assert torch.equal(emb[:n_src], src_emb[:n_src])
    assert torch.equal(emb[tok.bos], src_emb[0])
    mean = src_emb[:n_src].mean(0)
    assert torch.allclose(emb[tok.special["<|user_start|>"]], mean)
    grown = extra.get("vocab_size") == n_src  # <|pad|> is then the last, new row
    assert torch.allclose(emb[-1], mean) if grown else torch.equal(emb[-1], src_emb[-1])
    info = json.loads((run / "import.json").read_text())
    assert info["model_type"] == kind and info["bos_row_from"] == 0
    assert json.loads((run / "base" / "done.json").read_text())["model_type"] == kind
    assert (run / "tokenizer" / "done.json").exists()


def test_import_then_sft_starts_from_the_imported_run(foreign_tokenizer, tmp_path, echolm_cli):
    src = _hf_source("qwen3", tmp_path / "src", foreign_tokenizer, head_dim=32)
    run = tmp_path / "run"
    r = echolm_cli("import", "hf", src, "--out", run)
    assert r.returncode == 0, r.stderr
    r = echolm_cli("sft", "--out", run, "--preset", "micro", "--set", "sft.max_steps=2",
                   "--set", "data.eval_problems=2", "--set", 'data.tasks=["identity"]',
                   "--set", "data.task_examples=20", timeout=300)
    assert r.returncode == 0, r.stderr
    done = json.loads((run / "sft" / "done.json").read_text())
    assert done["steps"] == 2
    assert load_model(run / "sft").cfg == load_model(run / "base").cfg
    # and the fine-tuned model exports (Qwen3 with the foreign tokenizer + Echo's template)
    out = tmp_path / "hf"
    _export(run, out, stage="sft")
    ht = transformers.AutoTokenizer.from_pretrained(out)
    tok = Tokenizer.load(run / "tokenizer")
    got = ht.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert got == tok.render_conversation(CONVERSATION)[0]
    ids = torch.tensor([got])
    diff = _max_diff(load_model(run / "sft"), _hf_model(out), ids)
    print(f"\nimport -> sft -> export qwen3: max |logit diff| = {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("eos, instruct", [("<|im_end|>", True), ("<|endoftext|>", False)])
def test_import_reads_every_end_of_generation_and_whether_it_chats(foreign_tokenizer, tmp_path,
                                                                   eos, instruct):
    """A Qwen-like checkpoint: a ChatML template, no BOS, generation_config's eos_token_id a
    list (<|im_end|>, <|endoftext|>). With tokenizer_config's eos_token <|im_end|> (Qwen2.5
    Instruct) it is an instruct model in ChatML whose decoding also stops at <|endoftext|>;
    with <|endoftext|> (Qwen2.5 base: the template never writes it after an answer) it is a
    base model in Echo's format."""
    from test_gguf import CHATML

    tok = copy.deepcopy(foreign_tokenizer)
    tok.chat_template = CHATML
    tok.bos_token, tok.eos_token = None, eos
    src = _hf_source("qwen2", tmp_path / "src", tok, bos_token_id=None, eos_token_id=2)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    (src / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}))
    run = tmp_path / "run"
    assert main(["import", "hf", str(src), "--out", str(run)]) == 0
    assert json.loads((run / "import.json").read_text())["instruct"] is instruct
    ours = Tokenizer.load(run / "tokenizer")
    if instruct:
        assert ours.chat.name == "chatml" and ours.chat.stops == ("<|endoftext|>",)
        assert set(ours.stop_ids) == {*ids.values(), ours.bos}
    else:
        assert ours.chat.is_echo()


@pytest.mark.parametrize("variant", ["llama-tied", "qwen3", "qwen2-bias", "qwen3-bias"])
def test_export_import_round_trip_is_bit_exact(variant, run_dir, tmp_path):
    fields = VARIANTS[variant][0]
    tok = Tokenizer.load(run_dir / "tokenizer")
    cfg = ModelConfig(vocab_size=tok.vocab_size + 3, n_layer=2, n_embd=64, n_head=4,
                      n_kv_head=2, max_seq_len=96, rope_theta=500.0, norm_eps=1e-5,
                      init_std=0.01, **fields)
    model = Transformer(cfg)
    _randomise(model)
    save_model(model, run_dir / "base")
    out, back = tmp_path / "hf", tmp_path / "back"
    _export(run_dir, out)
    assert main(["import", "hf", str(out), "--out", str(back)]) == 0
    a = load_file(str(run_dir / "base" / "model.safetensors"))
    b = load_file(str(back / "base" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((back / "base" / "config.json").read_text()) == json.loads(
        (run_dir / "base" / "config.json").read_text())
    assert (back / "tokenizer" / "tokenizer.json").read_bytes() == (
        run_dir / "tokenizer" / "tokenizer.json").read_bytes()
    again = Tokenizer.load(back / "tokenizer")
    assert again.native and again.encode("Hello, world 42!") == tok.encode("Hello, world 42!")
    assert json.loads((back / "import.json").read_text())["added_special_tokens"] == {}


def _edit_config(src: Path, **changes) -> None:
    path = src / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def llama_source(foreign_tokenizer, tmp_path_factory) -> Path:
    return _hf_source("llama", tmp_path_factory.mktemp("src") / "llama", foreign_tokenizer)


@pytest.mark.parametrize("changes, words", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope scaling 'llama3'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope scaling 'linear'"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=true"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ({"model_type": "gemma"}, "model_type='gemma' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_size": None}, "hidden_size must be a positive integer"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 must be a multiple of "
                                 "num_key_value_heads=3"),  # the file's names, not Echo's
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"rope_parameters": None, "rope_theta": "x"}, "rope_theta must be a positive number"),
    ({"rms_norm_eps": None, "initializer_range": "big"}, "initializer_range must be a positive"),
    ({"intermediate_size": 100}, "mlp.gate_proj.weight has shape"),
])
def test_import_refuses_what_echo_cannot_compute(llama_source, tmp_path, capsys, changes,
                                                 words):
    src = tmp_path / "src"
    shutil.copytree(llama_source, src)
    _edit_config(src, **changes)
    run = tmp_path / "run"
    assert main(["import", "hf", str(src), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not run.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_import_refuses_nonzero_o_proj_bias_and_missing_files(llama_source, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(llama_source, src)
    _edit_config(src, attention_bias=True)
    sd = load_file(str(src / "model.safetensors"))
    for i in range(2):
        for p in ("q", "k", "v", "o"):
            rows = sd[f"model.layers.{i}.self_attn.{p}_proj.weight"].shape[0]
            sd[f"model.layers.{i}.self_attn.{p}_proj.bias"] = torch.full((rows,), 0.5)
    save_file(sd, str(src / "model.safetensors"))
    assert main(["import", "hf", str(src), "--out", str(tmp_path / "run")]) == 2
    assert "o_proj.bias is not zero" in capsys.readouterr().err

    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    assert main(["import", "hf", str(src), "--out", str(tmp_path / "run")]) == 2
    assert "only PyTorch .bin weights" in capsys.readouterr().err
    (src / "tokenizer.json").unlink()
    assert main(["import", "hf", str(src), "--out", str(tmp_path / "run")]) == 2
    assert "tokenizer.json: missing" in capsys.readouterr().err

    run = tmp_path / "existing"
    run.mkdir()
    (run / "x").write_text("x")
    assert main(["import", "hf", str(llama_source), "--out", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["import", "hf", str(llama_source), "--out", str(run), "--force"]) == 2
    assert "not an earlier import as written (it holds x)" in capsys.readouterr().err
    assert (run / "x").read_text() == "x" and not (run / "base").exists()
    (run / "x").unlink()
    assert main(["import", "hf", str(llama_source), "--out", str(run)]) == 0
    first = (run / "base" / "model.safetensors").read_bytes()
    assert main(["import", "hf", str(llama_source), "--out", str(run), "--force"]) == 0
    assert (run / "base" / "model.safetensors").read_bytes() == first  # an earlier import


def test_import_reads_sharded_checkpoints(llama_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(llama_source, src)
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, str(src / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert main(["import", "hf", str(src), "--out", str(tmp_path / "run")]) == 0
    model = load_model(tmp_path / "run" / "base")
    assert torch.equal(model.layers[1].mlp.down_proj.weight,
                       sd["model.layers.1.mlp.down_proj.weight"])


def test_sentencepiece_style_tokenizer_encodes_through_tokenizers(tmp_path, corpus):
    """A Llama-2-style tokenizer (Metaspace pieces, byte fallback) imports too: ids from
    `tokenizers`, bytes per token from the pieces (`▁` is a space, `<0x0A>` a byte)."""
    from echolm.hf import import_tokenizer

    texts = [f.read_text() for f in sorted(corpus.glob("*.txt"))]
    hf = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(hf.to_str())  # byte-fallback pieces live in the vocabulary, as in Llama 2
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    hf = HFTokenizer.from_str(json.dumps(spec))
    src = tmp_path / "src"
    src.mkdir()
    hf.save(str(src / "tokenizer.json"))
    imported, added = import_tokenizer(src)
    assert added == SPECIAL_TOKENS
    tok = Tokenizer(imported)
    text = "The river found 7 coins\nthen ü"
    assert not tok.native
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert b"".join(tok.token_bytes[i] for i in tok.encode(text)) == b" " + text.encode()
