"""Configuration: one dataclass per section, each field documented by its comment.

Sections: `tokenizer`, `model`, `data`, and one per stage, holding exactly what that stage
reads: `pretrain`, `sft`, `rl`, `rank`, `rm`, `rlhf`, `dpo`. The training stages share the
loop fields (`LoopConfig`: plan, budget, optimizer, schedule, precision, checkpoints); those
that learn from fixed data add rows per step (`BatchConfig`). Presets, overrides and saved
configs are read by `echolm.settings`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from echolm.config_checks import (
    at_least,
    check_lora,
    check_sources,
    check_task_specs,
    finite,
    fraction,
    numbers,
    one_of,
)
from echolm.errors import EchoError
from echolm.run_config import RunConfig

# the projections LoRA may adapt (`*.lora_targets`): every nn.Linear of a block, by its name
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained on the pretraining text."""

    vocab_size: int = 8192  # tokens in the BPE vocabulary, special tokens included
    train_bytes: int = 50_000_000  # how much of the corpus the BPE trainer reads

    def validate(self) -> None:
        from echolm.tokenizer import SPECIAL_TOKENS  # (no cycle: tokenizer imports no config)

        low = 256 + len(SPECIAL_TOKENS) + 1  # every byte, the special tokens, one merge
        if self.vocab_size < low:
            raise EchoError(f"tokenizer.vocab_size={self.vocab_size} is too small: must be >= "
                            f"{low} (256 bytes + {len(SPECIAL_TOKENS)} special tokens + a merge)")
        at_least("tokenizer", self, ("train_bytes",), 1)


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
        at_least("model", self, ("head_dim", "mlp_hidden"), 0)
        finite("model", self, ("rope_theta", "norm_eps", "init_std"), strict=True)
        if self.n_head % self.n_kv_head:
            raise EchoError(
                f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.n_kv_head}"
            )
        if self.d_head % 2 or not self.d_head:
            raise EchoError(f"model.head_dim={self.d_head} (0: n_embd // n_head) must be even "
                            "and positive (RoPE rotates pairs)")


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
    # the rankings the reward model and DPO learn from: only this annotator's ("" = everyone's)
    rankings_annotator: str = ""
    # share of the ranked prompts held out (never trained on by rm or dpo, the same split)
    rankings_heldout_fraction: float = 0.1

    def validate(self) -> None:
        fraction("data", self, "val_fraction", high_open=True)
        fraction("data", self, "rankings_heldout_fraction", high_open=True)
        at_least("data", self, ("task_examples", "open_examples", "eval_problems",
                                 "humaneval", "gold_prompts"), 0)
        for name in ("pretrain", "sft"):
            check_sources(f"data.{name}", getattr(self, name))
        examples = check_task_specs("data.tasks", self.tasks, self.task_examples)
        if self.sft == ["builtin"] and examples + self.open_examples == 0:
            raise EchoError("data.sft=[\"builtin\"] would hold no conversations: data.tasks "
                            f"{self.tasks} give 0 examples and data.open_examples=0")


@dataclass
class LoopConfig:
    """What every training stage's loop reads: its plan and budget, optimizer, learning-rate
    schedule, precision, processes, trackers and checkpoints."""

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
    # torch.compile the model (slower to start; faster steps on GPUs): pretrain, sft, rm
    compile: bool = False
    # under torchrun: "ddp" (every process holds the whole model) or "fsdp" (FSDP2: parameters,
    # gradients and optimizer state sharded; checkpoints through torch.distributed.checkpoint)
    parallel: str = "ddp"
    # experiment trackers beside metrics.jsonl: "tensorboard" (DIR/tb/<stage>/), "wandb"
    trackers: list[str] = field(default_factory=list)
    ckpt_every: int = 100  # steps between training checkpoints (a killed run resumes from the last)
    seed: int = 1337  # seeds the data order and sampling (exact resume)
    # 0 = full fine-tuning; > 0 = LoRA adapters of this rank (peft's r) on lora_targets, the
    # rest of the model frozen; the stage saves the merged model and the adapter (DIR/<stage>/
    # adapter, peft's format). Post-training stages only (sft, rl, rlhf, dpo)
    lora_rank: int = 0
    lora_alpha: float = 16.0  # LoRA's alpha (peft's lora_alpha): the update is B A x alpha/rank
    lora_dropout: float = 0.0  # dropout on the adapters' input (peft's lora_dropout)
    # the projections that get adapters (peft's target_modules): any of q_proj k_proj v_proj
    # o_proj gate_proj up_proj down_proj
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def validate(self, section: str) -> None:
        if self.compile and section in ("rl", "rlhf", "dpo"):  # rollout.token_logprobs' passes
            raise EchoError(f"{section}.compile=true has no effect in this stage (it scores "
                            "answers through the model's hidden states, which torch.compile "
                            "of the module does not reach); set it false")
        if self.ckpt_every <= 0:
            raise EchoError(f"{section}.ckpt_every={self.ckpt_every} must be positive")
        at_least(section, self, ("max_steps", "warmup_steps"), 0)
        fraction(section, self, "warmdown_frac")
        fraction(section, self, "final_lr_frac")
        if not 0 <= self.seed < 2**32:
            raise EchoError(f"{section}.seed={self.seed} must be a whole number in [0, 2^32)")
        finite(section, self, ("lr_matrix", "lr_embed", "lr_head", "lr_scalar"), strict=True)
        finite(section, self, ("weight_decay", "grad_clip", "max_minutes"))
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise EchoError(f"{section}.adam_betas={list(self.adam_betas)} must be in [0, 1)")
        for name in ("dtype", "muon_dtype"):
            one_of(section, self, name, ("auto", "fp32", "bf16"))
        one_of(section, self, "optimizer", ("muon", "adamw"))
        one_of(section, self, "parallel", ("ddp", "fsdp"))
        if self.parallel == "fsdp" and section != "pretrain":
            raise EchoError(f"{section}.parallel='fsdp': FSDP is implemented for pretraining "
                            "only; expected ddp")
        for name in self.trackers:
            if name not in ("tensorboard", "wandb"):
                raise EchoError(f"{section}.trackers: unknown tracker '{name}' "
                                "(expected tensorboard or wandb)")
        check_lora(section, self, LORA_TARGETS,
                   supported=section not in ("pretrain", "rm"))


@dataclass
class BatchConfig(LoopConfig):
    """A loop over fixed training data: rows of seq_len tokens, micro_batch x grad_accum of
    them (per process) per optimizer update."""

    seq_len: int = 256  # tokens per training row
    micro_batch: int = 16  # rows per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step (per process)
    eval_every: int = 100  # steps between periodic evaluations (0 = only at the end)

    def validate(self, section: str) -> None:
        super().validate(section)
        for name in ("seq_len", "micro_batch", "grad_accum"):
            if getattr(self, name) <= 0:
                raise EchoError(f"{section}.{name}={getattr(self, name)} must be positive")
        at_least(section, self, ("eval_every",), 0)


@dataclass
class PretrainConfig(BatchConfig):
    """Pretraining: one step = one optimizer update on micro_batch x grad_accum rows of text
    per process."""

    eval_tokens: int = 65_536  # held-out tokens for bits/byte
    sample_every: int = 0  # steps between text samples in the log (0 = only at the end)

    def validate(self, section: str = "pretrain") -> None:
        super().validate(section)
        at_least(section, self, ("eval_tokens", "sample_every"), 0)


@dataclass
class SFTConfig(BatchConfig):
    """Supervised fine-tuning: one step = one optimizer update on packed chat rows (loss on
    the assistant's tokens); evaluated on the task families (data.eval_problems)."""

    # the task families whose worked solutions the built-in mixture holds, and which SFT
    # evaluates before and after; empty = data.tasks. An open instruct model is taught only
    # what it lacks (smollm2-cpu: letter counting and spelling), not Echo's identity answers
    tasks: list[str] = field(default_factory=list)

    def validate(self, section: str = "sft") -> None:
        super().validate(section)
        if self.tasks:
            check_task_specs(f"{section}.tasks", self.tasks)


@dataclass
class RLConfig(LoopConfig):
    """RL on checkable tasks: GRPO and the variants people ask for. One step = one batch of
    prompts_per_step x group_size rollouts, scored by the tasks' verifiers and learned from
    in epochs x minibatches updates."""

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
    tis_cap: float = 2.0  # truncated importance sampling: min(p_train / p_sampler, cap); 0 off
    epochs: int = 1  # optimisation passes over each batch of samples (importance ratios)
    minibatches: int = 1  # optimizer steps per pass
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal, refill (DAPO)
    max_refills: int = 3  # dynamic sampling: extra sampling rounds to refill a step
    overlong_buffer: int = 0  # > 0: DAPO soft overlong penalty over the last N tokens
    format_reward: float = 0.0  # bonus for an "Answer:" line and a finished turn
    eval_problems: int = 100  # held-out problems per task for pass@k
    eval_samples: int = 16  # samples per problem (largest k)

    def validate(self, section: str = "rl") -> None:
        super().validate(section)
        if not self.tasks:
            raise EchoError(f"{section}.tasks is empty: name at least one task (e.g. "
                            "\"spelling\")")
        check_task_specs(f"{section}.tasks", self.tasks)
        if self.init not in ("sft", "base"):
            raise EchoError(f"{section}.init must be 'sft' or 'base', got {self.init!r}")
        if self.aggregation not in ("token", "sequence", "constant"):
            raise EchoError(f"{section}.aggregation must be token, sequence or constant, "
                            f"got {self.aggregation!r}")
        at_least(section, self, ("prompts_per_step", "group_size", "max_tokens", "epochs",
                                  "minibatches", "eval_problems", "eval_samples"), 1)
        if self.group_size < 2:
            raise EchoError(f"{section}.group_size={self.group_size} must be >= 2: advantages "
                            "compare the samples of one prompt")
        at_least(section, self, ("max_refills", "overlong_buffer"), 0)
        if self.overlong_buffer > self.max_tokens:
            raise EchoError(f"{section}.overlong_buffer={self.overlong_buffer} must be <= "
                            f"{section}.max_tokens={self.max_tokens}")
        finite(section, self, ("temperature",), strict=True)
        finite(section, self, ("clip_low", "clip_high", "kl_beta", "format_reward"))
        fraction(section, self, "clip_low", high_open=True)  # the ratio's floor 1 - clip_low > 0
        finite(section, self, ("tis_cap",))
        if 0 < self.tis_cap < 1:  # it would weigh down every token the two agree on
            raise EchoError(f"{section}.tis_cap={self.tis_cap} must be 0 (off) or >= 1")


@dataclass
class RankConfig:
    """Rankings for `echolm run`: K answers per prompt sampled from the SFT model and ranked
    by the simulated annotator into DIR/prefs.sqlite (people use `echolm rank` or the page)."""

    prompts: int = 300  # prompts whose sampled answers get ranked
    max_minutes: float = 0.0  # > 0: rank as many of them as fit this budget (0 = all)
    k: int = 4  # answers per prompt (InstructGPT: 4 to 9)
    # sampling temperatures of the K answers (answer j at [j % len]): mixing in a higher one
    # makes answers differ more (some fluent, some garbled)
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    annotator_noise: float = 0.1  # the simulated annotator's temperature (0 = always gold)

    def validate(self, section: str = "rank") -> None:
        at_least(section, self, ("prompts",), 1)
        if not 2 <= self.k <= 16:
            raise EchoError(f"{section}.k={self.k} must be between 2 and 16")
        if not self.temperatures or min(self.temperatures) <= 0:
            raise EchoError(f"{section}.temperatures={self.temperatures} must be positive "
                            "numbers, at least one (the K answers must differ)")
        finite(section, self, ("max_minutes", "annotator_noise"))


@dataclass
class RMConfig(BatchConfig):
    """The reward model: the SFT backbone + a scalar head, learned from the rankings (whose:
    data.rankings_annotator; held out: data.rankings_heldout_fraction). One step = one
    optimizer update on micro_batch rankings."""

    micro_batch: int = 8  # rankings per process per micro-step
    max_steps: int = 200  # the planned steps (capped at `epochs` passes over the rankings)
    lr_matrix: float = 0.004  # Muon, 2-D hidden matrices
    lr_embed: float = 0.004  # AdamW, token embedding
    lr_head: float = 0.004  # AdamW, output head (and the score head)
    lr_scalar: float = 0.004  # AdamW, norm weights
    warmup_steps: int = 10  # linear learning-rate warmup
    warmdown_frac: float = 0.5  # last fraction of steps decays linearly to final_lr_frac
    eval_every: int = 25  # steps between held-out evaluations (0 = only at the end)
    ckpt_every: int = 50  # steps between training checkpoints
    loss: str = "bt"  # bt: Bradley-Terry on every pair a ranking implies | pl: Plackett-Luce
    margin: float = 0.0  # BT: ask for r_chosen - r_rejected >= margin (Llama 2 style)
    center_coef: float = 0.01  # reward centering: coef * (r_c + r_r)^2 (Eisenstein et al.)
    # passes over the training rankings, capping max_steps (0 = no cap). A reward model trained
    # for many epochs on a few hundred rankings memorises them and grows over-confident
    # (InstructGPT trained its reward model for a single epoch).
    epochs: float = 2.0

    def validate(self, section: str = "rm") -> None:
        super().validate(section)
        one_of(section, self, "loss", ("bt", "pl"))
        finite(section, self, ("margin", "center_coef", "epochs"))


@dataclass
class RLHFConfig(LoopConfig):
    """RLHF: optimise the SFT policy against the reward model, with a KL penalty to SFT. One
    step = one batch of prompts_per_step x samples_per_prompt rollouts, scored by the reward
    model and learned from in epochs x minibatches updates."""

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
    ptx_rows: int = 4  # SFT rows per update for the ptx term

    def validate(self, section: str = "rlhf") -> None:
        super().validate(section)
        if self.algorithm not in ("ppo", "rloo", "grpo", "best"):
            raise EchoError(f"{section}.algorithm must be ppo, rloo, grpo or best, got "
                            f"{self.algorithm!r}")
        if self.algorithm != "ppo" and self.samples_per_prompt < 2:
            raise EchoError(f"{section}.algorithm={self.algorithm} needs {section}."
                            f"samples_per_prompt >= 2 (got {self.samples_per_prompt}): it "
                            "compares answers to one prompt")
        at_least(section, self, ("prompts_per_step", "samples_per_prompt", "max_tokens",
                                  "epochs", "minibatches", "eval_every", "eval_prompts",
                                  "eval_samples", "final_samples", "guard_patience",
                                  "train_prompts", "ptx_rows"), 1)
        at_least(section, self, ("overopt_steps",), 0)
        finite(section, self, ("temperature", "overopt_lr_mult"), strict=True)
        finite(section, self, ("kl_beta", "unfinished_penalty", "clip", "value_clip",
                                "vf_coef", "ptx_coef"))
        for name in ("gamma", "lam"):
            fraction(section, self, name)
        fraction(section, self, "clip", high_open=True)  # the ratio's floor 1 - clip > 0


@dataclass
class DPOConfig(BatchConfig):
    """DPO / IPO straight from the rankings (the reward model's: data.rankings_*), against the
    frozen SFT model. One step = one optimizer update on micro_batch preference pairs."""

    micro_batch: int = 8  # preference pairs per process per micro-step
    max_steps: int = 200  # the planned steps (capped at `epochs` passes over the pairs)
    lr_matrix: float = 0.002  # Muon, 2-D hidden matrices
    lr_embed: float = 0.002  # AdamW, token embedding
    lr_head: float = 0.001  # AdamW, output head
    lr_scalar: float = 0.001  # AdamW, norm weights
    warmup_steps: int = 10  # linear learning-rate warmup
    warmdown_frac: float = 0.5  # last fraction of steps decays linearly to final_lr_frac
    eval_every: int = 25  # steps between held-out implicit-reward checks (0 = only at the end)
    ckpt_every: int = 50  # steps between training checkpoints
    beta: float = 0.1  # strength of the implicit KL to the reference (DPO's beta)
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo (IPO, on per-token mean log-probs)
    epochs: float = 2.0  # passes over the training pairs, capping max_steps (0 = no cap)
    # + ptx_coef x the SFT loss on ptx_rows rows of the SFT mixture per micro-batch (as
    # RLHF's ptx_coef): keeps what the rankings cannot check, like right sums
    ptx_coef: float = 0.0
    ptx_rows: int = 4  # SFT rows per micro-batch for the ptx term
    nll_coef: float = 0.0  # + nll_coef x the chosen answers' NLL per token (RPO, Pang 2024)
    # learn only from pairs of answers both sampled at one of these temperatures (the
    # policy's own answers: T=1); [] = every pair. The reward model reads every ranking.
    temperatures: list[float] = field(default_factory=list)

    def validate(self, section: str = "dpo") -> None:
        super().validate(section)
        one_of(section, self, "loss", ("sigmoid", "ipo"))
        finite(section, self, ("beta",), strict=True)
        finite(section, self, ("epochs", "ptx_coef", "nll_coef"))
        at_least(section, self, ("ptx_rows",), 1)
        if any(t <= 0 for t in self.temperatures):
            raise EchoError(f"{section}.temperatures={self.temperatures} must be positive "
                            "numbers ([] = every pair)")


@dataclass
class Config:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Every check of every section, and the rules across them, before any stage runs."""
        self.model.vocab_size = self.tokenizer.vocab_size  # one source of truth
        sections = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                    if dataclasses.is_dataclass(getattr(self, f.name))]
        for name, section in sections:
            numbers(name, section, int)
        self.tokenizer.validate()
        self.model.validate()
        self.data.validate()
        self.run.validate()
        for name, section in sections:
            if isinstance(section, (LoopConfig, RankConfig)):
                section.validate(name)
            numbers(name, section, float)  # what the section's own checks leave: nan in lists
        longest = self.model.max_seq_len
        for name, section in sections:  # rows and answers must fit the model's context
            if isinstance(section, BatchConfig) and section.seq_len > longest:
                raise EchoError(f"{name}.seq_len={section.seq_len} exceeds model.max_seq_len="
                                f"{longest}")
            if isinstance(section, (RLConfig, RLHFConfig)) and section.max_tokens >= longest:
                raise EchoError(f"{name}.max_tokens={section.max_tokens} leaves no room for "
                                f"the prompt: must be < model.max_seq_len={longest}")
