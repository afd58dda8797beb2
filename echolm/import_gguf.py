"""`echolm import gguf FILE --out DIR`: a llama.cpp GGUF model file (llama, qwen2, qwen3 archs)
made into a run directory, as `echolm import hf` makes one from a Hugging Face folder.

Weights. The file is read with the `gguf` package (llama.cpp's own reader) and every tensor is
de-quantised to fp32 by `gguf.quants.dequantize` (F32, F16, BF16, Q4_0, Q4_1, Q5_x, Q8_0, the
K-quants: whatever that package supports; no format is written by hand here, and one it lacks
is refused naming the tensor). Tensors get Hugging Face's names back (the inverse of
`echolm.export_gguf`'s table), and a ``llama`` file's q/k rows go back from Meta's interleaved
RoPE pairs to HF's half-split layout (llama.cpp's converter permuted them; qwen2/qwen3 files use
NEOX RoPE and are stored as HF has them). The metadata becomes an HF config.json and goes
through `echolm.hf.echo_config_from_hf`, so the same refusals apply; then
`echolm.import_run.write_import`, the writer `import hf` uses, adds Echo's special tokens and
writes the run directory. One implementation of an import, two readers.

Tokenizer. Rebuilt from the metadata as `tokenizers`' byte-level BPE: the tokens and merges as
stored (``tokenizer.ggml.model`` must be ``gpt2``; SentencePiece files are refused), control
tokens as special added tokens, user-defined ones as plain added tokens, and the split llama.cpp
applies for the file's ``tokenizer.ggml.pre`` (`PRE_TOKENIZERS`): ``gpt-2`` (GPT-2's regex),
``smollm`` (every digit alone, then GPT-2's regex), ``qwen2`` and ``deepseek-r1-qwen`` (Qwen2's),
``llama-bpe`` (Llama 3's, whole words first as llama.cpp's ``ignore_merges``). Any other name is
refused: the split decides the ids, and a guessed one would feed the model pieces it never saw.

Chat. The file's ``tokenizer.chat_template`` and end-of-turn token (``eot_token_id``, else
``eos_token_id``) are kept in import.json (``source_chat``); the eos, eot and eom tokens all
stop decoding (`ImportSource.end_tokens`). A file with a chat template whose end of generation
is not its BOS, and whose template ends assistant turns with that token, is an instruct model
(``"instruct": true``); an Echo base model's export ends documents with <|bos|>, and is not.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from echolm.errors import EchoError
from echolm.export_gguf import (
    GGUF_LAYER_NAMES,
    GGUF_NAMES,
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    TOKEN_CONTROL,
    TOKEN_USER_DEFINED,
    llama_unpermute,
)
from echolm.hf import echo_config_from_hf
from echolm.import_run import IMPORT_FILES, IMPORT_OPTIONAL, ImportSource, write_import
from echolm.outdir import check_out

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
# llama.cpp's pre-tokenizer name -> the split it applies before byte-level BPE
PRE_TOKENIZERS = {"gpt-2": "gpt-2", "smollm": "digits", "qwen2": QWEN2_PATTERN,
                  "deepseek-r1-qwen": QWEN2_PATTERN, "llama-bpe": LLAMA3_PATTERN}
_MISSING = object()


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    split = PRE_TOKENIZERS[pre]
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "gpt-2":
        return gpt2
    if split == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


class _File:
    """A GGUF file's metadata, read with the `gguf` package; errors name the file and key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise EchoError(f"{path}: not a file (expected a .gguf model file)")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise EchoError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises many types for a cut or damaged file
            msg = " ".join(str(e).split())[:200]
            raise EchoError(f"{path}: unreadable or truncated GGUF file ({msg})") from None

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise EchoError(f"{self.path}: {key} is missing from its metadata")
            return default
        return field.contents()

    def count(self, key: str, default: Any = _MISSING) -> int:
        v = self.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise EchoError(f"{self.path}: {key} must be a positive integer, got {v!r}")
        return v


def _f32(v: float) -> float:
    """A float the file stores as f32, as the shortest decimal that is that f32 (1e-5, not
    9.99999974e-06): the value the exporter was given, so export -> import round-trips."""
    return float(str(np.float32(v)))


def _hf_config(f: _File, arch: str, names: set[str], n_vocab: int) -> dict[str, Any]:
    """The metadata as a Hugging Face config.json (what `echo_config_from_hf` reads)."""
    def key(name: str, default: Any = _MISSING) -> Any:
        return f.get(f"{arch}.{name}", default)

    if key("expert_count", 0):
        raise EchoError(f"{f.path}: {arch}.expert_count={key('expert_count')}: mixture-of-"
                        "experts models are not supported (Echo's MLP is dense)")
    scaling = key("rope.scaling.type", "none")
    if scaling != "none":
        raise EchoError(f"{f.path}: {arch}.rope.scaling.type={scaling!r} is not supported: "
                        "Echo's model implements plain RoPE only")
    n_embd = f.count(f"{arch}.embedding_length")
    n_head = f.count(f"{arch}.attention.head_count")
    head_dim = f.count(f"{arch}.attention.key_length", n_embd // n_head or 1)
    for other in ("attention.value_length", "rope.dimension_count"):
        if key(other, head_dim) != head_dim:
            raise EchoError(f"{f.path}: {arch}.{other}={key(other)} differs from the head size "
                            f"{head_dim}: not supported (Echo's heads rotate all their dims)")
    return {
        "model_type": arch, "architectures": [ARCHITECTURES[arch]], "vocab_size": n_vocab,
        "hidden_size": n_embd, "intermediate_size": f.count(f"{arch}.feed_forward_length"),
        "num_hidden_layers": f.count(f"{arch}.block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": f.count(f"{arch}.attention.head_count_kv", n_head),
        "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": f.count(f"{arch}.context_length", 2048),
        "rope_theta": _f32(key("rope.freq_base", 10_000.0)),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names}


def _tensors(f: _File, arch: str, n_head: int, n_kv: int) -> dict[str, torch.Tensor]:
    """Every tensor de-quantised to fp32 under its Hugging Face name."""
    top = {v: ("" if k == "lm_head.weight" else "model.") + k for k, v in GGUF_NAMES.items()}
    layer = {v: k for k, v in GGUF_LAYER_NAMES.items()}
    out = {}
    for t in f.reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        if t.name in top:
            name = top[t.name]
        elif m and m[2] in layer:
            name = f"model.layers.{m[1]}.{layer[m[2]]}.{m[3]}"
        else:
            raise EchoError(f"{f.path}: tensor {t.name} has no place in Echo's model (it "
                            f"imports plain {', '.join(ARCHITECTURES)} transformers)")
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise EchoError(f"{f.path}: tensor {t.name} is stored as {t.tensor_type.name}, "
                            "which the gguf package cannot de-quantise; re-quantise the file "
                            "(llama-quantize) to a common type such as Q8_0") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGML lists dims inner first
        w = torch.from_numpy(np.array(a, dtype=np.float32).reshape(shape))  # a copy: no mmap
        if arch == "llama" and m and m[2] in ("attn_q", "attn_k"):
            w = llama_unpermute(w, n_head if m[2] == "attn_q" else n_kv)
        out[name] = w
    return out


def _tokenizer(f: _File) -> tuple[HFTokenizer, list[str], str]:
    """The file's tokenizer as `tokenizers` byte-level BPE; (tokenizer, tokens, pre name)."""
    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise EchoError(f"{f.path}: tokenizer.ggml.model={kind!r} is not supported: Echo imports "
                        "byte-level BPE tokenizers ('gpt2'), not SentencePiece ('llama') ones")
    pre = f.get("tokenizer.ggml.pre", None)
    if pre not in PRE_TOKENIZERS:
        raise EchoError(f"{f.path}: tokenizer.ggml.pre={pre!r} is a pre-tokenizer Echo does not "
                        f"know (known: {', '.join(PRE_TOKENIZERS)}); it decides how text is cut "
                        "into tokens, so Echo will not guess it")
    tokens = f.get("tokenizer.ggml.tokens")
    types = f.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(types) != len(tokens):
        dup = next((t for t, n in Counter(tokens).items() if n > 1), None)
        raise EchoError(f"{f.path}: tokenizer.ggml.tokens lists {dup!r} twice, or token_type "
                        "has another length; the vocabulary is ambiguous")
    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges", [])]
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                    ignore_merges=pre == "llama-bpe"))
    except Exception as e:  # the library raises plain Exceptions (e.g. a merge of unknown tokens)
        msg = " ".join(str(e).split())[:200]
        raise EchoError(f"{f.path}: tokenizer.ggml.merges does not fit the tokens "
                        f"({msg})") from None
    hf.pre_tokenizer = _pre_tokenizer(pre)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_USER_DEFINED])
    return hf, tokens, pre


def import_gguf(file: Path, run_dir: Path, force: bool = False, chat_format: str = "auto",
                log=print) -> dict[str, Any]:
    """Make `run_dir` (tokenizer + finished base stage) from a GGUF model file."""
    f = _File(file)
    check_out(run_dir, force, "import", IMPORT_FILES, file, "the GGUF file being imported",
              IMPORT_OPTIONAL)
    arch = f.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise EchoError(f"{file}: general.architecture={arch!r} is not supported (Echo imports "
                        f"{', '.join(ARCHITECTURES)})")
    names = {t.name: t for t in f.reader.tensors}
    if "token_embd.weight" not in names:
        raise EchoError(f"{file}: has no token_embd.weight tensor")
    n_vocab = int(names["token_embd.weight"].shape[-1])  # GGML order: (n_embd, n_vocab)
    hf = _hf_config(f, arch, set(names), n_vocab)
    cfg = echo_config_from_hf(hf, str(file))
    hf_tok, tokens, pre = _tokenizer(f)
    if len(tokens) > n_vocab:
        raise EchoError(f"{file}: tokenizer.ggml.tokens has {len(tokens)} tokens, more than "
                        f"token_embd.weight's {n_vocab} rows")

    def token_id(key: str) -> int | None:
        i = f.get(f"tokenizer.ggml.{key}_token_id", None)
        return i if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos, eot = token_id("bos"), token_id("eos"), token_id("eot")
    end = eot if eot is not None else eos
    # what llama.cpp ends generation at (its end-of-generation ids): eos, eot, eom
    ends = tuple(tokens[i] for i in (eos, eot, token_id("eom")) if i is not None)
    template = f.get("tokenizer.chat_template", None)
    chat = ({"template": template, "eos_token": tokens[end] if end is not None else None}
            if isinstance(template, str) and template else None)
    types = Counter(t.tensor_type.name for t in f.reader.tensors)
    tensors = _tensors(f, arch, hf["num_attention_heads"], hf["num_key_value_heads"])
    return write_import(ImportSource(
        path=file, where=str(file), model_type=arch, cfg=cfg, tokenizer=hf_tok, tensors=tensors,
        has_o_bias="blk.0.attn_output.bias" in names, bos=bos, chat=chat,
        instruct=chat is not None and eos != bos, end_tokens=ends,
        info={"format": "gguf", "architectures": hf["architectures"],
              "name": f.get("general.name", None), "pre_tokenizer": pre,
              "tensor_types": dict(sorted(types.items()))}), run_dir, chat_format, log)
