"""LoRA: low-rank adapters on the attention and MLP projections, in peft's conventions.

A targeted `nn.Linear` (matched by its own name: `q_proj`, `k_proj`, `v_proj`, `o_proj`,
`gate_proj`, `up_proj`, `down_proj`) becomes a `LoRALinear`: the original layer, frozen, as
`base_layer`, plus `lora_A` (rank x in, kaiming-uniform as peft draws it) and `lora_B` (out x
rank, zeros: a fresh adapter changes nothing), and

    y = base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / rank

Every other parameter of the model is frozen. The names are peft's minus its adapter name
("default"): `layers.0.self_attn.q_proj.lora_A.weight` in Echo is peft's
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` in adapter_model.safetensors
(Echo's keys are HF's minus `model.`), so `save_adapter` writes a folder that
`peft.PeftModel.from_pretrained` loads onto the exported model. A stage hands on the merged
model (`merge_lora`: W + B A alpha/rank, plain `nn.Linear`s again), so everything after it
reads an ordinary checkpoint.

Echo does not import peft: the tests use it as the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.utils import skip_init

from echolm.atomic import atomic_write_json
from echolm.checkpoint import save_weights
from echolm.config import LORA_TARGETS, LoopConfig
from echolm.errors import EchoError
from echolm.model import Transformer
from echolm.outdir import replacing

PEFT_PREFIX = "base_model.model.model."  # peft's PeftModelForCausalLM > LlamaForCausalLM > model


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (`base_layer`) plus a trainable low-rank update (peft's
    `lora.Linear` with one adapter). `weight` is the effective weight (base + B A scale; the
    base alone while the adapters are disabled): what the CPU decoder packs
    (engine.FastDecoder), so sampling needs no extra matmuls."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        w = base.weight
        # built uninitialised on the CPU (no draw from the global RNG), then peft's init: A as
        # nn.Linear's own (kaiming-uniform, a = sqrt 5), B zero; then onto the base's device
        self.lora_A = skip_init(nn.Linear, base.in_features, rank, bias=False, dtype=w.dtype)
        self.lora_B = skip_init(nn.Linear, rank, base.out_features, bias=False, dtype=w.dtype)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(w.device)
        self.lora_B.to(w.device)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.disabled = False
        self._cast: tuple[Tensor, int, Tensor] | None = None  # (weight, version, its cast)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def weight(self) -> Tensor:
        if self.disabled:
            return self.base_layer.weight
        # W + B A alpha / rank (peft's merge) in one pass over the matrix: the CPU decoder
        # reads this for every weight each time it is rebuilt (after every update), and the
        # merges below use it, so there is one definition of the merged weight
        return torch.addmm(self.base_layer.weight, self.lora_B.weight, self.lora_A.weight,
                           alpha=self.scaling)

    def _base(self, x: Tensor) -> Tensor:
        """The base layer; under autocast its frozen weight cast once, not at every call.
        Autocast caches the casts of weights that require grad only, so a frozen base (all of
        LoRA's) was re-cast to bf16 at every forward: a LoRA step in bf16 cost as much as a
        full one. The copy is remade when the weight changes (its version counter)."""
        w, device = self.base_layer.weight, x.device.type
        dt = torch.get_autocast_dtype(device)
        if w.requires_grad or not torch.is_autocast_enabled(device) or dt == w.dtype:
            return self.base_layer(x)
        cast = self._cast
        if cast is None or cast[0] is not w or cast[1] != w._version or cast[2].dtype != dt:
            cast = (w, w._version, w.detach().to(dt))
            # a copy made under inference_mode could never be saved for a backward: not kept
            if not torch.is_inference_mode_enabled():
                self._cast = cast
        b = self.base_layer.bias
        return F.linear(x.to(dt), cast[2], None if b is None else b.to(dt))

    def forward(self, x: Tensor) -> Tensor:
        y = self._base(x)
        if self.disabled:
            return y
        # scaled at rank width (r columns, not out_features): the same numbers as peft's
        # B(A x) * scaling, exactly when the scaling is a power of two (alpha = 2 r)
        return y.add_(self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling))


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, LoRALinear]]:
    """(qualified name, parent, attribute, layer) of every LoRA layer, in module order."""
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                yield f"{parent_name}.{attr}" if parent_name else attr, parent, attr, child


def free_casts(model: nn.Module) -> None:
    """Drop the LoRA layers' bf16 copies of their frozen weights (`LoRALinear._base`): sampling
    reads the weights through the decoder's own copies, so during a rollout they are only
    memory (RL's peak: ~2 bytes a base parameter). The next training forward remakes them."""
    for _name, _parent, _attr, layer in _lora_layers(model):
        layer._cast = None


def has_lora(model: nn.Module) -> bool:
    """Whether `model` carries LoRA adapters (not merged yet)."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


def add_lora(model: Transformer, rank: int, alpha: float, targets: Sequence[str],
             dropout: float = 0.0, seed: int | None = None) -> int:
    """Replace every `nn.Linear` of `model` whose own name is in `targets` by a `LoRALinear`
    and freeze every other parameter; returns the number of trainable parameters (the
    adapters'). `seed`: A's draw from its own generator (reproducible, and the global RNG
    untouched); None draws from the global RNG, as peft does."""
    if rank <= 0:
        raise EchoError(f"LoRA rank {rank} must be positive")
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise EchoError(f"LoRA targets {list(targets)}: expected one or more of "
                        f"{', '.join(LORA_TARGETS)}")
    if has_lora(model):
        raise EchoError("the model has LoRA adapters already (merge_lora them first)")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    for _, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if attr in targets and type(child) is nn.Linear:
                setattr(parent, attr, LoRALinear(child, rank, alpha, dropout, generator))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_lora(model: Transformer) -> None:
    """Fold each adapter into its base weight (W += B A alpha / rank, as peft's merge) and put
    the plain `nn.Linear` back, in place. Parameters keep their requires_grad."""
    for _, parent, attr, layer in list(_lora_layers(model)):
        layer.base_layer.weight.copy_(layer.weight)
        setattr(parent, attr, layer.base_layer)


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model`'s state dict as a plain model's (adapters folded in, `merge_lora`'s numbers)
    without changing the model: for saving a copy mid-training."""
    sd = model.state_dict()
    with torch.no_grad():
        for name, _, _, layer in _lora_layers(model):
            for k in ("lora_A.weight", "lora_B.weight"):
                del sd[f"{name}.{k}"]
            sd[f"{name}.weight"] = layer.weight
            del sd[f"{name}.base_layer.weight"]
            if layer.base_layer.bias is not None:
                sd[f"{name}.bias"] = sd.pop(f"{name}.base_layer.bias")
    return sd


def lora_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The adapters under peft's adapter_model.safetensors keys
    (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    out = {}
    for name, _, _, layer in _lora_layers(model):
        for k in ("lora_A", "lora_B"):
            out[f"{PEFT_PREFIX}{name}.{k}.weight"] = (
                getattr(layer, k).weight.detach().to("cpu", copy=True).contiguous())
    return out


def _lora_settings(model: Transformer) -> tuple[int, float, float, list[str]]:
    layers = [layer for *_, layer in _lora_layers(model)]
    if not layers:
        raise EchoError("the model has no LoRA adapters to save")
    first = layers[0]
    drop = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    targets = sorted({name.rsplit(".", 1)[-1] for name, *_ in _lora_layers(model)},
                     key=LORA_TARGETS.index)
    return first.rank, first.alpha, drop, targets


def adapter_config(model: Transformer, base_model: str) -> dict[str, Any]:
    """peft's adapter_config.json for `model`'s adapters (the fields peft >= 0.13 reads)."""
    rank, alpha, dropout, targets = _lora_settings(model)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "revision": None, "inference_mode": True, "r": rank, "lora_alpha": alpha,
            "lora_dropout": dropout, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


def save_adapter(model: Transformer, folder: Path, base_model: str) -> None:
    """`folder`/adapter_config.json + adapter_model.safetensors in peft's format, the folder
    replaced as a whole (never half of one). `base_model`: what the adapter applies to."""
    config = adapter_config(model, base_model)
    tensors = lora_state_dict(model)
    with replacing(Path(folder)) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", config)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block `model` computes as its frozen base model (peft's
    `disable_adapter`): no copy of any weight."""
    layers = [layer for *_, layer in _lora_layers(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before, strict=True):
            layer.disabled = was


class BaseView:
    """The frozen base of a LoRA `model`, usable where a stage used a frozen copy as its
    reference (`token_logprobs`, `pair_logps`, calls): every forward runs with the adapters
    disabled. Its train()/eval() leave the model's mode alone (it is the policy's too)."""

    training = False

    def __init__(self, model: Transformer) -> None:
        self.model, self.cfg, self.lm_head = model, model.cfg, model.lm_head

    def _check(self) -> None:
        if not has_lora(self.model):  # merged: the base weights are gone
            raise RuntimeError("the reference is a LoRA model's base, but its adapters were "
                               "merged; measure against the reference before merge_lora")

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self._check()
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    def hidden_states(self, idx: Tensor) -> Tensor:
        self._check()
        with adapters_disabled(self.model):
            return self.model.hidden_states(idx)

    def prompt_answer_states(self, *args: Tensor) -> Tensor:
        self._check()
        with adapters_disabled(self.model):
            return self.model.prompt_answer_states(*args)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def eval(self) -> BaseView:
        return self

    def train(self, mode: bool = True) -> BaseView:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> BaseView:
        return self


class StoredLowLinear(nn.Linear):
    """A frozen layer stored in the dtype its stage autocasts to (a bf16 reference): under
    autocast `F.linear` uses the stored copy as it is, the very numbers autocast's own cast of
    the fp32 weight gives (round to nearest), without making that cast at every forward;
    outside autocast the weight is cast up to the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if x.dtype == w.dtype or torch.is_autocast_enabled(x.device.type):
            return F.linear(x, w, b)
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def frozen_reference(model: Transformer, dtype: torch.dtype = torch.float32) -> Transformer:
    """The starting model, frozen, that a stage measures its policy against (RL's and RLHF's
    KL, DPO's reference): with LoRA the policy's own base (`BaseView`: no second copy of the
    weights, the memory a reference otherwise costs), else a frozen deep copy. A stage that
    computes in bf16 (`dtype`, its autocast dtype) gets the copy's projections stored in bf16
    (`StoredLowLinear`): the same log-probs under autocast, half their memory, and no cast of
    every weight at every reference pass (~0.1 s of a SmolLM2 DPO step on 2 cores). A tied
    output head gets its own bf16 copy (its cast was each pass's largest); the embedding's
    lookups stay fp32."""
    if has_lora(model):
        return BaseView(model)  # type: ignore[return-value]  (Transformer's calls only)
    import copy

    tied = model.lm_head.weight is model.embed_tokens.weight
    low = [m for m in model.modules() if type(m) is nn.Linear
           and not (tied and m is model.lm_head)] if dtype != torch.float32 else []
    # the copy's layers made in `dtype` directly (deepcopy's memo), never in fp32 first: a
    # freed fp32 copy would leave the heap that much higher
    memo: dict[int, Any] = {id(t): nn.Parameter(t.detach().to(dtype), requires_grad=False)
                            for m in low for t in (m.weight, m.bias) if t is not None}
    ref = copy.deepcopy(model, memo).eval().requires_grad_(False)
    if low:
        if tied:  # the head gets its own copy; the embedding's lookups stay fp32
            ref.lm_head.weight = nn.Parameter(ref.lm_head.weight.detach().to(dtype),
                                              requires_grad=False)
        for m in ref.modules():
            if type(m) is nn.Linear:  # every one of them is stored in `dtype` now
                m.__class__ = StoredLowLinear
    return ref


def _millions(n: int) -> str:
    return f"{n / 1e6:.3g}M"


def start_lora(model: Transformer, cfg: LoopConfig, stage: str,
               log: Callable[[str], Any] = print) -> dict[str, Any] | None:
    """A stage's LoRA, when its `lora_rank` > 0: adapters on `model` as the settings say (A
    drawn from the stage's seed), the count logged once; returns the stage result's `lora`
    entry, or None (full fine-tuning)."""
    if cfg.lora_rank <= 0:
        return None
    total = model.num_params()
    n = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout,
                 seed=cfg.seed)
    log(f"{stage}: LoRA r={cfg.lora_rank}: {n:,} trainable parameters of {_millions(total)}")
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
            "targets": list(cfg.lora_targets), "trainable_params": n}


def finish_lora(model: Transformer, out: Path, base_model: Path | str) -> None:
    """After a LoRA stage's training (and whatever still needs the reference): the adapter
    saved as out/adapter (peft's format), then merged into `model` in place, so the stage
    saves and evaluates a plain model. Nothing for a model without adapters."""
    if not has_lora(model):
        return
    save_adapter(model, out / "adapter", str(base_model))
    merge_lora(model)


def save_merged(model: Transformer, folder: Path) -> None:
    """`checkpoint.save_model` of a model that may carry adapters: the merged weights, the
    model itself unchanged (RLHF's best-so-far copy, mid-training)."""
    save_weights(merged_state_dict(model), model.cfg, folder)
