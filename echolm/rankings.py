"""People's rankings as training data, shared by the reward model and DPO: the rankings read
from DIR/prefs.sqlite, the train / held-out split by prompt, answers encoded in the chat
format, and the seeded order in which a stage visits its examples."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echolm.errors import EchoError
from echolm.prefs import PreferenceStore
from echolm.tokenizer import Tokenizer


@dataclass
class RankedExample:
    """One ranking: a prompt (one user message) and its answers, best first. `ended[i]` is
    False for an answer that was cut off before it ended its turn (the store's sampling record
    says ``"stopped": false``); such an answer is read without <|assistant_end|>."""

    prompt: str
    responses: list[str]
    ended: list[bool]
    annotator: str = ""
    # the temperature each answer was sampled at (None: not recorded, e.g. imported)
    temperatures: list[float | None] | None = None


def load_rankings(run_dir: Path, annotator: str = "") -> list[RankedExample]:
    """Every ranking in DIR/prefs.sqlite (optionally one annotator's)."""
    path = run_dir / "prefs.sqlite"
    if not path.exists():
        raise EchoError(f"{path}: no preference store (rank answers first: `echolm rank`)")
    store = PreferenceStore(path)
    try:
        out = []
        for r in store.rankings(annotator or None):
            meta = {x["id"]: x["sampling"] for x in store.responses(r.prompt_id)}
            ended = [bool(meta.get(i, {}).get("stopped", True)) for i in r.response_ids]
            temps = [meta.get(i, {}).get("temperature") for i in r.response_ids]
            out.append(RankedExample(r.prompt, r.responses, ended, r.annotator, temps))
    finally:
        store.close()
    if not out:
        who = f" by annotator '{annotator}'" if annotator else ""
        raise EchoError(f"{path}: no rankings{who} yet (rank answers first: `echolm rank`)")
    return out


def split_by_prompt(items: list, fraction: float, seed: int = 0,
                    key=lambda r: r.prompt) -> tuple[list, list]:
    """(train, held-out): a seeded share `fraction` of the distinct prompts is held out, with
    every ranking of them (several annotators' rankings of one prompt stay together)."""
    prompts = sorted({key(r) for r in items})
    random.Random(seed).shuffle(prompts)
    n_held = math.ceil(fraction * len(prompts)) if fraction > 0 and len(prompts) > 1 else 0
    held = set(prompts[:min(n_held, len(prompts) - 1)])
    return [r for r in items if key(r) not in held], [r for r in items if key(r) in held]


def encode_answer(tok: Tokenizer, prompt: str, response: str, ended: bool = True,
                  max_len: int | None = None) -> tuple[list[int], int]:
    """Ids of the prompt and answer in the chat format (<|assistant_end|> only if the answer
    ended its turn), and how many of them are the prompt. Too long for `max_len`: the prompt
    loses tokens from its start, then (if the answer alone is too long) the answer its end."""
    p = tok.render_user(prompt)
    r = tok.encode(response) + ([tok.assistant_end] if ended else [])
    if max_len is not None and len(p) + len(r) > max_len:
        keep = max(1, max_len - len(r))  # always keep <|assistant_start|>
        p = p[len(p) - keep:]
        r = r[:max_len - len(p)]
    return p + r, len(p)


def step_indices(n: int, per_step: int, step: int, seed: int) -> list[int]:
    """Which of `n` examples step `step` trains on: a seeded permutation per epoch, consumed
    in order, `per_step` at a time. A function of the step only, so a resumed run sees exactly
    the batches it would have seen."""
    out, orders = [], {}
    for k in range(step * per_step, (step + 1) * per_step):
        epoch = k // n
        if epoch not in orders:
            orders[epoch] = np.random.default_rng(seed * 1000 + epoch).permutation(n)
        out.append(int(orders[epoch][k % n]))
    return out
