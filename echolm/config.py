"""Configuration: dataclasses per section, presets as TOML data, `section.field=value` overrides.

A preset (``echolm/presets/NAME.toml`` or a path to any TOML file) names a whole
configuration; any field can then be overridden from the CLI with ``--set pretrain.lr=0.01``.
Unknown sections, fields or wrongly typed values are user errors, reported with the field name.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import math
import re
import textwrap
import tokenize
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from echolm.errors import EchoError

PRESET_DIR = Path(__file__).parent / "presets"


def _finite(section: str, obj: Any, names: tuple[str, ...], low: float = 0.0,
            strict: bool = False) -> None:
    """Each named field a finite number >= low (> low when strict), else one clear error."""
    for name in names:
        v = getattr(obj, name)
        if not math.isfinite(v) or v < low or (strict and v == low):
            raise EchoError(f"{section}.{name}={v} must be a finite number "
                            f"{'>' if strict else '>='} {low:g}")



@dataclass
class TokenizerConfig:
    """Byte-level BPE trained on the pretraining text."""

    vocab_size: int = 8192  # tokens in the BPE vocabulary, special tokens included
    train_bytes: int = 50_000_000  # how much of the corpus the BPE trainer reads


@dataclass
class ModelConfig:
    """Llama/Qwen3-family decoder; field names follow the HF config where one exists."""

    vocab_size: int = 8192  # set from tokenizer.vocab_size (one source of truth)
    n_layer: int = 4  # transformer blocks
    n_embd: int = 256  # width of the residual stream
    n_head: int = 4  # attention (query) heads
    n_kv_head: int = 2  # key/value heads (grouped-query attention when fewer)
    head_dim: int = 0  # 0: n_embd // n_head
    mlp_hidden: int = 0  # 0: ~8/3 * n_embd rounded up to a multiple of 64 (SwiGLU)
    max_seq_len: int = 1024  # longest context the model is built for (RoPE tables, KV cache)
    rope_theta: float = 10_000.0  # RoPE base frequency
    qk_norm: bool = True  # Qwen3-style per-head RMSNorm on q and k
    attention_bias: bool = False  # biases on q/k/v projections (Qwen2; for imported models)
    tie_embeddings: bool = False  # the output head shares the embedding matrix
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.02  # std of the initial weights (tied embeddings, projections)

    @property
    def d_head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def d_mlp(self) -> int:
        return self.mlp_hidden or -(-(8 * self.n_embd // 3) // 64) * 64

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise EchoError(f"model.{name}={getattr(self, name)} must be positive")
        if self.n_head % self.n_kv_head:
            raise EchoError(
                f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.n_kv_head}"
            )
        if self.d_head % 2:
            raise EchoError(f"model head_dim={self.d_head} must be even (RoPE rotates pairs)")


@dataclass
class DataConfig:
    """What the stages read: pretraining text, SFT conversations, task families."""

    # "builtin" (the offline corpus), or paths to .txt / .jsonl / .parquet files or folders,
    # or "hf:NAME[:CONFIG][:SPLIT]" when `datasets` is installed.
    pretrain: list[str] = field(default_factory=lambda: ["builtin"])
    val_fraction: float = 0.01  # held out from user data (the builtin corpus has its own split)
    # SFT conversations: "builtin" (a mixture made from the task families below), chat JSONL
    # files/folders ({"messages": [...]}), or "hf:NAME[:CONFIG][:SPLIT]".
    sft: list[str] = field(default_factory=lambda: ["builtin"])
    # Task families ("name" or "name:option=value,...") for the built-in SFT mixture and for
    # evaluation of every stage; see echolm/tasks.
    tasks: list[str] = field(default_factory=lambda: [
        "arithmetic:difficulty=2", "spelling", "letter_count", "identity"])
    task_examples: int = 2000  # training conversations per task family in the mixture
    # open-ended requests answered with real corpus sentences (echolm/data/open_chat.py), added
    # to the built-in mixture so the model has something to say to "Write a line about the sea."
    open_examples: int = 0
    eval_problems: int = 200  # held-out problems per task family for evaluation
    humaneval: int = 164  # HumanEval problems in `echolm eval` (0 = skip)
    gold_prompts: int = 100  # held-out RLHF prompts judged by the simulated annotator


@dataclass
class TrainConfig:
    """One training stage's loop settings (shared by pretraining, SFT and later stages)."""

    seq_len: int = 256  # tokens per training row
    micro_batch: int = 16  # sequences per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step (per process)
    max_steps: int = 1000  # the planned steps (a time budget may fit fewer)
    max_minutes: float = 0.0  # 0 = no time limit; otherwise stop (and checkpoint) after this
    lr_matrix: float = 0.02  # Muon, 2-D hidden matrices
    lr_embed: float = 0.01  # AdamW, token embedding
    lr_head: float = 0.004  # AdamW, output head
    lr_scalar: float = 0.01  # AdamW, norm weights
    weight_decay: float = 0.0  # decoupled weight decay (AdamW) on the matrices
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW's (beta1, beta2)
    optimizer: str = "muon"  # "muon" (Muon + AdamW) or "adamw" (AdamW for everything)
    # Muon's Newton-Schulz dtype: auto = bf16 where bf16 matmul is native (GPUs, AMX,
    # AVX512-BF16), else fp32 (bf16 is ~40x slower than fp32 on an AVX2-only CPU)
    muon_dtype: str = "auto"
    warmup_steps: int = 20  # linear learning-rate warmup
    warmdown_frac: float = 0.3  # last fraction of steps decays linearly to final_lr_frac
    # learning rate at the end of the warmdown, as a fraction of the peak
    final_lr_frac: float = 0.05
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    dtype: str = "auto"  # auto | fp32 | bf16 (autocast); auto = bf16 where it is faster
    compile: bool = False  # torch.compile the model (slower to start; faster steps on GPUs)
    # under torchrun: "ddp" (every process holds the whole model) or "fsdp" (FSDP2: parameters,
    # gradients and optimizer state sharded; checkpoints through torch.distributed.checkpoint)
    parallel: str = "ddp"
    # experiment trackers beside metrics.jsonl: "tensorboard" (DIR/tb/<stage>/), "wandb"
    trackers: list[str] = field(default_factory=list)
    eval_every: int = 100  # steps between periodic evaluations (0 = only at the end)
    eval_tokens: int = 65_536  # held-out tokens for bits/byte (pretraining)
    sample_every: int = 0  # 0 = only at the end
    ckpt_every: int = 100  # steps between training checkpoints (a killed run resumes from the last)
    seed: int = 1337  # seeds the data order and sampling (exact resume)

    def validate(self, section: str) -> None:
        for name in ("seq_len", "micro_batch", "grad_accum", "ckpt_every"):
            if getattr(self, name) <= 0:
                raise EchoError(f"{section}.{name}={getattr(self, name)} must be positive")
        for name in ("max_steps", "warmup_steps", "eval_every", "eval_tokens", "sample_every"):
            if getattr(self, name) < 0:
                raise EchoError(f"{section}.{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.warmdown_frac <= 1 or not 0 <= self.final_lr_frac <= 1:
            raise EchoError(f"{section}.warmdown_frac and final_lr_frac must be in [0, 1]")
        _finite(section, self, ("lr_matrix", "lr_embed", "lr_head", "lr_scalar"), strict=True)
        _finite(section, self, ("weight_decay", "grad_clip", "max_minutes"))
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise EchoError(f"{section}.adam_betas={list(self.adam_betas)} must be in [0, 1)")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise EchoError(f"{section}.dtype='{self.dtype}': expected auto, fp32 or bf16")
        if self.muon_dtype not in ("auto", "fp32", "bf16"):
            raise EchoError(f"{section}.muon_dtype='{self.muon_dtype}': expected auto, fp32 "
                            "or bf16")
        if self.optimizer not in ("muon", "adamw"):
            raise EchoError(f"{section}.optimizer='{self.optimizer}': expected muon or adamw")
        if self.parallel not in ("ddp", "fsdp"):
            raise EchoError(f"{section}.parallel='{self.parallel}': expected ddp or fsdp")
        for name in self.trackers:
            if name not in ("tensorboard", "wandb"):
                raise EchoError(f"{section}.trackers: unknown tracker '{name}' "
                                "(expected tensorboard or wandb)")


@dataclass
class GRPOConfig:
    """Reinforcement learning on checkable tasks: GRPO and the variants people ask for."""

    # task specs to train on ("spelling:max_len=7"); rewards come from their verifiers
    tasks: list[str] = field(default_factory=lambda: ["arithmetic:difficulty=2"])
    init: str = "sft"  # start from "sft", or "base" (R1-Zero style, with format_reward)
    prompts_per_step: int = 16  # problems per step (each answered group_size times)
    group_size: int = 8  # samples per prompt; advantages are relative within a group
    max_tokens: int = 128  # longest answer sampled
    temperature: float = 1.0  # sampling temperature of the rollouts and pass@k
    scale_by_std: bool = True  # False = Dr. GRPO (advantage = reward - group mean)
    aggregation: str = "token"  # token (DAPO) | sequence (GRPO) | constant (Dr. GRPO)
    clip_low: float = 0.2  # PPO ratio clip below 1 (1 - clip_low)
    clip_high: float = 0.28  # > clip_low = DAPO's clip-higher
    kl_beta: float = 0.0  # > 0: k3 KL penalty to the frozen starting policy
    epochs: int = 1  # optimisation passes over each batch of samples (importance ratios)
    minibatches: int = 1  # optimizer steps per pass
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal, refill (DAPO)
    max_refills: int = 3  # dynamic sampling: extra sampling rounds to refill a step
    overlong_buffer: int = 0  # > 0: DAPO soft overlong penalty over the last N tokens
    format_reward: float = 0.0  # bonus for an "Answer:" line and a finished turn
    eval_problems: int = 100  # held-out problems per task for pass@k
    eval_samples: int = 16  # samples per problem (largest k)

    def validate(self) -> None:
        if not self.tasks:
            raise EchoError("grpo.tasks is empty: name at least one task (e.g. \"spelling\")")
        from echolm.tasks.spec import task_from_spec  # the tasks package imports no config

        for spec in self.tasks:
            try:
                task_from_spec(spec)
            except (EchoError, TypeError, ValueError) as e:
                raise EchoError(f"grpo.tasks: '{spec}': {e}") from None
        if self.init not in ("sft", "base"):
            raise EchoError(f"grpo.init must be 'sft' or 'base', got {self.init!r}")
        if self.aggregation not in ("token", "sequence", "constant"):
            raise EchoError(f"grpo.aggregation must be token, sequence or constant, "
                            f"got {self.aggregation!r}")
        for name in ("prompts_per_step", "group_size", "max_tokens", "epochs", "minibatches",
                     "eval_problems", "eval_samples"):
            if getattr(self, name) < 1:
                raise EchoError(f"grpo.{name}={getattr(self, name)} must be >= 1")
        if self.group_size < 2:
            raise EchoError(f"grpo.group_size={self.group_size} must be >= 2: advantages "
                            "compare the samples of one prompt")
        for name in ("max_refills", "overlong_buffer"):
            if getattr(self, name) < 0:
                raise EchoError(f"grpo.{name}={getattr(self, name)} must be >= 0")
        if self.overlong_buffer > self.max_tokens:
            raise EchoError(f"grpo.overlong_buffer={self.overlong_buffer} must be <= "
                            f"grpo.max_tokens={self.max_tokens}")
        _finite("grpo", self, ("temperature",), strict=True)
        _finite("grpo", self, ("clip_low", "clip_high", "kl_beta", "format_reward"))


@dataclass
class PPOConfig:
    """RLHF: optimise the SFT policy against the reward model, with a KL penalty to SFT."""

    # ppo (value head + GAE, InstructGPT) | rloo | grpo (critic-free) | best (rejection
    # sampling: a likelihood step on the reward model's best of each group, as Llama 2)
    algorithm: str = "ppo"
    prompts_per_step: int = 16  # held-in prompts per step
    samples_per_prompt: int = 1  # ppo: 1; rloo/grpo: >= 2 (the group)
    max_tokens: int = 64  # longest answer sampled
    temperature: float = 1.0  # sampling temperature of rollouts and evaluations
    kl_beta: float = 0.05  # per-token KL penalty to the SFT reference (0 = none)
    unfinished_penalty: float = 1.0  # subtracted when the answer never ends its turn
    normalize_reward: bool = True  # running mean/std of reward-model scores
    gamma: float = 1.0  # GAE discount (ppo)
    lam: float = 0.95  # GAE lambda (ppo)
    clip: float = 0.2  # PPO ratio clip (1 +- clip)
    value_clip: float = 0.2  # value-function clip (ppo)
    vf_coef: float = 0.5  # weight of the value loss (ppo)
    epochs: int = 2  # optimisation passes over each batch of rollouts
    minibatches: int = 2  # optimizer updates per pass
    eval_every: int = 10  # steps between guard evaluations
    eval_prompts: int = 64  # held-out prompts for proxy / gold / KL / win rate
    eval_samples: int = 2  # answers per prompt in those evaluations (gold averaged per prompt)
    final_samples: int = 4  # per prompt in the stage's final, fresh-seed gold measurement
    guard: bool = True  # stop when gold falls while proxy rises; keep the best-by-gold model
    # evaluations in a row of falling gold (with rising proxy) that stop the run
    guard_patience: int = 3
    overopt_steps: int = 0  # > 0: also an unguarded run with kl_beta = 0 for this many steps
    overopt_lr_mult: float = 1.0  # its learning rates x this: drift far within few steps
    train_prompts: int = 2000  # pool of training prompts rollouts are drawn from
    # PPO-ptx (InstructGPT): + ptx_coef x the SFT loss on ptx_rows rows of the SFT mixture per
    # update, so that pleasing the reward model does not unlearn what it cannot check
    ptx_coef: float = 0.0
    ptx_rows: int = 4  # SFT rows per update for the ptx term (also DPO's dpo_ptx_coef)

    def validate(self) -> None:
        if self.algorithm not in ("ppo", "rloo", "grpo", "best"):
            raise EchoError(f"ppo.algorithm must be ppo, rloo, grpo or best, got "
                            f"{self.algorithm!r}")
        if self.algorithm != "ppo" and self.samples_per_prompt < 2:
            raise EchoError(f"ppo.algorithm={self.algorithm} needs ppo.samples_per_prompt >= 2 "
                            f"(got {self.samples_per_prompt}): it compares answers to one prompt")
        for name in ("prompts_per_step", "samples_per_prompt", "max_tokens", "epochs",
                     "minibatches", "eval_every", "eval_prompts", "eval_samples",
                     "final_samples", "guard_patience", "train_prompts", "ptx_rows"):
            if getattr(self, name) < 1:
                raise EchoError(f"ppo.{name}={getattr(self, name)} must be >= 1")
        if self.overopt_steps < 0:
            raise EchoError(f"ppo.overopt_steps={self.overopt_steps} must be >= 0")
        _finite("ppo", self, ("temperature", "overopt_lr_mult"), strict=True)
        _finite("ppo", self, ("kl_beta", "unfinished_penalty", "clip", "value_clip", "vf_coef",
                              "ptx_coef"))
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise EchoError(f"ppo.gamma={self.gamma} and ppo.lam={self.lam} must be in [0, 1]")


@dataclass
class PreferenceConfig:
    """Learning from rankings (DIR/prefs.sqlite): the reward model (`echolm rm`) and DPO
    (`echolm dpo`). Both split the rankings into train / held-out by prompt, the same way."""

    annotator: str = ""  # only this annotator's rankings ("" = everyone's)
    # `echolm run` ranks with the simulated annotator (people use `echolm rank` or the page)
    rank_prompts: int = 300  # prompts whose sampled answers get ranked
    rank_minutes: float = 0.0  # > 0: rank as many of them as fit this budget (0 = all)
    rank_k: int = 4  # answers per prompt (InstructGPT: 4 to 9)
    # sampling temperatures of the K answers `echolm run` ranks (answer j at [j % len]):
    # mixing in a higher one makes answers differ more (some fluent, some garbled)
    rank_temperatures: list[float] = field(default_factory=lambda: [1.0])
    annotator_noise: float = 0.1  # the simulated annotator's temperature (0 = always gold)
    heldout_fraction: float = 0.1  # of distinct prompts, never trained on by rm or dpo
    rm_loss: str = "bt"  # bt: Bradley-Terry on every pair a ranking implies | pl: Plackett-Luce
    margin: float = 0.0  # BT: ask for r_chosen - r_rejected >= margin (Llama 2 style)
    center_coef: float = 0.01  # reward centering: coef * (r_c + r_r)^2 (Eisenstein et al.)
    dpo_beta: float = 0.1  # strength of the implicit KL to the reference (DPO's beta)
    dpo_loss: str = "sigmoid"  # sigmoid (DPO) | ipo (IPO, on per-token mean log-probs)
    # passes over the training rankings / pairs, capping rm.max_steps / dpo.max_steps (0 = no
    # cap). A reward model trained for many epochs on a few hundred rankings memorises them
    # and grows over-confident (InstructGPT trained its reward model for a single epoch).
    rm_epochs: float = 2.0
    dpo_epochs: float = 2.0  # the same cap for DPO's passes over its pairs
    # + dpo_ptx_coef x the SFT loss on ppo.ptx_rows rows of the SFT mixture per micro-batch
    # (as RLHF's ptx_coef): keeps what the rankings cannot check, like right sums
    dpo_ptx_coef: float = 0.0
    # + dpo_nll_coef x the chosen answers' NLL per token (RPO, Pang et al. 2024)
    dpo_nll_coef: float = 0.0
    # DPO learns only from pairs of answers both sampled at one of these temperatures (the
    # policy's own answers: T=1); [] = every pair. The reward model reads every ranking.
    dpo_temperatures: list[float] = field(default_factory=list)

    def validate(self) -> None:
        if self.rm_loss not in ("bt", "pl"):
            raise EchoError(f"pref.rm_loss='{self.rm_loss}': expected bt or pl")
        if self.dpo_loss not in ("sigmoid", "ipo"):
            raise EchoError(f"pref.dpo_loss='{self.dpo_loss}': expected sigmoid or ipo")
        if not 0 <= self.heldout_fraction < 1:
            raise EchoError(f"pref.heldout_fraction={self.heldout_fraction} must be in [0, 1)")
        if self.dpo_beta <= 0:
            raise EchoError(f"pref.dpo_beta={self.dpo_beta} must be positive")
        if self.dpo_nll_coef < 0:
            raise EchoError(f"pref.dpo_nll_coef={self.dpo_nll_coef} must be >= 0")
        if self.dpo_ptx_coef < 0:
            raise EchoError(f"pref.dpo_ptx_coef={self.dpo_ptx_coef} must be >= 0")
        if self.center_coef < 0 or self.margin < 0:
            raise EchoError("pref.center_coef and pref.margin must be >= 0")
        if self.rm_epochs < 0 or self.dpo_epochs < 0:
            raise EchoError("pref.rm_epochs and pref.dpo_epochs must be >= 0 (0 = no cap)")
        if not self.rank_temperatures or min(self.rank_temperatures) <= 0:
            raise EchoError(f"pref.rank_temperatures={self.rank_temperatures} must be "
                            "positive numbers, at least one (the K answers must differ)")


def _rm_train() -> TrainConfig:
    return TrainConfig(seq_len=256, micro_batch=8, max_steps=200, lr_matrix=0.004,
                       lr_embed=0.004, lr_head=0.004, lr_scalar=0.004, warmup_steps=10,
                       warmdown_frac=0.5, eval_every=25, ckpt_every=50)


def _dpo_train() -> TrainConfig:
    return TrainConfig(seq_len=256, micro_batch=8, max_steps=200, lr_matrix=0.002,
                       lr_embed=0.002, lr_head=0.001, lr_scalar=0.001, warmup_steps=10,
                       warmdown_frac=0.5, eval_every=25, ckpt_every=50)


# TrainConfig fields a stage does not read, and why: refused in presets and --set, left out
# of config.json and `echolm presets`, so that every setting shown is one that acts.
_ROLLOUT = ("one step is one batch of rollouts: its size is {sec}.prompts_per_step x "
            "{sec}.{k}, answers up to {sec}.max_tokens long")
UNREAD_FIELDS: dict[str, dict[str, str]] = {
    "sft": {"eval_tokens": "SFT evaluates on the task families (data.eval_problems)",
            "sample_every": "SFT shows no text samples while training"},
    "rm": {"eval_tokens": "the reward model evaluates on held-out rankings",
           "sample_every": "the reward model generates nothing"},
    "dpo": {"eval_tokens": "DPO evaluates on held-out pairs and the gold win rate",
            "sample_every": "DPO shows no text samples while training"},
    **{stage: {**{f: _ROLLOUT.format(sec=sec, k=k) for f in ("seq_len", "micro_batch",
                                                             "grad_accum")},
               "eval_every": ("RL measures pass@k before and after only" if stage == "rl"
                              else "the guard evaluates every ppo.eval_every steps"),
               "eval_tokens": f"{stage} evaluates by sampling answers ({sec}.eval_*)",
               "sample_every": f"{stage} samples answers every step"}
       for stage, sec, k in (("rl", "grpo", "group_size"),
                             ("rlhf", "ppo", "samples_per_prompt"))},
}


@dataclass
class Config:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sft: TrainConfig = field(default_factory=TrainConfig)
    rl: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rlhf: TrainConfig = field(default_factory=TrainConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rm: TrainConfig = field(default_factory=_rm_train)  # reward model; micro_batch = rankings
    dpo: TrainConfig = field(default_factory=_dpo_train)  # micro_batch = preference pairs
    pref: PreferenceConfig = field(default_factory=PreferenceConfig)
    preset: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Every section's fields, less those its stage does not read (UNREAD_FIELDS)."""
        d = asdict(self)
        for section, unread in UNREAD_FIELDS.items():
            d[section] = {k: v for k, v in d[section].items() if k not in unread}
        return d


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert a TOML value to the dataclass field's type; name the field on failure."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (inner,) = typing.get_args(typ)
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, inner, where) for v in items]
    elif origin is tuple:
        args = typing.get_args(typ)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, t, where) for v, t in zip(value, args, strict=True))
    elif origin in (typing.Union, types.UnionType):
        for t in typing.get_args(typ):
            try:
                return _coerce(value, t, where)
            except EchoError:
                pass
    type_name = getattr(typ, "__name__", str(typ))
    raise EchoError(f"{where}: expected {type_name}, got {value!r}")


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    sections = {f.name for f in dataclasses.fields(cfg)
                if dataclasses.is_dataclass(getattr(cfg, f.name))}
    if section not in sections:
        known = ", ".join(sorted(sections))
        raise EchoError(f"{where}: unknown section '{section}' (known: {known})")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key in UNREAD_FIELDS.get(section, {}):
        raise EchoError(f"{where}: {section}.{key} is not read by the {section} stage: "
                        f"{UNREAD_FIELDS[section][key]}")
    if key not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(obj))
        raise EchoError(f"{where}: unknown field '{section}.{key}' (known: {known})")
    setattr(obj, key, _coerce(value, hints[key], f"{where}: {section}.{key}"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_config(preset: str = "micro", overrides: list[str] | None = None) -> Config:
    """Build a Config from a preset name (or TOML path) plus ``section.field=value`` overrides."""
    path = Path(preset)
    if not (path.suffix == ".toml" and path.exists()):
        path = PRESET_DIR / f"{preset}.toml"
        if not path.exists():
            raise EchoError(f"unknown preset '{preset}' (known: {', '.join(list_presets())})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EchoError(f"{path}: invalid TOML: {e}") from None
    cfg = Config(preset=path.stem)
    for section, values in data.items():
        if not isinstance(values, dict):
            raise EchoError(f"{path}: top-level key '{section}' must be a [section]")
        for key, value in values.items():
            _apply(cfg, section, key, value, str(path))
    apply_overrides(cfg, overrides or [])
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise EchoError(f"override '{item}': expected section.field=value")
        lhs, rhs = item.split("=", 1)
        section, key = lhs.strip().split(".", 1)
        try:  # TOML value syntax first (numbers, bools, lists, quoted strings) ...
            value = tomllib.loads(f"v = {rhs}")["v"]
        except tomllib.TOMLDecodeError:  # ... else a bare string
            value = rhs
        _apply(cfg, section, key, value, f"override '{item}'")
    cfg.model.vocab_size = cfg.tokenizer.vocab_size  # one source of truth for the vocabulary
    cfg.model.validate()
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if isinstance(section, TrainConfig):
            section.validate(f.name)
    cfg.grpo.validate()
    cfg.ppo.validate()
    cfg.pref.validate()


# fields that older runs' config.json may hold and nothing reads any more (nor do the
# UNREAD_FIELDS, which older runs saved too)
RETIRED_FIELDS = frozenset({"log_every"})


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config saved with ``to_dict`` (e.g. a run directory's config.json)."""
    cfg = Config(preset=d.get("preset", ""))
    for section, values in d.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if key not in RETIRED_FIELDS and key not in UNREAD_FIELDS.get(section, {}):
                    _apply(cfg, section, key, value, "saved config")
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's field -> its one-line doc: the comment after the field, with any
    comment lines right above it in front (as the fields are documented in this file)."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT}
    docs: dict[str, str] = {}
    above: list[str] = []
    for i, line in enumerate(src.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(comments[i])
            continue
        m = re.match(r"    (\w+): [^=]+=", line)
        if m:
            parts = above + ([comments[i]] if i in comments else [])
            if parts:
                docs[m.group(1)] = " ".join(parts)
        above = []
    return docs


def settings_help(sections: list[str]) -> str:
    """`--help` text for the settings of `sections`: each field's default and one-line doc."""
    cfg = Config()
    lines = ["settings (--set SECTION.FIELD=VALUE; a preset's values: echolm presets NAME):"]
    for name in sections:
        section = getattr(cfg, name)
        docs = field_docs(type(section))
        head = SECTION_DOCS.get(name) or " ".join((type(section).__doc__ or "").split())
        lines += ["", f"  [{name}] {head}"]
        for key, value in cfg.to_dict()[name].items():
            lines.append(f"    {name}.{key} = {_toml_value(value)}  {docs.get(key, '')}".rstrip())
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, tuple):
        v = list(v)
    return json.dumps(v)  # JSON's numbers, strings, booleans and lists are TOML's too


# what a TrainConfig section drives (the class's docstring says it for the others)
SECTION_DOCS = {
    "pretrain": "pretraining: one step = one optimizer update on micro_batch x grad_accum rows",
    "sft": "supervised fine-tuning: one step = one optimizer update on packed chat rows",
    "rl": "RL on checkable tasks, its loop and optimizer (the rollouts: [grpo]); one step = "
          "one batch of rollouts",
    "rlhf": "RLHF, its loop and optimizer (the rollouts: [ppo]); one step = one batch of "
            "rollouts",
    "rm": "the reward model: one step = one optimizer update on micro_batch rankings",
    "dpo": "DPO: one step = one optimizer update on micro_batch preference pairs",
}


def to_toml(cfg: Config) -> str:
    """The whole configuration as a preset file, every field with its one-line doc."""
    out = [f"# preset {cfg.preset or '(none)'}: every field, with what it does"]
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        docs = field_docs(type(section))
        head = SECTION_DOCS.get(f.name) or " ".join((type(section).__doc__ or "").split())
        out += ["", f"[{f.name}]" + (f"  # {head}" if head else "")]
        for key, value in cfg.to_dict()[f.name].items():
            doc = docs.get(key, "")
            out.append(f"{key} = {_toml_value(value)}" + (f"  # {doc}" if doc else ""))
    return "\n".join(out) + "\n"
