"""The run directory an import makes: one writer for every source format.

`echolm import hf` (echolm/hf.py) and `echolm import gguf` (echolm/import_gguf.py) each read
their source into an `ImportSource` in Hugging Face's terms: Echo's ModelConfig (translated from
an HF config.json by `echolm.hf.echo_config_from_hf`), tensors under HF's names in fp32, and the
source's own `tokenizers` tokenizer. `write_import` then does the rest the same way for both:
Echo's special tokens added to the tokenizer, embedding rows for them (see echolm/hf.py,
"Foreign tokenizers"), and DIR/tokenizer, DIR/base (finished) and DIR/import.json written
under a temporary name and swapped in once complete (`echolm.outdir.replacing`).

An imported model that ships a chat template Echo can read (`source_format`), whose turns end
with the token its generation ends at (not its BOS), is an instruct (chat) model: import.json
and base/done.json say ``"instruct": true``, and until the run has an sft stage of its own, the
stages that start from or compare with the SFT model (rl, rank, rm, rlhf, dpo, `--stage sft`)
take its base model (`echolm.checkpoint.chat_model_dir`). import.json keeps its own chat
template and end-of-turn token (``source_chat``). The run renders conversations in that format
when Echo can read it off the template (`echolm.chat_format.from_template`; ``--chat-format
auto``, the default) or when asked (``source``: an error if it cannot); ``--chat-format echo``
keeps Echo's own format, as for a base model to be fine-tuned from scratch in Echo's format.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from echolm.atomic import atomic_write_json
from echolm.chat_format import ECHO, ChatFormat, format_dict, from_template
from echolm.config import ModelConfig
from echolm.errors import EchoError
from echolm.model import Transformer
from echolm.outdir import replacing
from echolm.tokenizer import BOS, SPECIAL_TOKENS, Tokenizer, special_tokens

# What an import writes: `--force` replaces a folder only when it holds exactly this (an
# earlier import nothing was added to), so it never deletes anything else.
IMPORT_FILES = frozenset({"import.json", "tokenizer/tokenizer.json", "tokenizer/done.json",
                          "tokenizer/chat_format.json", "base/model.safetensors",
                          "base/config.json", "base/done.json"})
IMPORT_OPTIONAL = frozenset({"tokenizer/chat_format.json"})  # only for a format not Echo's
CHAT_FORMATS = ("auto", "source", "echo")


@dataclass
class ImportSource:
    """A source model read into Hugging Face's terms, ready for `write_import`."""
    path: Path  # the folder or file imported (import.json records it)
    where: str  # what error messages about its config name (config.json, the .gguf file)
    model_type: str  # llama, qwen2, qwen3
    cfg: ModelConfig  # Echo's config for the source's vocabulary
    tokenizer: HFTokenizer  # the source's own tokenizer, nothing added
    tensors: dict[str, torch.Tensor]  # HF names (``model.`` prefix), any float dtype
    has_o_bias: bool  # the source stores o_proj biases (they must be zero)
    bos: int | None  # the source's BOS id: Echo's <|bos|> row copies it
    chat: dict[str, Any] | None  # {"template", "eos_token"}: its own chat format
    # a chat (instruct) model by its metadata: a chat template, and generation does not end at
    # its BOS; `write_import` also requires the template to end assistant turns with that token
    instruct: bool
    tokenizer_json: str | None = None  # written as is when no token is added (byte-exact)
    info: dict[str, Any] = field(default_factory=dict)  # more for import.json
    # every token the source's generation ends at (its eos, a GGUF's eot/eom, the ids of
    # generation_config.json's eos_token_id): besides the end of turn, decoding stops there
    end_tokens: tuple[str, ...] = ()


def add_echo_specials(hf: HFTokenizer) -> list[str]:
    """Add Echo's special tokens `hf` lacks (ids after the last); returns those added."""
    missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
    if missing:
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return missing


def echo_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig, has_o_bias: bool,
                 where: str) -> dict[str, torch.Tensor]:
    """Rename HF tensors to Echo's (fp32) and check them against the model's shapes."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # older checkpoints store RoPE frequencies; Echo recomputes them
        key = name.removeprefix("model.")
        if key.endswith("self_attn.o_proj.bias") and has_o_bias:
            if bool(t.any()):
                raise EchoError(f"{where}: {name} is not zero: Echo's attention has biases on "
                                "q/k/v only (attention_bias with a nonzero o_proj bias)")
            continue
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: the embedding is the head
        out[key] = t.to(torch.float32).contiguous()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    missing = [k for k in shapes if k not in out]
    unexpected = [k for k in out if k not in shapes]
    if missing or unexpected:
        raise EchoError(f"{where}: weights do not match the model's config (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in shapes.items():
        if out[k].shape != shape:
            raise EchoError(f"{where}: {k} has shape {tuple(out[k].shape)}, the config implies "
                            f"{tuple(shape)}")
    return out


def source_format(src: ImportSource) -> ChatFormat:
    """The chat format the source's own template describes, read off it
    (`from_template`), with the source's other end-of-generation tokens as stops (a Qwen model
    ends turns with <|im_end|> and documents with <|endoftext|>); EchoError if it cannot be
    read (no template, a layout Echo does not know, an end of turn that is not one special
    token)."""
    if src.chat is None:
        raise EchoError(f"{src.where}: the model has no chat template")
    bos = src.tokenizer.id_to_token(src.bos) if src.bos is not None else None
    fmt = from_template(src.chat["template"], src.chat.get("eos_token"), bos or "",
                        where=f"{src.where}: chat template")
    specials = special_tokens(src.tokenizer)
    if fmt.end_of_turn not in specials:  # what generation stops at must be one token
        raise EchoError(f"{src.where}: chat template: its end of turn {fmt.end_of_turn!r} is "
                        "not a special token of the file's tokenizer")
    # a stop must never be written by the format itself (a turn's prefix, the BOS)
    written = {bos, fmt.bos, *(part for role in fmt.turns.values() for part in role)}
    stops = tuple(t for t in dict.fromkeys(src.end_tokens)
                  if t in specials and t != fmt.end_of_turn
                  and not any(t in w for w in written if w))
    return replace(fmt, stops=stops)


def choose_format(src: ImportSource, choice: str, log=print) -> tuple[ChatFormat, bool]:
    """The chat format the imported run renders conversations in (`choice`: CHAT_FORMATS),
    and whether the source's own format could be read (an instruct model needs that: a base
    model's template, such as Llama 3.1's or Qwen2.5's, ends turns with a token its
    generation does not end at, so it does not read)."""
    if choice not in CHAT_FORMATS:
        raise EchoError(f"--chat-format must be one of {CHAT_FORMATS}, got {choice!r}")
    try:
        fmt, readable = source_format(src), True
    except EchoError as e:
        if choice == "source":
            raise
        if src.chat is not None and choice == "auto":
            log(f"import: keeping Echo's chat format: {e}")
        fmt, readable = ECHO, False
    if choice == "echo" or fmt.is_echo():
        return ECHO, readable
    return fmt, readable


def write_import(src: ImportSource, run_dir: Path, chat_format: str = "auto",
                 log=print) -> dict[str, Any]:
    """Make `run_dir` (tokenizer + finished base stage + import.json) from `src`, rendering
    chats in `chat_format` (CHAT_FORMATS). The caller has checked `run_dir`
    (`echolm.outdir.check_out` with IMPORT_FILES)."""
    fmt, readable = choose_format(src, chat_format, log)
    instruct = src.instruct and readable
    cfg = src.cfg
    hf_tok = src.tokenizer
    added = add_echo_specials(hf_tok)
    sd = echo_tensors(src.tensors, cfg, src.has_o_bias, src.where)
    src_dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in src.tensors.values()})
    src.tensors.clear()  # the fp32 copies are all that is needed now

    # Echo's special tokens: rows for the new ids (mean of the source's token rows; <|bos|>
    # copies the source's BOS row); ids beyond the source's vocabulary extend the matrices
    src_vocab = cfg.vocab_size
    vocab = hf_tok.get_vocab()
    new_ids = sorted(vocab[t] for t in added)
    old_ids = sorted(i for t, i in vocab.items() if t not in added and i < src_vocab)
    size = max(src_vocab, max(vocab.values()) + 1)
    bos_src = src.bos if BOS in added else None
    if bos_src is not None and not 0 <= bos_src < src_vocab:
        bos_src = None
    grown = list(range(src_vocab, size))
    fill = sorted(set(new_ids) | set(grown))
    for key in ("embed_tokens.weight", "lm_head.weight"):
        if key not in sd or not fill:
            continue
        w = sd[key]
        mean = w[old_ids].mean(0) if old_ids else w.mean(0)
        if size > src_vocab:
            w = torch.cat([w, w.new_zeros(size - src_vocab, w.shape[1])])
        w[fill] = mean
        if bos_src is not None:
            w[vocab[BOS]] = w[bos_src]
        sd[key] = w
    cfg.vocab_size = size
    # checks Echo's special tokens and the format's end-of-turn token
    tok = Tokenizer(HFTokenizer.from_str(hf_tok.to_str()), fmt)

    source = str(src.path.resolve())
    with replacing(run_dir) as tmp:
        (tmp / "tokenizer").mkdir()
        if added or src.tokenizer_json is None:
            tok.save(tmp / "tokenizer")
        else:  # already Echo's chat tokens (e.g. an Echo export): keep the file byte for byte
            (tmp / "tokenizer" / "tokenizer.json").write_bytes(src.tokenizer_json.encode())
            if fmt is not ECHO:
                fmt.save(tmp / "tokenizer")
        base = tmp / "base"
        base.mkdir()
        save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(base / "config.json", vars(cfg))
        n_params = sum(t.numel() for t in sd.values())
        info = {
            "source": source, "model_type": src.model_type, **src.info,
            "source_dtypes": src_dtypes, "instruct": instruct,
            "added_special_tokens": {t: vocab[t] for t in added},
            "vocab_size": {"source": src_vocab, "echo": size},
            "bos_row_from": bos_src, "native_tokenizer": tok.native,
            "source_chat_template": src.chat is not None, "source_chat": src.chat,
            "chat_format": format_dict(fmt),
            "params": n_params, "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(tmp / "import.json", info)
        atomic_write_json(tmp / "tokenizer" / "done.json", {
            "vocab_size": tok.vocab_size, "imported_from": source})
        atomic_write_json(base / "done.json", {
            "imported_from": source, "model_type": src.model_type, "params": n_params,
            "instruct": instruct})
    log(f"import: {src.model_type} {'instruct' if instruct else 'base'} model "
        f"({n_params:,} parameters) from {src.path} -> {run_dir}, chat format {fmt.name}"
        + (f"; added {len(added)} Echo special tokens (vocab {src_vocab} -> {size})"
           if added else ""))
    return info

