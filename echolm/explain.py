"""`echolm explain`: "predict what comes next, one piece at a time", made visible.

The text is cut into tokens; at every position the model's probabilities for the next token
are shown (the top k candidates, and the probability and rank it gave the token that really
came next). `--generate N` then continues the text N steps, showing at each step the candidates
and the one chosen (greedy by default, sampled with a temperature). `--chat` wraps the text as a
user message in the chat format, so the steps are the assistant's first tokens.

JSON schema (``--json``; probabilities are softmax of the model's raw logits, temperature 1)::

    {"stage": "sft",                      # the model's stage
     "text": "...", "chat": false,        # the input, and whether it was wrapped as a message
     "tokens": [{"id": 0, "piece": "<|bos|>"}, ...],      # the whole input, <|bos|> first
     "positions": [{"index": 0,           # one per input token
                    "token": {"id", "piece"},             # the token at this position
                    "next_actual": {"id", "piece", "prob", "rank"} | null,   # null at the end
                    "top": [{"id", "piece", "prob"}, ...]}],   # k best, most likely first
     "generated": [{"step": 1,            # one per generated token (1-based)
                    "chosen": {"id", "piece", "prob", "rank"},
                    "top": [...]}],
     "generated_text": "..."}             # the continuation as text (stop token excluded)

`piece` is the token's own bytes as UTF-8 (invalid bytes as ``\\xNN``; a special token is its
name). `rank` is 1 + the number of tokens the model found strictly more likely. Generation stops
early after ``<|assistant_end|>`` or ``<|bos|>`` (that step is still listed).
"""

from __future__ import annotations

import functools
import json
import sys
import unicodedata
from pathlib import Path

import torch

from echolm.checkpoint import load_model, stage_dir
from echolm.engine import SamplingParams, TokenPieces, generate_ids
from echolm.errors import EchoError
from echolm.model import Transformer
from echolm.tokenizer import Tokenizer

VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_run(run_dir: Path, stage: str | None, device: str | None = None
             ) -> tuple[Tokenizer, Transformer, str]:
    """The run's tokenizer and `stage`'s model (default: the latest stage), in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EchoError(f"{run_dir}: no such run directory")
    folder = stage_dir(run_dir, stage)
    tok = Tokenizer.load(run_dir / "tokenizer")
    model = load_model(folder, device or default_device()).eval()
    if model.cfg.vocab_size < tok.vocab_size:
        raise EchoError(f"{folder}: model vocabulary ({model.cfg.vocab_size}) is smaller than "
                        f"the tokenizer's ({tok.vocab_size})")
    return tok, model, folder.name


def token_piece(tok: Tokenizer, i: int) -> str:
    """A token's own text: its bytes as UTF-8 (a cut character as \\xNN), a special token's
    name, or <|unused_N|> for a model row the tokenizer has no token for (the engine's
    token-piece table, as the server spells tokens)."""
    if i >= tok.vocab_size:  # as TokenPieces spells it (one table per tokenizer, not per id)
        return f"<|unused_{i}|>"
    return _pieces(tok).strings[i]


@functools.lru_cache(maxsize=4)
def _pieces(tok: Tokenizer) -> TokenPieces:
    return TokenPieces(tok, tok.vocab_size)


def visible(piece: str) -> str:
    """Whitespace and control characters made visible: ␣ space, ⏎ newline, ⇥ tab."""
    out = []
    for ch in piece:
        if ch in VISIBLE:
            out.append(VISIBLE[ch])
        elif unicodedata.category(ch).startswith("C"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _entry(tok: Tokenizer, probs: torch.Tensor, i: int) -> dict:
    p = float(probs[i])
    rank = 1 + int((probs > probs[i]).sum())
    return {"id": i, "piece": token_piece(tok, i), "prob": p, "rank": rank}


def _top(tok: Tokenizer, probs: torch.Tensor, k: int) -> list[dict]:
    values, ids = probs.topk(min(k, probs.numel()))
    return [{"id": int(i), "piece": token_piece(tok, int(i)), "prob": float(v)}
            for v, i in zip(values, ids, strict=True)]


@torch.no_grad()  # not inference_mode: the engine's fast decoder reads the weights' versions
def explain(run_dir: Path, text: str, stage: str | None = None, top_k: int = 5,
            generate: int = 0, temperature: float = 0.0, seed: int | None = None,
            chat: bool = False, device: str | None = None) -> dict:
    """The explanation of `text` as a dict in the JSON schema of this module's docstring."""
    if text == "":
        raise EchoError("the text to explain is empty")
    if top_k < 1:
        raise EchoError(f"--top-k must be at least 1, got {top_k}")
    if generate < 0:
        raise EchoError(f"--generate must be 0 or more, got {generate}")
    if temperature < 0:
        raise EchoError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    tok, model, name = load_run(run_dir, stage, device)
    ids = (tok.render_user(text) if chat
           else [tok.bos, *tok.encode(text)])
    limit = model.cfg.max_seq_len
    if len(ids) + generate > limit:
        what = "with the chat markup " if chat else ""
        more = f" + {generate} to generate" if generate else ""
        raise EchoError(f"the text is {len(ids)} tokens {what}(<|bos|> included){more}; "
                        f"the model reads at most {limit}")
    dev = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=dev))[0].float()
    probs = logits.softmax(-1).cpu()
    positions = []
    for index, t in enumerate(ids):
        nxt = _entry(tok, probs[index], ids[index + 1]) if index + 1 < len(ids) else None
        positions.append({"index": index, "token": {"id": t, "piece": token_piece(tok, t)},
                          "next_actual": nxt, "top": _top(tok, probs[index], top_k)})

    # the engine's own decoding (KV cache, one sampler, one seeded generator), watched
    stops = set(tok.stop_ids)
    params = SamplingParams(max_tokens=generate, temperature=temperature, top_k=0, top_p=1.0,
                            seed=seed, stop_ids=tuple(stops))
    seen: list[torch.Tensor] = []
    generated = []
    steps = generate_ids(model, [ids], params, pad_id=tok.pad,
                         on_draw=lambda _r, lg, _t: seen.append(lg[0].float().softmax(-1).cpu()))
    for step, nxt in enumerate(steps if generate else (), 1):
        chosen, p = int(nxt[0]), seen[-1]
        generated.append({"step": step, "chosen": _entry(tok, p, chosen),
                          "top": _top(tok, p, top_k)})
    text_ids = [g["chosen"]["id"] for g in generated if g["chosen"]["id"] not in stops]
    return {"stage": name, "text": text, "chat": chat,
            "tokens": [{"id": t, "piece": token_piece(tok, t)} for t in ids],
            "positions": positions, "generated": generated,
            "generated_text": tok.decode([t for t in text_ids if t < tok.vocab_size])}


# ---- terminal output ----------------------------------------------------------------------

GREEN, BOLD, DIM, RESET = "\x1b[32m", "\x1b[1m", "\x1b[2m", "\x1b[0m"


def _cell(piece: str, width: int) -> str:
    s = visible(piece)
    if len(s) > width:
        s = s[: width - 1] + "…"
    return s.ljust(width)


def _pct(p: float) -> str:
    return f"{p * 100:.1f}%" if p >= 0.0005 else "<0.1%"


def _candidates(top: list[dict], mark: int | None, color: bool) -> str:
    out = []
    for c in top:
        s = f"{visible(c['piece'])} {_pct(c['prob'])}"
        if c["id"] == mark:
            s = f"{GREEN}{BOLD}{s}{RESET}" if color else f"[{s}]"
        out.append(s)
    return "   ".join(out)


def format_explanation(r: dict, color: bool = False, temperature: float = 0.0) -> str:
    """The explanation as an aligned table: one row per position, then one per generated step.
    The candidate matching the actual (or chosen) token is bracketed (green on a terminal)."""
    pieces = [visible(t["piece"]) for t in r["tokens"]]
    pieces += [visible(g["chosen"]["piece"]) for g in r["generated"]]
    w = min(max([5, *map(len, pieces)]), 20)
    k = len(r["positions"][0]["top"])
    dim = (lambda s: f"{DIM}{s}{RESET}") if color else (lambda s: s)
    lines = [f"stage {r['stage']} · {len(r['tokens'])} tokens"
             + (" (the text as a user message, then <|assistant_start|>)" if r["chat"] else ""),
             "", "tokens  " + dim(" | ").join(visible(t["piece"]) for t in r["tokens"]),
             "ids     " + " ".join(str(t["id"]) for t in r["tokens"]), "",
             f"{'pos':>4} {'id':>6}  {'token':<{w}}  {'next':<{w}}  {'p(next)':>7} {'rank':>5}   "
             f"top {k} predictions for the next token"]
    for pos in r["positions"]:
        nxt = pos["next_actual"]
        mid = (f"{_cell(nxt['piece'], w)}  {_pct(nxt['prob']):>7} {nxt['rank']:>5}" if nxt
               else f"{'—':<{w}}  {'':>7} {'':>5}")
        lines.append(f"{pos['index']:>4} {pos['token']['id']:>6}  "
                     f"{_cell(pos['token']['piece'], w)}  {mid}   "
                     f"{_candidates(pos['top'], nxt and nxt['id'], color)}")
    if r["generated"]:
        how = "greedy: the most likely token" if temperature <= 0 else \
            f"sampled at temperature {temperature:g}"
        lines += ["", f"generated, one token at a time ({how}):",
                  f"{'step':>4} {'id':>6}  {'chosen':<{w}}  {'p':>7} {'rank':>5}   "
                  f"top {k} candidates"]
        for g in r["generated"]:
            c = g["chosen"]
            lines.append(f"{g['step']:>4} {c['id']:>6}  {_cell(c['piece'], w)}  "
                         f"{_pct(c['prob']):>7} {c['rank']:>5}   "
                         f"{_candidates(g['top'], c['id'], color)}")
        lines += ["", "continuation: " + json.dumps(r["generated_text"], ensure_ascii=False)]
    return "\n".join(lines)


def run_explain(run_dir: Path, text: str | None, stage: str | None = None, top_k: int = 5,
                generate: int = 0, temperature: float = 0.0, seed: int | None = None,
                chat: bool = False, as_json: bool = False) -> None:
    """The CLI's entry: explain `text` (None: read stdin) and print a table or JSON."""
    if text is None:
        if sys.stdin.isatty():
            raise EchoError("give the text to explain as an argument (or pipe it in)")
        text = sys.stdin.read()
    r = explain(run_dir, text, stage=stage, top_k=top_k, generate=generate,
                temperature=temperature, seed=seed, chat=chat)
    if as_json:
        print(json.dumps(r, ensure_ascii=False))
    else:
        print(format_explanation(r, color=sys.stdout.isatty(), temperature=temperature))
