"""`echolm export gguf`: every export is read back through the `gguf` package's reader and
loaded by transformers' GGUF loader (`from_pretrained(folder, gguf_file=...)`), whose logits
must equal Echo's (f32 exactly; f16 / q8_0 within the rounding of the weights they store) and
whose tokenizer, rebuilt from the file with llama.cpp's pre-tokenizer name, must give Echo's
ids. Models come from Echo runs and from imported Hugging Face checkpoints built here. The
proof in llama.cpp itself is bench/gguf_llamacpp.py (it needs a C++ build). The largest logit
difference of every comparison is printed (pytest -s)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub: every model is built here
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

import gguf  # noqa: E402
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from echolm.chat_format import ECHO_TEMPLATE as CHAT_TEMPLATE  # noqa: E402
from echolm.checkpoint import load_model, save_model  # noqa: E402
from echolm.cli import main  # noqa: E402
from echolm.config import ModelConfig  # noqa: E402
from echolm.export_gguf import QWEN2_PATTERN  # noqa: E402
from echolm.model import Transformer  # noqa: E402
from echolm.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer  # noqa: E402

TEXTS = [
    "The quick brown fox", " leading space", "It's 12:30 -- we'll see; they'RE here, I'D go",
    "x = 1234567890\n\n\n\tdef f(a, b):\n        return a+b  # sum\r\n\r\n",
    "naïve café, Zürich 北京 東京 🙂👍🏽 — “quoted” ‘single’ 'tis", "   \n \n  trailing   ",
    "3.14159e-10 +42 -7 ١٢٣ ²³ ½", "a\u00a0b\u2003c \u200bd", "don't  'll 's's 've\n's",
    "<|bos|> is text here", "!!!???...\n\n!!  ", "it'\u017ft, x'\u212a", "",
]
VARIANTS = {  # Echo model fields -> llama.cpp architecture
    "llama": ({"qk_norm": False, "tie_embeddings": False}, "llama"),
    "llama-tied-head_dim": ({"qk_norm": False, "tie_embeddings": True, "head_dim": 8},
                            "llama"),
    "qwen3": ({"qk_norm": True, "tie_embeddings": False}, "qwen3"),
    "qwen3-tied-head_dim": ({"qk_norm": True, "tie_embeddings": True, "head_dim": 32,
                             "mlp_hidden": 96}, "qwen3"),
    "qwen2-bias": ({"qk_norm": False, "attention_bias": True}, "qwen2"),
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # 2 shared cores: more threads are far slower on tiny matmuls


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random (zeros would hide a transposed, unpermuted or misnamed tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.1 * noise)


def random_sft(run_dir, variant: str) -> tuple[Transformer, Tokenizer]:
    """A random model of `variant`'s layout saved as the run's sft stage (with its tokenizer)."""
    fields, _ = VARIANTS[variant]
    tok = Tokenizer.load(run_dir / "tokenizer")
    cfg = ModelConfig(vocab_size=tok.vocab_size + 5, n_layer=2, n_embd=64, n_head=4,
                      n_kv_head=2, max_seq_len=128, rope_theta=5000.0, norm_eps=1e-5, **fields)
    model = Transformer(cfg)
    _randomise(model)
    save_model(model, run_dir / "sft")
    return model, tok


def _export(run: Path, out: Path, *args: str) -> None:
    assert main(["export", "gguf", "--run", str(run), "--out", str(out), *args]) == 0


def _field(reader, key: str):
    f = reader.fields[key]
    return f.contents()


def _hf_from_gguf(path: Path, cfg: ModelConfig):
    # transformers' GGUF loader reads no head_dim / attention_bias for qwen3: give them
    extra = {"head_dim": cfg.d_head, "attention_bias": cfg.attention_bias} if cfg.qk_norm else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **extra)
    return model.eval()


def _rounded(model: Transformer, dtype: str) -> Transformer:
    """Echo's model with its matrices rounded as the file stores them (f16, or q8_0's blocks
    of 32 where a row holds whole blocks); 1-D tensors stay f32."""
    q8 = gguf.GGMLQuantizationType.Q8_0

    def rnd(v: torch.Tensor) -> torch.Tensor:
        if v.ndim == 1:
            return v
        if dtype == "q8_0" and v.shape[-1] % 32 == 0:
            a = gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), q8), q8)
            return torch.from_numpy(a.reshape(v.shape).copy())
        return v.half().float()

    copy = Transformer(model.cfg)
    copy.load_state_dict({k: rnd(v) for k, v in model.state_dict().items()})
    return copy.eval()


def _diff(a: Transformer, b, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(ids) - b(ids).logits).abs().max())


def _check_tokenizer(path: Path, tok: Tokenizer, pre: str) -> None:
    """The file's vocabulary, as transformers rebuilds it with llama.cpp's pre-tokenizer,
    gives Echo's ids (with <|bos|> first, add_bos_token, where the run's chat format starts
    with it: Echo's does, an import's ChatML does not)."""
    ht = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    first = [tok.bos] if tok.chat.bos else []
    for text in TEXTS:
        # Echo cuts special-token text in a document as text (llama.cpp's parse_special=False)
        got = ht(text, split_special_tokens=True)["input_ids"]
        assert got == [*first, *tok.encode(text)], (pre, text)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_gguf_loads_in_transformers_with_echo_logits(variant, run_dir, tmp_path):
    arch = VARIANTS[variant][1]
    model, tok = random_sft(run_dir, variant)
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    for dtype in ("f32", "f16", "q8_0"):
        out = tmp_path / f"m-{dtype}.gguf"
        _export(run_dir, out, "--dtype", dtype)
        reader = gguf.GGUFReader(out)
        assert _field(reader, "general.architecture") == arch
        assert _field(reader, "tokenizer.ggml.pre") == "qwen2"  # Echo's split, as llama.cpp's
        assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos
        assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.assistant_end
        assert _field(reader, "tokenizer.ggml.eot_token_id") == tok.assistant_end
        assert _field(reader, "tokenizer.ggml.padding_token_id") == tok.pad
        assert _field(reader, "tokenizer.ggml.add_bos_token") is True
        assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
        tokens = _field(reader, "tokenizer.ggml.tokens")
        types = _field(reader, "tokenizer.ggml.token_type")
        assert len(tokens) == cfg.vocab_size and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
        assert [types[tok.special[t]] for t in SPECIAL_TOKENS] == [3] * len(SPECIAL_TOKENS)
        assert ("output.weight" in {t.name for t in reader.tensors}) != cfg.tie_embeddings
        hf = _hf_from_gguf(out, cfg)
        plain = _diff(model, hf, ids)
        # f16 / q8_0 round the weights: the loaded model must compute Echo's model with
        # exactly that rounding (the rounding's own cost is printed, and bounded)
        rounded = _diff(_rounded(model, dtype), hf, ids) if dtype != "f32" else plain
        print(f"\n{variant} {dtype}: max |logit diff| vs Echo = {plain:.3g}, vs Echo with the "
              f"file's rounding = {rounded:.3g}")
        assert rounded <= 1e-5
        assert plain <= {"f32": 1e-5, "f16": 0.02, "q8_0": 0.5}[dtype]
        if dtype == "q8_0":
            stored = {t.name: t.tensor_type for t in reader.tensors}
            assert stored["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    _check_tokenizer(tmp_path / "m-f32.gguf", tok, "qwen2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-f16.gguf", "m-f32.gguf",
                                                          "m-q8_0.gguf", "run"]  # no temp files


def test_echo_split_equals_qwen2_split():
    """llama.cpp's `qwen2` pre-tokenizer is Qwen2's regex; Echo's pattern (possessive
    quantifiers, `\\s*[\\r\\n]`) cuts every text the same way."""
    ours = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    qwen2 = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated")
    texts = TEXTS + ["".join(chr(c) for c in range(32, 0x2100, 7)), "\r\n \r\r\n\t \u3000x",
                     "'S'T'Re'VE'm'Ll'D 'x'", "a1b22c333 ...\n\n\n   \n", "🙂\n🙂  🙂\t\t"]
    for text in texts:
        assert ours.pre_tokenize_str(text) == qwen2.pre_tokenize_str(text), text


def test_base_stage_ends_documents_with_bos(run_dir, tmp_path):
    tok = Tokenizer.load(run_dir / "tokenizer")
    save_model(Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=32,
                                       n_head=2, n_kv_head=1, max_seq_len=64)), run_dir / "base")
    _export(run_dir, tmp_path / "base.gguf", "--stage", "base")
    reader = gguf.GGUFReader(tmp_path / "base.gguf")
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.bos
    assert _field(reader, "tokenizer.ggml.eot_token_id") == tok.assistant_end
    assert _field(reader, "general.file_type") == 1  # f16 by default


# ---- imported models ------------------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _foreign_source(folder: Path, corpus: Path, kind: str) -> Path:
    """A small random `kind` checkpoint with its own byte-level BPE: GPT-2's split (llama)
    or Qwen2's (qwen2), ChatML specials, saved with save_pretrained."""
    texts = [f.read_text() for f in sorted(corpus.glob("*.txt"))]
    hf = HFTokenizer(models.BPE())
    if kind == "llama":
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<|endoftext|>",
                                               eos_token="<|im_end|>")
    tok.chat_template = CHATML
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind](
        vocab_size=448, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=5000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomise(model, seed=3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind,pre", [("llama", "gpt-2"), ("qwen2", "qwen2")])
def test_imported_model_exports_to_gguf(kind, pre, corpus, tmp_path):
    src = _foreign_source(tmp_path / "src", corpus, kind)
    run = tmp_path / "run"
    assert main(["import", "hf", str(src), "--out", str(run)]) == 0
    out = tmp_path / "imported.gguf"
    _export(run, out, "--dtype", "f32")
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.architecture") == kind
    assert _field(reader, "tokenizer.ggml.pre") == pre
    tok = Tokenizer.load(run / "tokenizer")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert tokens[tok.bos] == "<|bos|>" and types[tok.bos] == 3
    assert tokens[0] == "<|endoftext|>" and types[0] == 3  # the source's own specials stay
    # the imported base model knows its own chat format: the file carries it and its end token
    assert _field(reader, "tokenizer.chat_template") == CHATML
    assert tokens[_field(reader, "tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos
    model = load_model(run / "base")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40),
                        generator=torch.Generator().manual_seed(2))
    diff = _diff(model, _hf_from_gguf(out, model.cfg), ids)
    print(f"\nimported {kind} f32: max |logit diff| vs Echo = {diff:.3g}")
    assert diff <= 1e-5
    _check_tokenizer(out, tok, pre)
    # fine-tuned in Echo (here: the base weights as `sft`), it speaks the run's chat format:
    # its own (ChatML), kept on import
    assert tok.chat.name == "chatml"
    shutil.copytree(run / "base", run / "sft")
    _export(run, tmp_path / "sft.gguf", "--stage", "sft")
    reader = gguf.GGUFReader(tmp_path / "sft.gguf")
    assert _field(reader, "tokenizer.chat_template") == CHATML
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.assistant_end
    assert tokens[tok.assistant_end] == "<|im_end|>"


# ---- refusals -------------------------------------------------------------------------------

def test_export_gguf_refusals_are_one_line(run_dir, tmp_path, capsys):
    tok = Tokenizer.load(run_dir / "tokenizer")
    save_model(Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=32,
                                       n_head=2, n_kv_head=1, max_seq_len=64)), run_dir / "sft")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")

    def refused(*args: str) -> str:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("echolm: error: ") and err.count("\n") == 1
        return err

    assert "already exists (use --force" in refused("gguf", "--run", str(run_dir),
                                                    "--out", str(out))
    assert out.read_bytes() == b"keep"
    # --force replaces an earlier GGUF only, never another file (a model, a note)
    assert "is not a GGUF file, so --force will not replace it" in refused(
        "gguf", "--run", str(run_dir), "--out", str(out), "--force")
    model_file = run_dir / "sft" / "model.safetensors"
    kept = model_file.read_bytes()
    assert "is not a GGUF file" in refused("gguf", "--run", str(run_dir), "--out",
                                           str(model_file), "--force")
    assert model_file.read_bytes() == kept and out.read_bytes() == b"keep"
    assert "is a folder" in refused("gguf", "--run", str(run_dir), "--out", str(tmp_path))
    assert "applies to `export gguf` only" in refused("hf", "--run", str(run_dir), "--out",
                                                     str(tmp_path / "hf"), "--dtype", "f16")
    assert "no finished 'rl' model" in refused("gguf", "--run", str(run_dir), "--stage", "rl",
                                               "--out", str(tmp_path / "x.gguf"))
    # a tokenizer llama.cpp cannot cut the same way is refused, naming the file
    spec = tok.hf.to_str()
    odd = HFTokenizer.from_str(spec)
    odd.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,2}|\p{L}+|\s+|."), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    odd.save(str(run_dir / "tokenizer" / "tokenizer.json"))
    err = refused("gguf", "--run", str(run_dir), "--out", str(tmp_path / "y.gguf"))
    assert "tokenizer.json: pre_tokenizer" in err and "no llama.cpp pre-tokenizer" in err
    earlier = tmp_path / "earlier.gguf"
    earlier.write_bytes(b"GGUF" + b"\0" * 8)
    assert main(["export", "gguf", "--run", str(run_dir), "--out", str(earlier),
                 "--force"]) == 2
    assert earlier.read_bytes() == b"GGUF" + b"\0" * 8  # a refused export leaves it alone
    # and no temporary files are left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.gguf", "m.gguf", "run"]
