"""`echolm export gguf`: one GGUF file that llama.cpp, Ollama and LM Studio run.

The architecture follows `echolm.hf.hf_architecture`: ``qwen3`` when QK-norm is on, ``qwen2``
when the model has q/k/v biases, else ``llama``. Echo's q/k weights are in Hugging Face's
"rotate half" layout, which llama.cpp's qwen2/qwen3 (NEOX RoPE) use as they are; its llama
architecture rotates adjacent pairs (Meta's layout), so for ``llama`` the rows of q and k are
permuted per head exactly as llama.cpp's convert_hf_to_gguf.py does.

The tokenizer is written as llama.cpp's byte-level BPE ("gpt2" model): the token strings and
merges of tokenizer.json, special tokens as control tokens, and ids the model has beyond the
tokenizer as unused ``[PAD<id>]`` entries. llama.cpp cuts text with one of its known
pre-tokenizers, named in ``tokenizer.ggml.pre``: Echo's split pattern (GPT-4's with single
digits) selects exactly the same pieces as Qwen2's (only possessive quantifiers differ, which
never change a match here), so Echo's tokenizers are ``qwen2``; an imported tokenizer must use
Qwen2's, Llama 3's, GPT-2's or SmolLM's split (``smollm``: every digit alone, then GPT-2's),
anything else is refused. ``<|bos|>`` is added to every text (``add_bos_token``) when the
run's chat format starts with it (Echo's; an import's ChatML does not: as the source file); the chat
template and end of generation are those the model knows (`chat_format`): the run's chat format
(Echo's, `echolm.chat_format.ECHO_TEMPLATE`, or an import's own) and its end of turn, or
``<|bos|>`` (the end of a document) for an Echo base model; an imported base model keeps its
source's own template and end token.

Dtypes: ``f32`` (exact), ``f16`` and ``q8_0`` for the matrices (1-D tensors, the norms and
biases, stay f32 as llama.cpp's converter keeps them). The file is written under a temporary
name beside ``--out`` and renamed when complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from echolm.atomic import atomic_path
from echolm.chat_format import ECHO_TEMPLATE
from echolm.checkpoint import load_model, stage_dir
from echolm.config import ModelConfig
from echolm.errors import EchoError
from echolm.hf import hf_architecture
from echolm.model import Transformer
from echolm.runfiles import read_json
from echolm.tokenizer import SPLIT_PATTERN, Tokenizer

DTYPES = ("f32", "f16", "q8_0")
# Split patterns (tokenizer.json's pre_tokenizer) and the llama.cpp pre-tokenizer that cuts
# text identically. Echo's differs from Qwen2's only in possessive quantifiers and writing
# `\s*[\r\n]` for `\s*[\r\n]+`, neither of which changes any match (see the module doc).
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}"""
                 r"""\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_PATTERN = QWEN2_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
KNOWN_SPLITS = {SPLIT_PATTERN: "qwen2", QWEN2_PATTERN: "qwen2", LLAMA3_PATTERN: "llama-bpe"}
TOKEN_NORMAL, TOKEN_USER_DEFINED, TOKEN_CONTROL, TOKEN_UNUSED = 1, 4, 3, 5


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split q/k rows -> Meta's interleaved pairs (convert_hf_to_gguf's permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `_llama_permute` (a llama GGUF's q/k rows -> HF's half-split layout)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# Echo's (= Hugging Face's, without ``model.``) tensor names -> llama.cpp's; import inverts them
GGUF_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down"}


def gguf_tensors(model: Transformer, arch: str) -> dict[str, torch.Tensor]:
    """Echo's tensors under llama.cpp's names (fp32; q/k permuted for ``llama``)."""
    cfg = model.cfg
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        t = t.detach().float().contiguous()
        if name in GGUF_NAMES:
            out[GGUF_NAMES[name]] = t
            continue
        _, i, rest = name.split(".", 2)  # layers.{i}.{module}.{weight|bias}
        module, kind = rest.rsplit(".", 1)
        if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            t = _llama_permute(t, cfg.n_head if module.endswith("q_proj") else cfg.n_kv_head)
        out[f"blk.{i}.{GGUF_LAYER_NAMES[module]}.{kind}"] = t
    return out


# ---- tokenizer ------------------------------------------------------------------------------

def _pre_tokenizer_name(spec: dict[str, Any] | None, where: str) -> str:
    """llama.cpp's name for the split of a byte-level tokenizer.json's pre_tokenizer."""
    steps = (spec or {}).get("pretokenizers", [spec]) if spec else []
    splits = [s for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(byte_level) == 1 and len(steps) == 1 and byte_level[0].get("use_regex", True):
        if byte_level[0].get("add_prefix_space"):
            raise EchoError(f"{where}: a ByteLevel pre_tokenizer with add_prefix_space=true "
                            "has no llama.cpp equivalent")
        return "gpt-2"
    digits = [s for s in steps if s.get("type") == "Digits"]
    if (len(steps) == 2 and steps[0] in digits and digits[0].get("individual_digits")
            and steps[1] in byte_level and byte_level[0].get("use_regex", True)
            and not byte_level[0].get("add_prefix_space")):
        return "smollm"  # SmolLM's: every digit alone, then GPT-2's split
    if len(splits) == 1 and len(byte_level) == 1 and len(steps) == 2:
        pattern = splits[0].get("pattern", {}).get("Regex")
        if pattern in KNOWN_SPLITS and not byte_level[0].get("use_regex", True):
            return KNOWN_SPLITS[pattern]
    raise EchoError(f"{where}: pre_tokenizer {json.dumps(spec)[:120]} matches no llama.cpp "
                    "pre-tokenizer Echo knows (Echo's, Qwen2's, Llama 3's, GPT-2's or "
                    "SmolLM's split)")


def gguf_vocab(tok: Tokenizer, n_vocab: int, where: str) -> dict[str, Any]:
    """tokens, token types, merges and llama.cpp's pre-tokenizer name for `tok`."""
    spec = json.loads(tok.hf.to_str())
    model, decoder = spec.get("model") or {}, (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise EchoError(f"{where}: only byte-level BPE tokenizers export to GGUF (this one is "
                        f"{model.get('type')} with decoder {decoder})")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), where)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [TOKEN_UNUSED] * n_vocab
    for piece, i in tok.hf.get_vocab(with_added_tokens=False).items():
        tokens[i], types[i] = piece, TOKEN_NORMAL
    for i, added in tok.hf.get_added_tokens_decoder().items():
        tokens[i] = added.content
        types[i] = TOKEN_CONTROL if added.special else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre}


# ---- writing --------------------------------------------------------------------------------

def _tensor_data(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, GGML type or None) for one tensor: 1-D ones stay f32, q8_0 needs rows of 32."""
    a = t.numpy()
    if a.ndim == 1 or dtype == "f32":
        return a.astype(np.float32), None
    if dtype == "q8_0" and a.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(a.astype(np.float32), q), q
    return a.astype(np.float16), None


def chat_format(run_dir: Path, stage: str, tok: Tokenizer) -> tuple[str, int]:
    """(chat template, end-of-generation id) of the model in `stage`: the run's chat format
    (Echo's, or an import's own) and its end of turn for a chat stage, <|bos|> (the end of a
    document) for an Echo base model;
    an imported base model keeps its source's own template and end token (import.json)."""
    if stage != "base":
        return tok.chat.template, tok.assistant_end
    imported = run_dir / "import.json"
    source = (read_json(imported, "re-import the model").get("source_chat")
              if imported.exists() else None)
    if not source:
        return ECHO_TEMPLATE, tok.bos
    if not isinstance(source, dict) or not isinstance(source.get("template"), str):
        raise EchoError(f"{imported}: 'source_chat' should hold the source's chat template "
                        "('template'); re-import the model")
    eos = tok.hf.token_to_id(source["eos_token"]) if source.get("eos_token") else None
    return source["template"], tok.bos if eos is None else eos


def write_gguf(path: Path, model: Transformer, tok: Tokenizer, *, dtype: str, name: str,
               chat: tuple[str, int], where: str) -> dict[str, Any]:
    """Write `model` and `tok` to `path` (llama.cpp's GGUF) with `chat` = (template, end of
    generation id). Returns what was written."""
    cfg: ModelConfig = model.cfg
    arch, _ = hf_architecture(cfg)
    if arch == "qwen2" and cfg.d_head * cfg.n_head != cfg.n_embd:
        raise EchoError(f"model.head_dim={cfg.d_head}: llama.cpp's qwen2 needs n_head * "
                        f"head_dim == n_embd ({cfg.n_head} * {cfg.d_head} != {cfg.n_embd})")
    vocab = gguf_vocab(tok, cfg.vocab_size, where)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_mlp)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.d_head)
    w.add_value_length(cfg.d_head)
    w.add_rope_dimension_count(cfg.d_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(tok.bos)
    w.add_eos_token_id(chat[1])
    w.add_eot_token_id(chat[1] if chat[1] != tok.bos else tok.assistant_end)
    w.add_pad_token_id(tok.pad)
    # <|bos|> first where the chat format starts with it (Echo's); an imported format without
    # one (ChatML) starts at its first turn, and llama.cpp, which drops a leading BOS only
    # when the rendered template starts with it, would otherwise put <|bos|> before it
    w.add_add_bos_token(bool(tok.chat.bos))
    w.add_add_eos_token(False)
    w.add_chat_template(chat[0])
    for tname, t in gguf_tensors(model, arch).items():
        data, raw = _tensor_data(t, dtype)
        w.add_tensor(tname, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"architecture": arch, "pre_tokenizer": vocab["pre"], "dtype": dtype}


def export_gguf(run_dir: Path, out: Path, stage: str | None = None, dtype: str = "f16",
                force: bool = False, log=print) -> dict[str, Any]:
    """Write `stage`'s model (default: the latest) and the run's tokenizer as one GGUF file."""
    if dtype not in DTYPES:
        raise EchoError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")
    if out.is_dir():
        raise EchoError(f"{out}: is a folder; --out names the .gguf file to write")
    if out.is_symlink():
        raise EchoError(f"{out}: is a symbolic link; name the .gguf file itself")
    if out.exists() and not force:
        raise EchoError(f"{out}: already exists (use --force to replace it)")
    if out.exists() and out.open("rb").read(4) != b"GGUF":  # --force replaces only a GGUF
        raise EchoError(f"{out}: is not a GGUF file, so --force will not replace it; choose "
                        "another --out")
    folder = stage_dir(run_dir, stage)
    tok_file = run_dir / "tokenizer" / "tokenizer.json"
    tok = Tokenizer.load(tok_file)
    model = load_model(folder)
    if tok.vocab_size > model.cfg.vocab_size:
        raise EchoError(f"{tok_file}: the tokenizer has {tok.vocab_size} tokens, more than the "
                        f"model's vocab_size {model.cfg.vocab_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with atomic_path(out) as tmp, torch.no_grad():
        info = write_gguf(tmp, model, tok, dtype=dtype, name=f"echolm {run_dir.name} "
                          f"{folder.name}", chat=chat_format(run_dir, folder.name, tok),
                          where=str(tok_file))
    result = {"out": str(out), "stage": folder.name, "params": model.num_params(),
              "bytes": out.stat().st_size, **info}
    log(f"export: {folder.name} model ({model.num_params():,} parameters) -> {out} as GGUF "
        f"{info['architecture']} {dtype} ({result['bytes'] / 1e6:.1f} MB, "
        f"{time.time() - started:.1f}s)")
    return result

