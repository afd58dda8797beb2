"""`echolm chat`: talk to a run's model in the terminal.

Every turn the whole conversation is rendered again in the chat format (`render_prompt`),
dropping the oldest turns when it would not leave `max_tokens` of room in the model's context,
and the answer streams token by token until `<|assistant_end|>` (or `<|bos|>`, a base model's
end of document). Commands at the prompt: /help /reset /temp /stage /tokens /quit. Ctrl-C stops
an answer; at the prompt it leaves. `--prompt` answers one message and prints only the answer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from echolm.checkpoint import MODEL_STAGES, imported_instruct
from echolm.engine import SamplingParams, Utf8Stream, filter_logits, generate_ids
from echolm.errors import EchoError
from echolm.explain import load_run, token_piece, visible
from echolm.model import Transformer
from echolm.tokenizer import Tokenizer

PROMPT = "you> "
ANSWER = "echo> "
STOPPED = "[stopped]"
HELP = """commands:
  /reset        forget the conversation (the system message stays)
  /temp [T]     show or set the temperature (0 = greedy: always the most likely token)
  /stage [S]    show the stages or switch model ({stages}); the conversation is kept
  /tokens       the last answer token by token: id, piece, and the probability it had
  /help         this help
  /quit         leave (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C during an answer stops it. Start a message with // to send one beginning with /."""
BASE_NOTE = ("note: the base model has never seen the chat format; expect it to continue the "
             "text rather than answer")


@dataclass
class Answer:
    """One generated answer, kept for /tokens."""

    model: Transformer
    stage: str
    prompt: list[int]
    ids: list[int]  # generated tokens, the stop token included if there was one
    text: str
    params: SamplingParams
    stopped: bool  # interrupted by Ctrl-C


def sampling_probs(logits: Tensor, p: SamplingParams) -> Tensor:
    """Rows of the distribution `sample_next` draws from: temperature, top-k and top-p applied
    by the engine's `filter_logits`; greedy puts all the mass on the most likely token."""
    logits = logits.float()
    if p.temperature <= 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return filter_logits(logits, p).softmax(-1)


@torch.inference_mode()
def token_probs(a: Answer) -> list[tuple[float, float]]:
    """For each token of an answer: (the model's probability at temperature 1, its probability
    in the distribution it was drawn from). One forward pass over prompt + answer gives the
    same logits the decoding steps saw."""
    if not a.ids:
        return []
    dev = next(a.model.parameters()).device
    seq = torch.tensor([a.prompt + a.ids[:-1]], device=dev)
    logits = a.model(seq)[0, len(a.prompt) - 1:].float()
    idx = torch.tensor(a.ids, device=dev)[:, None]
    model_p = logits.softmax(-1).gather(1, idx)[:, 0].tolist()
    sample_p = sampling_probs(logits, a.params).gather(1, idx)[:, 0].tolist()
    return list(zip(model_p, sample_p, strict=True))


def format_tokens(tok: Tokenizer, a: Answer) -> str:
    rows = token_probs(a)
    w = min(max([5, *(len(visible(token_piece(tok, t))) for t in a.ids)]), 24)
    p = a.params
    how = "greedy" if p.temperature <= 0 else (
        f"temperature {p.temperature:g}" + (f", top-k {p.top_k}" if p.top_k else "")
        + (f", top-p {p.top_p:g}" if p.top_p < 1 else ""))
    lines = [f"{len(a.ids)} tokens from stage {a.stage} ({how})"
             + (", stopped by Ctrl-C" if a.stopped else ""),
             f"{'#':>4} {'id':>6}  {'piece':<{w}}  {'p':>7}  {'p(sampled)':>10}"]
    for k, (t, (pm, ps)) in enumerate(zip(a.ids, rows, strict=True), 1):
        piece = visible(token_piece(tok, t))
        piece = piece if len(piece) <= w else piece[: w - 1] + "…"
        lines.append(f"{k:>4} {t:>6}  {piece:<{w}}  {pm * 100:>6.2f}%  {ps * 100:>9.2f}%")
    lines.append("p: the model's probability (temperature 1); p(sampled): the token's chance "
                 "in the distribution it was drawn from")
    return "\n".join(lines)


def fit_prompt(tok: Tokenizer, messages: list[dict], max_seq_len: int, max_tokens: int
               ) -> tuple[list[int], int]:
    """The prompt ids and how many of the oldest (user, assistant) turns were dropped so that
    `max_tokens` fit after it. The last message is never dropped; if even it alone leaves no
    room in the context, that is an error."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    dropped = 0
    while True:
        ids = tok.render_prompt(system + rest)
        if len(ids) + max_tokens <= max_seq_len or len(rest) <= 1:
            break
        rest, dropped = rest[2:], dropped + 1
    if len(ids) >= max_seq_len:
        raise EchoError(f"the message is too long: {len(ids)} tokens in the chat format, the "
                        f"model reads at most {max_seq_len} (answer included)")
    return ids, dropped


def stream_answer(model: Transformer, tok: Tokenizer, prompt: list[int], params: SamplingParams,
                  write: Callable[[str], None]) -> tuple[list[int], str, bool]:
    """Generate and `write` the answer piece by piece (never half a UTF-8 character; special
    tokens other than the stops are written by name). Ctrl-C stops it. Returns the ids (stop
    token included), the text written, and whether it was stopped."""
    stops = set(params.stop_ids)
    stream, ids, parts, stopped = Utf8Stream(tok), [], [], False
    try:
        for step in generate_ids(model, [prompt], params, pad_id=tok.pad):
            t = int(step[0])
            if t < 0:
                break
            ids.append(t)
            if t in stops:
                break
            if t < tok.vocab_size and tok.token_bytes[t]:
                piece = stream.push(t)
            else:  # a special token (or a model row with no token): show it by name
                piece = stream.flush() + token_piece(tok, t)
            if piece:
                parts.append(piece)
                write(piece)
    except KeyboardInterrupt:
        stopped = True
    tail = stream.flush()
    if tail:
        parts.append(tail)
        write(tail)
    return ids, "".join(parts), stopped


class ChatSession:
    def __init__(self, run_dir: Path, stage: str | None, params: SamplingParams,
                 system: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.tok, model, self.stage = load_run(self.run_dir, stage)
        self.models = {self.stage: model}
        self.params = params
        self.system = system
        self.history: list[dict] = []
        self.last: Answer | None = None
        self.reset()

    @property
    def model(self) -> Transformer:
        return self.models[self.stage]

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def switch(self, stage: str) -> None:
        if stage not in self.models:
            _, self.models[stage], _ = load_run(self.run_dir, stage)
        self.stage = stage

    def prompt_for(self, text: str, note: Callable[[str], None] | None = None) -> list[int]:
        """The prompt ids for the next answer, after the user's message `text`; the oldest
        turns leave the history if there would be no room for the answer."""
        messages = [*self.history, {"role": "user", "content": text}]
        prompt, dropped = fit_prompt(self.tok, messages, self.model.cfg.max_seq_len,
                                     self.params.max_tokens)
        if dropped:
            keep = 1 if self.system else 0
            del self.history[keep:keep + 2 * dropped]
            if note:
                note(f"(the conversation is too long for the model's context: dropped the "
                     f"{dropped} oldest turn{'s' if dropped > 1 else ''})")
        return prompt

    def answer(self, text: str, prompt: list[int], write: Callable[[str], None]) -> Answer:
        """Stream the answer to `prompt` (made by `prompt_for(text)`), add both to history."""
        self.history.append({"role": "user", "content": text})
        ids, answer, stopped = stream_answer(self.model, self.tok, prompt, self.params, write)
        self.history.append({"role": "assistant", "content": answer})
        self.last = Answer(self.model, self.stage, prompt, ids, answer, self.params, stopped)
        return self.last

    def ask(self, text: str, write: Callable[[str], None]) -> Answer:
        return self.answer(text, self.prompt_for(text), write)


def _print(s: str = "", end: str = "\n") -> None:
    sys.stdout.write(s + end)
    sys.stdout.flush()


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _note(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def _readline_buffer() -> str:
    try:
        import readline
    except ImportError:
        return ""
    return readline.get_line_buffer()


def command(s: ChatSession, line: str) -> bool:
    """Run one /command; False means leave."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name == "help":
        _print(HELP.format(stages=", ".join(MODEL_STAGES)))
    elif name == "reset":
        s.reset()
        s.last = None
        _print("(conversation cleared)")
    elif name == "temp":
        if arg:
            try:
                t = float(arg)
                if not t >= 0 or t == float("inf"):
                    raise ValueError
            except ValueError:
                _print(f"/temp: expected a number >= 0, got {arg!r}")
                return True
            s.params = replace(s.params, temperature=t)
        _print(f"(temperature {s.params.temperature:g}"
               + (", greedy)" if s.params.temperature <= 0 else ")"))
    elif name == "stage":
        if not arg:
            present = [x for x in MODEL_STAGES
                       if (s.run_dir / x / "model.safetensors").exists()]
            _print(f"(stage {s.stage}; this run has: {', '.join(present)})")
            return True
        try:
            s.switch(arg)
        except EchoError as e:
            _print(f"/stage: {e}")
            return True
        _print(f"(now talking to stage {s.stage}; the conversation is kept)")
        if s.stage == "base" and not imported_instruct(s.run_dir) and sys.stdin.isatty():
            _note(BASE_NOTE)
    elif name == "tokens":
        if s.last is None:
            _print("(no answer yet)")
        else:
            _print(format_tokens(s.tok, s.last))
    else:
        _print(f"unknown command /{name} (/help lists them)")
    return True


def interactive(s: ChatSession) -> None:
    tty = sys.stdin.isatty()
    if tty:
        import readline  # noqa: F401  (line editing and history for input())

        n = s.model.num_params()
        _print(f"echolm chat · {s.run_dir} · stage {s.stage} ({n / 1e6:.2f}M parameters) · "
               f"/help for commands, /quit to leave")
        if s.stage == "base" and not imported_instruct(s.run_dir):
            _note(BASE_NOTE)
    while True:
        try:
            line = input(PROMPT if tty else "")
        except EOFError:
            if tty:
                _print()
            return
        except KeyboardInterrupt:
            if tty and _readline_buffer().strip():  # Ctrl-C on a typed line: drop the line
                _print()
                continue
            _print()
            return
        try:
            text = line.strip()
            if not text:
                continue
            if text.startswith("/") and not text.startswith("//"):
                if not command(s, text):
                    return
                continue
            if text.startswith("//"):
                text = text[1:]
            try:
                prompt = s.prompt_for(text, note=_note)
            except EchoError as e:
                _note(f"error: {e}")
                continue
            if tty:
                _write(ANSWER)
            a = s.answer(text, prompt, _write)
            _print(f" {STOPPED}" if a.stopped else "")
        except KeyboardInterrupt:  # Ctrl-C while loading a model, printing /tokens ...
            _print(f" {STOPPED}")


def run_chat(run_dir: Path, stage: str | None = None, prompt: str | None = None,
             temperature: float = 0.7, top_k: int = 50, top_p: float = 1.0,
             max_tokens: int | None = None, seed: int | None = None,
             system: str | None = None) -> None:
    """The CLI's entry. `prompt`: answer that one message, print only the answer, return."""
    if temperature < 0:
        raise EchoError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if top_k < 0:
        raise EchoError(f"--top-k must be 0 (off) or more, got {top_k}")
    if not 0 < top_p <= 1:
        raise EchoError(f"--top-p must be in (0, 1], got {top_p}")
    if max_tokens is not None and max_tokens < 1:
        raise EchoError(f"--max-tokens must be at least 1, got {max_tokens}")
    if prompt is not None and not prompt.strip():
        raise EchoError("--prompt is empty")
    params = SamplingParams(max_tokens=max_tokens or 1, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed)
    s = ChatSession(run_dir, stage, params, system)
    s.params = replace(params, stop_ids=s.tok.stop_ids,
                       max_tokens=max_tokens or s.model.cfg.max_seq_len // 2)
    try:
        if prompt is not None:
            a = s.ask(prompt, _write)
            _print()
            if a.stopped:
                raise SystemExit(130)
            return
        interactive(s)
    except BrokenPipeError:  # e.g. `echolm chat ... | head`: the reader left, so do we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
