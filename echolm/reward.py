"""The reward model: the SFT transformer with a scalar head that scores how good an answer to
a prompt is (trained by the `rm` stage, train/reward_model.py; read by RLHF and evaluation).

    rm = load_reward_model(run_dir / "rm")               # -> RewardModel (eval mode)
    rm.score(tok, prompts, responses)                    # -> float32 CPU tensor (N,)
    rm.score(tok, prompts, responses, ended=[...])       # answers cut off by a length limit

DIR/rm/model.safetensors holds the backbone plus `score_head.weight` (1, n_embd) and
`score_head.bias` (1,); reward_model.json says what the scores mean.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from echolm.checkpoint import load_model_config, read_weights
from echolm.config import ModelConfig
from echolm.errors import EchoError
from echolm.model import Transformer, rope_tables
from echolm.rankings import encode_answer
from echolm.rollout import pad_right
from echolm.runfiles import read_json
from echolm.tokenizer import Tokenizer

META_FILE = "reward_model.json"


class RewardModel(Transformer):
    """The transformer with its language-model head replaced by a scalar score head read at
    the last token of prompt + answer (<|assistant_end|> for a finished answer)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        del self.lm_head  # no next-token logits: the score head reads the final hidden state
        self.score_head = nn.Linear(cfg.n_embd, 1, bias=True)
        nn.init.zeros_(self.score_head.weight)
        nn.init.zeros_(self.score_head.bias)
        self.max_len = cfg.max_seq_len  # longest prompt + answer `score` reads

    def forward(self, idx: Tensor, last: Tensor) -> Tensor:  # type: ignore[override]
        """Scores (B,) float32 of right-padded rows idx (B, T) whose last real token is at
        position last[b]."""
        h = self.hidden_states(idx)
        h = h[torch.arange(idx.shape[0], device=idx.device), last]
        with torch.autocast(idx.device.type, enabled=False):  # the score in full precision
            return self.score_head(h.float()).squeeze(-1)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], batch_size: int = 32) -> Tensor:
        """Scores (N,) float32 on the CPU of token sequences (prompt + answer, chat format).
        Sorted by length into batches so padding costs little; eval mode for the call."""
        if not seqs:
            return torch.zeros(0)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = torch.zeros(len(seqs))
        pad = 0
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            x = pad_right([seqs[i] for i in idx], pad).to(device)
            last = torch.tensor([len(seqs[i]) - 1 for i in idx], device=device)
            out[idx] = self(x, last).cpu()
        self.train(was_training)
        return out

    def score(self, tok: Tokenizer, prompts: list[str], responses: list[str],
              ended: list[bool] | None = None, batch_size: int = 32) -> Tensor:
        """How good each answer is: float32 CPU tensor (N,), higher is better, 0 = an average
        training answer. prompts[i] is one user message, responses[i] the assistant's answer
        (plain text, no special tokens); ended[i] False marks an answer cut off before it
        ended its turn (default: all ended). Batched; no gradients; does not change modes."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        ended = [True] * len(prompts) if ended is None else ended
        seqs = [encode_answer(tok, p, r, e, self.max_len)[0]
                for p, r, e in zip(prompts, responses, ended, strict=True)]
        return self.score_ids(seqs, batch_size)


def _empty_reward_model(cfg: ModelConfig, device: str | torch.device) -> RewardModel:
    with torch.device("meta"):
        rm = RewardModel(cfg)
    rm = rm.to_empty(device=device)
    rm.rope_cos, rm.rope_sin = (t.to(device) for t in rope_tables(cfg, cfg.max_seq_len))
    return rm


def reward_model_from_backbone(folder: Path, device: str | torch.device = "cpu"
                               ) -> RewardModel:
    """A reward model whose backbone is the model saved in `folder` (e.g. DIR/sft), score
    head zero (every answer scores 0 at first)."""
    cfg = load_model_config(folder)
    sd = read_weights(folder / "model.safetensors", device)
    sd.pop("lm_head.weight", None)
    rm = _empty_reward_model(cfg, device)
    sd["score_head.weight"] = torch.zeros(1, cfg.n_embd, device=device)
    sd["score_head.bias"] = torch.zeros(1, device=device)
    _load_state(rm, sd, f"{folder}: not a model this reward model can start from")
    return rm


def _load_state(rm: RewardModel, sd: dict, what: str) -> None:
    """Load `sd` exactly, or one line saying `what` went wrong and which tensors differ."""
    try:
        rm.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise EchoError(f"{what} ({' '.join(str(e).split())[:300]})") from None


def load_reward_model(folder: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """The reward model saved in `folder` (DIR/rm), in eval mode."""
    folder = Path(folder)
    cfg = load_model_config(folder)
    sd = read_weights(folder / "model.safetensors", device)
    if "score_head.weight" not in sd:
        raise EchoError(f"{folder}: not a reward model (no score_head in model.safetensors)")
    rm = _empty_reward_model(cfg, device)
    _load_state(rm, sd, f"{folder / 'model.safetensors'}: does not match config.json")
    meta_path = folder / META_FILE
    fix = "retrain it with `echolm rm --force`"
    max_len = read_json(meta_path, fix, default={}).get("max_len", rm.max_len)
    if type(max_len) is not int or max_len < 1:
        raise EchoError(f"{meta_path}: 'max_len' should be a positive whole number, found "
                        f"{max_len!r}; {fix}")
    rm.max_len = max_len
    return rm.eval()
