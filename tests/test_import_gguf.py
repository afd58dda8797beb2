"""`echolm import gguf`: GGUF files made here (nothing is downloaded) are imported, and the
imported Echo model must compute transformers' logits on the same file (its own GGUF loader,
`from_pretrained(folder, gguf_file=...)`) within 1e-4, its tokenizer must give the ids of the
tokenizer the file was made from, and export gguf -> import gguf must give back the same
weights. Files: Echo's own exports (f32, q8_0), and a SmolLM-like foreign file written with the
gguf writer (ChatML specials, the ``smollm`` split, Q4_1 matrices, llama arch so the q/k
un-permutation counts). The largest logit difference of every comparison is printed."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from test_gguf import (
    CHATML,
    TEXTS,
    _export,
    _hf_from_gguf,
    _randomise,
    _rounded,
    random_sft,
)
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from echolm.checkpoint import (
    chat_model_dir,
    load_model,
    read_weights,
    save_model,
    save_training_state,
    stage_dir,
)
from echolm.cli import main
from echolm.config import ModelConfig
from echolm.errors import EchoError
from echolm.export_gguf import gguf_tensors
from echolm.model import Transformer
from echolm.rank import run_rank
from echolm.runlock import LOCK_NAME, run_lock
from echolm.tokenizer import SPECIAL_TOKENS, Tokenizer

transformers = pytest.importorskip("transformers")
Q4_1 = gguf.GGMLQuantizationType.Q4_1


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # 2 shared cores: more threads are far slower on tiny matmuls


def _import(src: Path, run: Path, *args: str) -> None:
    assert main(["import", "gguf", str(src), "--out", str(run), *args]) == 0


def _logit_diff(run: Path, gguf_file: Path, n_vocab: int) -> float:
    """Largest |logit| difference between the imported model and transformers' on the file,
    over the file's own vocabulary (Echo's added tokens are rows transformers lacks)."""
    model = load_model(run / "base").eval()
    hf = _hf_from_gguf(gguf_file, model.cfg)
    ids = torch.randint(0, n_vocab, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return float((model(ids)[..., :n_vocab] - hf(ids).logits).abs().max())


# ---- a foreign file: SmolLM-like ------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_tokenizer(corpus) -> HFTokenizer:
    """Byte-level BPE with SmolLM's split (every digit alone, then GPT-2's) and ChatML specials."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([f.read_text() for f in sorted(corpus.glob("*.txt"))],
                           trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf.add_tokens([AddedToken("<think>", special=False, normalized=False)])  # user-defined
    return hf


def write_smol(path: Path, hf: HFTokenizer, *, arch: str = "llama", pre: str = "smollm",
               kind: str = "gpt2", tie: bool = True, seed: int = 0, eos: str = "<|im_end|>",
               eot: str | None = None) -> Transformer:
    """A GGUF as llama.cpp's converter writes one for a SmolLM-like chat model: matrices Q4_1
    (rows of whole blocks), the rest f32. Returns the Echo model it holds (before rounding)."""
    n_vocab = hf.get_vocab_size()
    cfg = ModelConfig(vocab_size=n_vocab, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                      mlp_hidden=96, max_seq_len=256, rope_theta=5000.0, norm_eps=1e-5,
                      tie_embeddings=tie, qk_norm=arch == "qwen3")
    model = Transformer(cfg)
    _randomise(model, seed)
    vocab = hf.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    added = hf.get_added_tokens_decoder()
    types = [(3 if added[i].special else 4) if i in added else 1 for i in range(n_vocab)]
    merges = json.loads(hf.to_str())["model"]["merges"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("smol-test")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(n_vocab)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_mlp)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.d_head)
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab[eos])
    if eot is not None:
        w.add_eot_token_id(vocab[eot])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for name, t in gguf_tensors(model, arch).items():
        a = t.numpy()
        if a.ndim == 2 and a.shape[-1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(a, Q4_1), raw_dtype=Q4_1)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def _q4_1(model: Transformer) -> dict[str, torch.Tensor]:
    """`model`'s weights as the file stores them (Q4_1 rounding where a row is whole blocks)."""
    def rnd(v: torch.Tensor) -> torch.Tensor:
        if v.ndim == 2 and v.shape[-1] % 32 == 0:
            a = gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), Q4_1), Q4_1)
            return torch.from_numpy(a.reshape(v.shape).copy())
        return v
    return {k: rnd(v.detach()) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tie", [True, False])
def test_import_foreign_q4_1_file(smol_tokenizer, tmp_path, tie, capsys):
    src = tmp_path / "smol.gguf"
    model = write_smol(src, smol_tokenizer, tie=tie)
    n = smol_tokenizer.get_vocab_size()
    run = tmp_path / "run"
    _import(src, run)
    assert "import: llama instruct model" in capsys.readouterr().out
    # the weights are the file's, de-quantised, q/k back in HF's layout (not via transformers)
    got = load_model(run / "base").state_dict()
    for k, v in _q4_1(model).items():
        if k == "lm_head.weight" and tie:
            continue
        assert torch.equal(got[k][:n] if k in ("embed_tokens.weight", "lm_head.weight")
                           else got[k], v), k
    diff = _logit_diff(run, src, n)
    print(f"\nforeign Q4_1 (tied={tie}): max |logit diff| vs transformers = {diff:.3g}")
    assert diff <= 1e-4
    # the tokenizer: the source's ids (its own split: digits alone), Echo's specials added
    tok = Tokenizer.load(run / "tokenizer")
    assert not tok.native and tok.vocab_size == n + len(SPECIAL_TOKENS)
    assert [tok.special[t] for t in SPECIAL_TOKENS] == list(range(n, n + len(SPECIAL_TOKENS)))
    ht = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    for text in [*TEXTS, "a1b22c333 999,999.5", "<think>why</think>"]:
        ids = tok.encode(text)
        assert ids == smol_tokenizer.encode(text, add_special_tokens=False).ids, text
        assert ids == ht(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == text
    info = json.loads((run / "import.json").read_text())
    assert info["format"] == "gguf" and info["instruct"] is True
    assert info["source_chat"] == {"template": CHATML, "eos_token": "<|im_end|>"}
    assert info["bos_row_from"] == smol_tokenizer.token_to_id("<|im_start|>")
    assert info["pre_tokenizer"] == "smollm" and info["tensor_types"]["Q4_1"] > 0
    assert json.loads((run / "base" / "done.json").read_text())["instruct"] is True
    emb = got["embed_tokens.weight"]
    assert torch.equal(emb[tok.bos], emb[smol_tokenizer.token_to_id("<|im_start|>")])
    # and back to GGUF: SmolLM's split is llama.cpp's `smollm`, its own chat format kept
    again = tmp_path / "again.gguf"
    _export(run, again, "--dtype", "f32")
    reader = gguf.GGUFReader(again)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    # ChatML starts at its first turn: no <|bos|> before it (llama.cpp would add one)
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    # and to Hugging Face: still an instruct model (it ends a turn, not a document)
    hf_out = tmp_path / "hf"
    assert main(["export", "hf", "--run", str(run), "--out", str(hf_out)]) == 0
    gen = json.loads((hf_out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.assistant_end
    # a damaged import.json: a one-line error naming it, nothing written
    (run / "import.json").write_text('{"source_chat": ')
    capsys.readouterr()
    assert main(["export", "gguf", "--run", str(run), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'import.json'}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.gguf").exists()


def test_a_base_models_chat_template_does_not_make_it_instruct(smol_tokenizer, tmp_path,
                                                              capsys):
    """A base model whose file carries a chat template (Qwen2.5 and Llama 3.1 base models do)
    ends generation at its end of document (<|endoftext|>), which the template never writes
    after an answer: it is a base model, kept in Echo's format, and says why."""
    src = tmp_path / "base.gguf"
    write_smol(src, smol_tokenizer, eos="<|endoftext|>")
    run = tmp_path / "run"
    _import(src, run)
    out = capsys.readouterr().out
    assert "import: llama base model" in out and "chat format echo" in out, out
    assert "'<|endoftext|>' does not follow an assistant message" in out
    assert json.loads((run / "import.json").read_text())["instruct"] is False
    assert chat_model_dir(run) == run / "sft"  # not the base: it has no sft stage yet


def test_every_end_of_generation_token_stops_decoding(smol_tokenizer, tmp_path, capsys):
    """A Qwen-like file: turns end with <|im_end|> (eot), documents with <|endoftext|> (eos).
    Both stop decoding (llama.cpp stops at both); the format is still ChatML, trained to end
    turns with <|im_end|>, and an HF export lists both as eos_token_id (a chat model never
    ends at <|bos|>)."""
    src = tmp_path / "qwenish.gguf"
    write_smol(src, smol_tokenizer, eos="<|endoftext|>", eot="<|im_end|>")
    run = tmp_path / "run"
    _import(src, run)
    assert "import: llama instruct model" in capsys.readouterr().out
    tok = Tokenizer.load(run / "tokenizer")
    end, doc = (smol_tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>"))
    assert tok.chat.name == "chatml" and tok.chat.stops == ("<|endoftext|>",)
    assert tok.assistant_end == end and set(tok.stop_ids) == {end, doc, tok.bos}
    hf_out = tmp_path / "hf"
    assert main(["export", "hf", "--run", str(run), "--out", str(hf_out)]) == 0
    gen = json.loads((hf_out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [end, doc]


def test_imported_gguf_chats_at_once(smol_tokenizer, tmp_path, echolm_cli):
    src = tmp_path / "smol.gguf"
    write_smol(src, smol_tokenizer)
    run = tmp_path / "run"
    r = echolm_cli("import", "gguf", src, "--out", run)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = echolm_cli("chat", "--run", run, "--prompt", "What is 23 + 58?", "--temperature", "0",
                   "--max-tokens", "8")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_imported_instruct_model_is_the_sft_model(smol_tokenizer, tmp_path):
    """Until the run has an sft stage, the stages that start from the SFT model take the
    imported instruct model: rank samples its answers at once."""
    src = tmp_path / "smol.gguf"
    write_smol(src, smol_tokenizer)
    run = tmp_path / "run"
    _import(src, run)
    assert chat_model_dir(run) == run / "base" and stage_dir(run, "sft") == run / "base"
    res = run_rank(run, simulated=True, n=2, k=2, max_tokens=4, out=io.StringIO())
    assert res["stage"] == "base" and res["ranked"] + res["identical"] == 2, res
    shutil.copytree(run / "base", run / "sft")  # its own SFT stage (as `echolm sft` makes)
    assert chat_model_dir(run) == run / "sft" and stage_dir(run, "sft") == run / "sft"


def test_tied_model_checkpoints_inside_the_rlhf_wrapper(tmp_path):
    """An imported model's head is often tied (SmolLM's): RLHF's policy-with-value wrapper
    (keys `policy.lm_head.weight` ...) must checkpoint it, and resume from it."""
    from echolm.train.rlhf import PolicyWithValue

    cfg = ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=1,
                      max_seq_len=32, tie_embeddings=True)
    pv = PolicyWithValue(Transformer(cfg))
    _randomise(pv)
    save_training_state(tmp_path, 1, pv, {"step": 1})
    w = read_weights(tmp_path / "ckpt" / "step_000001" / "model.safetensors")
    assert "policy.lm_head.weight" not in w
    assert torch.equal(w["policy.embed_tokens.weight"], pv.policy.embed_tokens.weight.detach())
    back = PolicyWithValue(Transformer(cfg))
    missing, unexpected = back.load_state_dict(w, strict=False)
    assert missing == ["policy.lm_head.weight"] and unexpected == []
    assert torch.equal(back.policy.lm_head.weight, pv.policy.lm_head.weight)  # still tied


# ---- Echo's own exports: the round trip -----------------------------------------------------

@pytest.mark.parametrize("variant,dtype", [("llama", "f32"), ("qwen3-tied-head_dim", "q8_0"),
                                           ("qwen2-bias", "f32")])
def test_export_then_import_gives_the_same_model(variant, dtype, run_dir, tmp_path):
    model, tok = random_sft(run_dir, variant)
    cfg = model.cfg
    out = tmp_path / f"m-{dtype}.gguf"
    _export(run_dir, out, "--dtype", dtype)
    back = tmp_path / "back"
    _import(out, back)
    expect = _rounded(model, dtype).state_dict() if dtype != "f32" else model.state_dict()
    got = load_model(back / "base")
    assert got.cfg == cfg  # the same shape, Echo's own defaults where they apply
    for k, v in got.state_dict().items():
        assert torch.equal(v, expect[k]), k
    diff = _logit_diff(back, out, cfg.vocab_size)
    print(f"\n{variant} {dtype}: export -> import, max |logit diff| vs transformers = "
          f"{diff:.3g}")
    assert diff <= 1e-4
    info = json.loads((back / "import.json").read_text())
    assert info["added_special_tokens"] == {} and info["instruct"] is True  # an SFT export
    back_tok = Tokenizer.load(back / "tokenizer")
    assert back_tok.special == tok.special
    for text in TEXTS:
        assert back_tok.encode(text) == tok.encode(text), text
    # and again: the imported run exports the same weights
    _export(back, tmp_path / "again.gguf", "--dtype", "f32")
    again = tmp_path / "again"
    _import(tmp_path / "again.gguf", again)
    assert (again / "base" / "model.safetensors").read_bytes() == \
        (back / "base" / "model.safetensors").read_bytes()


def test_echo_base_export_imports_as_base(run_dir, tmp_path):
    tok = Tokenizer.load(run_dir / "tokenizer")
    save_model(Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=32,
                                       n_head=2, n_kv_head=1, max_seq_len=64)), run_dir / "base")
    _export(run_dir, tmp_path / "base.gguf", "--stage", "base", "--dtype", "f32")
    _import(tmp_path / "base.gguf", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "import.json").read_text())["instruct"] is False
    with pytest.raises(EchoError, match="no finished 'sft' model"):  # a base model is no SFT
        stage_dir(tmp_path / "back", "sft")


# ---- refusals -------------------------------------------------------------------------------

def test_import_gguf_refusals_are_one_line(smol_tokenizer, tmp_path, capsys):
    def refused(src: Path, out: Path, *args: str) -> str:
        assert main(["import", "gguf", str(src), "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("echolm: error: ") and err.count("\n") == 1, err
        return err

    good = tmp_path / "good.gguf"
    write_smol(good, smol_tokenizer)
    note = tmp_path / "note.gguf"
    note.write_text("not a model")
    assert f"{note}: not a GGUF file" in refused(note, tmp_path / "r1")
    assert f"{tmp_path / 'missing.gguf'}: not a file" in refused(tmp_path / "missing.gguf",
                                                                  tmp_path / "r2")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert f"{cut}: unreadable or truncated GGUF file" in refused(cut, tmp_path / "r3")
    for name, kw, words in [
            ("gemma.gguf", {"arch": "gemma"}, "general.architecture='gemma' is not supported"),
            ("tekken.gguf", {"pre": "tekken"}, "tokenizer.ggml.pre='tekken' is a pre-tokenizer "
                                               "Echo does not know"),
            ("spm.gguf", {"kind": "llama"}, "tokenizer.ggml.model='llama' is not supported")]:
        f = tmp_path / name
        write_smol(f, smol_tokenizer, **kw)
        assert f"{f}: {words}" in refused(f, tmp_path / "r4")
    # --out: never the file, the folder holding it, or an existing folder without --force
    assert "holds the GGUF file being imported" in refused(good, tmp_path)
    assert "is the GGUF file being imported" in refused(good, good)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert "already exists and is not empty" in refused(good, keep)
    assert "not an earlier import as written" in refused(good, keep, "--force")
    assert (keep / "notes.txt").read_text() == "mine"
    assert not any(p.name.startswith(("r", ".")) for p in tmp_path.iterdir())  # nothing half-made
    # an earlier import is replaced with --force, and an empty folder is filled
    _import(good, tmp_path / "run")
    _import(good, tmp_path / "run", "--force")
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    (tmp_path / "empty").mkdir()
    _import(good, tmp_path / "empty")
    # ... but not while a stage works in it (here: this process holds its lock)
    with run_lock(tmp_path / "run", "echolm rl"):
        err = refused(good, tmp_path / "run", "--force")
        assert f"{tmp_path / 'run'} is in use by pid {os.getpid()} (echolm rl" in err
        assert (tmp_path / "run" / "base" / "model.safetensors").exists()
