"""Hugging Face interop: `echolm export hf` and `echolm import hf`.

Echo's model has Hugging Face's parameter names (minus the leading ``model.``), so both
directions are a rename plus a config translation; no tensor is ever transformed.

Export writes a folder that `transformers` loads with ``AutoModelForCausalLM`` and
``AutoTokenizer``: ``LlamaForCausalLM`` when QK-norm is off (``Qwen2ForCausalLM`` when the model
also has q/k/v biases), ``Qwen3ForCausalLM`` when it is on. Weights are fp32 safetensors; the
tokenizer is the run's own ``tokenizer.json`` (same vocabulary, merges and split) plus a
post-processor that starts every text with ``<|bos|>`` as Echo starts every document
(``add_bos_token``, as Llama's tokenizers), and the Jinja chat template of the run's chat
format: Echo's (the template writes its ``<|bos|>``; ``apply_chat_template`` tokenizes without
special tokens, so there is one) or an import's own. ``generation_config.json`` stops at the
format's end of turn (an Echo base model also at ``<|bos|>``, its end of document). The folder is
written under a temporary name and renamed. Import takes that post-processor off again.

Import takes a local Llama / Qwen2 / Qwen3 checkpoint folder (config.json, safetensors, a fast
tokenizer's tokenizer.json) and makes a run directory whose ``tokenizer`` and ``base`` stages
are finished, so SFT (or any later stage) starts from it. What Echo's model cannot compute is
refused with the config field named: rope scaling other than the default, sliding-window
attention, activations other than SiLU, MLP biases, an o_proj bias that is not zero.

Foreign tokenizers. An imported model keeps its own tokenizer, ids and merges unchanged: its
pretrained embeddings only mean anything for those ids. Echo's chat format needs Echo's special
tokens (``<|bos|>``, ``<|user_start|>`` ...), so import *adds* the missing ones to the
tokenizer as special tokens (ids after the last existing one; an Echo export already has them
and nothing changes, which makes export -> import bit-exact). The embedding (and an untied
head) gets rows for them: a new token's row is the mean of the existing tokens' rows, except
``<|bos|>``, which copies the source model's BOS row when it has one (Echo starts every
document and conversation with ``<|bos|>``, so the model keeps its usual first token). New rows
beyond the source's vocabulary extend the matrices. The model's own chat template (ChatML,
Llama 3's headers, ...) is kept as the run's chat format when Echo can read it (`--chat-format
auto`, echolm/chat_format.py; else Echo's format, which SFT then teaches the model), and an
export carries the run's format. Echo's `Tokenizer` encodes such a tokenizer through
`tokenizers` itself (not tiktoken), since its split pattern differs from Echo's.

Import reads the folder into an `echolm.import_run.ImportSource`; `write_import` (shared with
`echolm import gguf`) adds the tokens and rows and writes the run directory.

Where it goes. `--out` is never the run or source itself, a folder holding it, or one inside
a run directory; `--force` replaces only an earlier export (exactly EXPORT_FILES) or an
earlier import nothing was added to (exactly import_run.IMPORT_FILES), swapped in once complete
(`check_out`, `replacing`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from echolm.atomic import atomic_write_json
from echolm.checkpoint import imported_instruct, load_model, read_weights, stage_dir
from echolm.config import ModelConfig
from echolm.errors import EchoError
from echolm.import_run import (
    IMPORT_FILES,
    IMPORT_OPTIONAL,
    ImportSource,
    add_echo_specials,
    write_import,
)
from echolm.model import Transformer
from echolm.outdir import check_out, replacing
from echolm.runfiles import read_json
from echolm.tokenizer import BOS, SPECIAL_TOKENS, Tokenizer

SUPPORTED = ("llama", "qwen2", "qwen3")

# What export writes: `--force` replaces a folder only when it holds exactly this (an earlier
# export), so it never deletes anything else (an import's: import_run.IMPORT_FILES).
EXPORT_FILES = frozenset({"model.safetensors", "config.json", "generation_config.json",
                          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                          "echolm.json"})


# ---- export ---------------------------------------------------------------------------------

def hf_architecture(cfg: ModelConfig) -> tuple[str, str]:
    """(model_type, architecture class) that computes exactly what Echo's model does."""
    if cfg.qk_norm:
        return "qwen3", "Qwen3ForCausalLM"
    if cfg.attention_bias:
        return "qwen2", "Qwen2ForCausalLM"
    return "llama", "LlamaForCausalLM"


def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
    """config.json for `transformers` (both the 4.x `rope_theta` and 5.x `rope_parameters`)."""
    model_type, arch = hf_architecture(cfg)
    if model_type == "llama" and cfg.n_embd % cfg.n_head:
        raise EchoError(f"model.n_embd={cfg.n_embd} is not a multiple of model.n_head="
                        f"{cfg.n_head}: transformers' Llama refuses that (head_dim is fine "
                        "for Qwen3, i.e. with model.qk_norm=true)")
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.d_mlp, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.d_head, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "use_cache": True, "bos_token_id": tok.bos, "eos_token_id": tok.assistant_end,
        "pad_token_id": tok.pad, "torch_dtype": "float32",
    }
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                   layer_types=["full_attention"] * cfg.n_layer)
        if model_type == "qwen3":
            out["attention_bias"] = cfg.attention_bias
    return out


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Echo's tensors under HF names (``model.`` prefix; a tied head is not stored)."""
    cfg = model.cfg
    sd = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                sd[name] = t.detach().float().contiguous()
            continue
        sd[f"model.{name}"] = t.detach().float().contiguous()
    if cfg.attention_bias and cfg.qk_norm:  # Qwen3's attention_bias includes o_proj: zero it
        for i in range(cfg.n_layer):
            sd[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.n_embd)
    return sd


def tokenizer_files(tok: Tokenizer, cfg: ModelConfig) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for `AutoTokenizer`."""
    specials = {"bos_token": BOS, "eos_token": tok.chat.end_of_turn, "pad_token": "<|pad|>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
              "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len,
              "chat_template": tok.chat.template}
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def bos_processor(bos: int) -> processors.TemplateProcessing:
    """Start every text with <|bos|> (id `bos`), as Echo starts every document (Llama's
    tokenizers do the same): `tokenizer(text)` then gives the ids Echo's model saw in
    training."""
    return processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1",
                                         special_tokens=[(BOS, bos)])


def export_tokenizer_json(tok_file: Path, tok: Tokenizer) -> str:
    """The run's tokenizer.json (same vocabulary, merges and split: same ids) with
    `bos_processor` as its post-processor."""
    hf = HFTokenizer.from_file(str(tok_file))
    hf.post_processor = bos_processor(tok.bos)
    return hf.to_str(pretty=True)


def export_hf(run_dir: Path, out: Path, stage: str | None = None, force: bool = False,
              log=print) -> dict[str, Any]:
    """Write `stage`'s model (default: the latest) and the run's tokenizer as a folder that
    `transformers` loads. Returns what was written."""
    check_out(out, force, "export", EXPORT_FILES, run_dir, "the run directory being exported")
    folder = stage_dir(run_dir, stage)
    tok_file = run_dir / "tokenizer" / "tokenizer.json"
    tok = Tokenizer.load(tok_file)
    model = load_model(folder)
    cfg = model.cfg
    if tok.vocab_size > cfg.vocab_size:
        raise EchoError(f"{tok_file}: the tokenizer has {tok.vocab_size} tokens, more than the "
                        f"model's vocab_size {cfg.vocab_size}")
    config = hf_config(cfg, tok)
    with replacing(out) as tmp:
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", config)
        # a chat model ends a turn (and at its format's other stops: a Qwen import's
        # <|endoftext|>), never at <|bos|>; a base model ends a document with <|bos|> (an
        # instruct import's base stage is a chat model: as its source, it ends a turn)
        ends = [i for i in tok.stop_ids if i != tok.bos]
        eos: int | list[int] = ends[0] if len(ends) == 1 else ends
        if folder.name == "base" and not imported_instruct(run_dir):
            eos = list(tok.stop_ids)
        atomic_write_json(tmp / "generation_config.json", {
            "bos_token_id": tok.bos, "eos_token_id": eos, "pad_token_id": tok.pad})
        (tmp / "tokenizer.json").write_text(export_tokenizer_json(tok_file, tok),
                                            encoding="utf-8")
        for name, obj in tokenizer_files(tok, cfg).items():
            atomic_write_json(tmp / name, obj)
        atomic_write_json(tmp / "echolm.json", {
            "run": str(run_dir.resolve()), "stage": folder.name, "echo_model_config": vars(cfg),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    result = {"out": str(out), "stage": folder.name, "architecture": config["architectures"][0],
              "params": model.num_params()}
    log(f"export: {folder.name} model ({model.num_params():,} parameters) -> {out} as "
        f"{config['architectures'][0]}")
    return result


# ---- import ---------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, "is this a complete Hugging Face checkpoint folder?")


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    """rope_theta from a 4.x (`rope_theta` + `rope_scaling`) or 5.x (`rope_parameters`) config;
    anything but plain RoPE is refused."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise EchoError(f"{where}: rope_parameters must be an object")
    if any(isinstance(v, dict) for v in params.values()):
        raise EchoError(f"{where}: rope_parameters per layer type are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise EchoError(f"{where}: rope scaling '{kind}' (rope_parameters.rope_type) is not "
                        "supported: Echo's model implements plain RoPE only")
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise EchoError(f"{where}: partial_rotary_factor={factor} is not supported")
    return _positive_number(params.get("rope_theta", hf.get("rope_theta", 10_000.0)),
                            "rope_theta", where)


def _positive_number(v: Any, key: str, where: str) -> float:
    """`v` (config key `key`) as a positive finite float, or a one-line refusal."""
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v < float("inf"):
        raise EchoError(f"{where}: {key} must be a positive number, got {v!r}")
    return float(v)


# Echo's model fields and the Hugging Face config.json keys they are read from
HF_NAMES = {"n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads",
            "n_embd": "hidden_size", "n_layer": "num_hidden_layers", "vocab_size": "vocab_size",
            "head_dim": "head_dim", "mlp_hidden": "intermediate_size",
            "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta",
            "norm_eps": "rms_norm_eps", "init_std": "initializer_range"}


def echo_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    """Translate an HF config.json to Echo's ModelConfig, or refuse naming the field."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise EchoError(f"{where}: model_type={model_type!r} is not supported (Echo imports "
                        f"{', '.join(SUPPORTED)})")

    def need(key: str, default: int | None = None) -> int:
        """A positive whole number; `default` where the key is absent or null."""
        v = hf.get(key)
        if v is None and default is not None:
            return default
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise EchoError(f"{where}: {key} must be a positive integer, got {v!r}")
        return v

    def number(key: str, default: float) -> float:
        """A positive finite number; `default` where the key is absent or null."""
        v = hf.get(key)
        return default if v is None else _positive_number(v, key, where)

    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise EchoError(f"{where}: hidden_act={act!r} is not supported (Echo's MLP is SwiGLU)")
    if hf.get("mlp_bias"):
        raise EchoError(f"{where}: mlp_bias=true is not supported (Echo's MLP has no biases)")
    if hf.get("use_sliding_window"):
        raise EchoError(f"{where}: use_sliding_window=true is not supported (Echo's attention "
                        "is full causal attention)")
    if model_type == "llama" and hf.get("sliding_window"):
        raise EchoError(f"{where}: sliding_window is not supported")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        odd = sorted({t for t in layer_types if t != "full_attention"})
        raise EchoError(f"{where}: layer_types {odd} are not supported (only full_attention)")
    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    n_kv = need("num_key_value_heads", n_head)
    # Qwen3Config's default head_dim is 128
    head_dim = need("head_dim", 128 if model_type == "qwen3" else max(1, n_embd // n_head))
    intermediate = need("intermediate_size")
    cfg = ModelConfig(
        vocab_size=need("vocab_size"), n_layer=need("num_hidden_layers"), n_embd=n_embd,
        n_head=n_head, n_kv_head=n_kv, head_dim=head_dim, mlp_hidden=intermediate,
        max_seq_len=need("max_position_embeddings", 2048 if model_type == "llama" else 32768),
        rope_theta=_rope_theta(hf, where), qk_norm=model_type == "qwen3",
        attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=number("rms_norm_eps", 1e-6), init_std=number("initializer_range", 0.02))
    # Echo's defaults where they give the same numbers, so an Echo export round-trips exactly
    if n_embd % n_head == 0 and head_dim == n_embd // n_head:
        cfg.head_dim = 0
    if intermediate == ModelConfig(n_embd=n_embd).d_mlp:
        cfg.mlp_hidden = 0
    try:
        cfg.validate()
    except EchoError as e:  # in the source's own names, not Echo's
        msg = str(e)
        for ours, theirs in HF_NAMES.items():
            msg = msg.replace(f"model.{ours}=", f"{theirs}=")
        raise EchoError(f"{where}: {msg}") from None
    return cfg


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise EchoError(f"{index}: no weight_map")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise EchoError(f"{folder}: only PyTorch .bin weights; Echo reads safetensors (re-save "
                        "with save_pretrained(..., safe_serialization=True))")
    else:
        raise EchoError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(read_weights(f))
    return tensors


def _source_bos(folder: Path, hf: dict[str, Any], tok: HFTokenizer) -> int | None:
    """The source model's BOS id: tokenizer_config.json's bos_token, else config.json's."""
    tc = folder / "tokenizer_config.json"
    if tc.exists():
        bos = _read_json(tc).get("bos_token")
        if isinstance(bos, dict):
            bos = bos.get("content")
        if isinstance(bos, str) and tok.token_to_id(bos) is not None:
            return tok.token_to_id(bos)
    bos_id = hf.get("bos_token_id")
    return bos_id if isinstance(bos_id, int) and not isinstance(bos_id, bool) else None


def _read_tokenizer(folder: Path) -> HFTokenizer:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise EchoError(f"{path}: missing; Echo imports fast tokenizers (tokenizer.json). "
                        "Save one with AutoTokenizer.from_pretrained(...).save_pretrained(...)")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the library raises plain Exceptions for bad files
        raise EchoError(f"{path}: not a valid tokenizer.json ({e})") from None


def import_tokenizer(folder: Path) -> tuple[HFTokenizer, list[str]]:
    """The source's tokenizer with Echo's missing special tokens added (ids after the last)."""
    hf = _read_tokenizer(folder)
    return hf, add_echo_specials(hf)


def _end_ids(src: Path, hf: dict[str, Any]) -> list[Any]:
    """The ids the source's generation ends at: generation_config.json's eos_token_id (one id
    or a list: Llama 3.1 Instruct's <|end_of_text|>, <|eom_id|>, <|eot_id|>), else
    config.json's."""
    gen = src / "generation_config.json"
    eos = (_read_json(gen) if gen.exists() else {}).get("eos_token_id", hf.get("eos_token_id"))
    return eos if isinstance(eos, list) else [eos]


def import_hf(src: Path, run_dir: Path, force: bool = False, chat_format: str = "auto",
              log=print) -> dict[str, Any]:
    """Make `run_dir` (tokenizer + finished base stage) from an HF checkpoint folder."""
    if not src.is_dir():
        raise EchoError(f"{src}: not a folder (expected a checkpoint with config.json, "
                        "safetensors and tokenizer.json)")
    check_out(run_dir, force, "import", IMPORT_FILES, src, "the checkpoint being imported",
              IMPORT_OPTIONAL)
    where = str(src / "config.json")
    hf = _read_json(src / "config.json")
    cfg = echo_config_from_hf(hf, where)
    hf_tok = _read_tokenizer(src)
    chat = source_chat(src)
    ends = _end_ids(src, hf)
    tok_json = None
    if not any(hf_tok.token_to_id(t) is None for t in SPECIAL_TOKENS):
        tok_json = _run_tokenizer_json(src / "tokenizer.json", hf_tok.token_to_id(BOS))
    return write_import(ImportSource(
        path=src, where=where, model_type=hf["model_type"], cfg=cfg, tokenizer=hf_tok,
        tensors=_read_hf_tensors(src),
        has_o_bias=bool(hf.get("attention_bias")) and hf["model_type"] != "qwen2",
        bos=_source_bos(src, hf, hf_tok), chat=chat,
        # a chat model by its metadata: a chat template, and generation does not end at its
        # BOS (an Echo base model's export ends documents with <|bos|>)
        instruct=chat is not None and hf.get("bos_token_id") not in ends,
        end_tokens=tuple(t for i in ends if isinstance(i, int)
                         and (t := hf_tok.id_to_token(i)) is not None),
        tokenizer_json=tok_json, info={"format": "hf", "architectures": hf.get("architectures")},
    ), run_dir, chat_format, log)


def _run_tokenizer_json(path: Path, bos: int) -> str:
    """tokenizer.json's text byte for byte, except that the <|bos|> post-processor an Echo
    export adds is taken off again (a run's tokenizer has none): export -> import is bit-exact."""
    text = path.read_bytes().decode("utf-8")  # as it is, \r\n included
    spec = json.loads(text)
    hf = HFTokenizer.from_str(text)
    hf.post_processor = bos_processor(bos)
    if spec.get("post_processor") != json.loads(hf.to_str())["post_processor"]:
        return text
    spec["post_processor"] = None
    return HFTokenizer.from_str(json.dumps(spec)).to_str(pretty=True)


def source_chat(src: Path) -> dict[str, Any] | None:
    """The source's own chat template and end-of-turn token (tokenizer_config.json's eos_token):
    a GGUF export of the imported base model carries them (it knows that format, not Echo's)."""
    tc = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").exists() \
        else {}
    jinja, js = src / "chat_template.jinja", src / "chat_template.json"
    template = (jinja.read_text(encoding="utf-8") if jinja.exists() else
                _read_json(js).get("chat_template") if js.exists() else tc.get("chat_template"))
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    eos = tc.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return {"template": template, "eos_token": eos if isinstance(eos, str) else None} \
        if isinstance(template, str) and template else None
