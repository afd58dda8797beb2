"""Byte-level BPE tokenizer: trained with Hugging Face `tokenizers`, encoded fast with `tiktoken`.

Training and the saved file (`tokenizer.json`) are Hugging Face's, so any tool can load it.
Encoding large text goes through a `tiktoken` encoding built from the same merge ranks, which
gives the same ids (tested) several times faster. The chat format lives here too: special
tokens and `render_conversation`, which marks the tokens the assistant is trained on.

A tokenizer imported with a Hugging Face model (`echolm import hf`, see echolm/hf.py) cuts text
its own way (another split pattern, or SentencePiece-style pieces): it is not "native", and
encodes through `tokenizers` itself; Echo's special tokens were added to it on import. It may
also bring its own chat format (echolm/chat_format.py, saved beside tokenizer.json): every
conversation is rendered through `Tokenizer.chat`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import tiktoken
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from echolm.atomic import atomic_path
from echolm.chat_format import ECHO, ROLES, ChatFormat, load_format
from echolm.errors import EchoError

# GPT-4's pre-split pattern, except that numbers are cut into single digits (as Llama does):
# small models learn arithmetic far more easily when every digit is its own token.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
BOS = "<|bos|>"
SPECIAL_TOKENS = [
    BOS,
    "<|system_start|>", "<|system_end|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|tool_start|>", "<|tool_end|>",  # room for tool calls ...
    "<|output_start|>", "<|output_end|>",  # ... and their outputs
    "<|pad|>",
]


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes->printable-unicode table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _is_native(hf: HFTokenizer) -> bool:
    """Whether `hf` cuts text as Echo's own tokenizers do (byte-level BPE with Echo's split
    pattern, no normalizer), so that the tiktoken path gives its ids."""
    ref = HFTokenizer(models.BPE())
    ref.pre_tokenizer = _pre_tokenizer()
    return (isinstance(hf.model, models.BPE) and hf.normalizer is None
            and hf.pre_tokenizer is not None
            and hf.pre_tokenizer.__getstate__() == ref.pre_tokenizer.__getstate__())


def _piece_bytes(piece: str, dec: dict[str, int], byte_level: bool) -> bytes:
    """The bytes a vocabulary entry spells: byte-level BPE (GPT-2 alphabet), SentencePiece
    byte fallback (`<0x0A>`), or a SentencePiece piece (`▁` is a space)."""
    if byte_level and all(c in dec for c in piece):
        return bytes(dec[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE with every byte in the base alphabet and the chat special tokens."""
    minimum = 256 + len(SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise EchoError(f"tokenizer.vocab_size={vocab_size} is too small: it must hold 256 bytes "
                        f"+ {len(SPECIAL_TOKENS)} special tokens + at least one merge "
                        f"(>= {minimum})")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = _pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def special_tokens(hf: HFTokenizer) -> dict[str, int]:
    """The tokenizer's special (added, never split) tokens: text -> id."""
    return {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}


class Tokenizer:
    def __init__(self, hf: HFTokenizer, chat: ChatFormat = ECHO) -> None:
        self.hf = hf
        self.special = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        if None in self.special.values():
            missing = [t for t, i in self.special.items() if i is None]
            raise EchoError(f"tokenizer lacks Echo's special tokens {missing}")
        self.bos = self.special[BOS]
        self.pad = self.special["<|pad|>"]
        self.native = _is_native(hf)
        if not self.native:  # imported: encode with `tokenizers`, special-token text stays text
            hf.encode_special_tokens = True
        self.chat = chat
        self._specials = special_tokens(hf)
        for t in (chat.end_of_turn, *chat.stops):
            if t not in self._specials:
                raise EchoError(f"chat format {chat.name!r}: {t!r} is not a special token of "
                                "the tokenizer")
        # the id that ends an assistant turn (trained on; decoding stops there) and every id
        # that ends decoding: also <|bos|>, the end of a document for a base model
        self.assistant_end = self._specials[chat.end_of_turn]
        self.stop_ids = tuple(dict.fromkeys(
            [self.assistant_end, *(self._specials[t] for t in chat.stops), self.bos]))
        self._marks: dict[str, list[int]] = {}

    # ---- persistence -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise EchoError(f"{file}: no tokenizer here (run `echolm tokenizer train` first)")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # the library raises plain Exceptions for corrupt files
            raise EchoError(f"{file}: not a valid tokenizer.json ({e})") from None
        return cls(hf, load_format(file.parent))

    def save(self, folder: str | Path) -> None:
        """tokenizer.json, and chat_format.json when the format is not Echo's."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "tokenizer.json") as tmp:
            self.hf.save(str(tmp))
        if self.chat is not ECHO:
            self.chat.save(folder)

    # ---- basic encode / decode ---------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @cached_property
    def tiktoken(self) -> tiktoken.Encoding:
        """The same BPE as a tiktoken Encoding: merge rank == token id (HF appends merges in
        order, so ids already are ranks)."""
        dec = _byte_decoder()
        specials = set(SPECIAL_TOKENS)
        ranks = {bytes(dec[c] for c in tok): i
                 for tok, i in self.hf.get_vocab().items() if tok not in specials}
        return tiktoken.Encoding(name="echolm", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=self.special)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (special-token strings in the text are treated as text)."""
        if not self.native:
            return self.hf.encode(text, add_special_tokens=False).ids
        return self.tiktoken.encode_ordinary(text)

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        if not self.native:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        return self.tiktoken.encode_ordinary_batch(texts, num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        dec = _byte_decoder()
        vocab = self.hf.get_vocab()
        out = [b""] * max(self.vocab_size, max(vocab.values()) + 1)
        specials = set(self.special.values()) | {
            i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        byte_level = isinstance(self.hf.decoder, decoders.ByteLevel)
        for tok, i in vocab.items():
            if i not in specials:
                out[i] = _piece_bytes(tok, dec, byte_level)
        return out

    def pieces(self, text: str) -> list[tuple[int, str]]:
        """(id, readable piece) for each token of `text`: how the text is cut."""
        out = []
        for i in self.encode(text):
            b = self.token_bytes[i]
            out.append((i, b.decode("utf-8", errors="backslashreplace")))
        return out

    # ---- chat format -------------------------------------------------------------------
    def _parts(self, text: str) -> list[int | str]:
        """A chat format's own text (its markers) cut into special-token ids and plain text."""
        if text not in self._marks:
            parts: list[int | str] = []
            rest = text
            while rest:
                at = [(rest.find(t), -len(t), t) for t in self._specials if t in rest]
                if not at:
                    parts.append(rest)
                    break
                pos, _, tok = min(at)
                parts += [rest[:pos]] if pos else []
                parts.append(self._specials[tok])
                rest = rest[pos + len(tok):]
            self._marks[text] = parts
        return self._marks[text]

    def format_ids(self, text: str) -> list[int]:
        """Ids of a chat format's own text: special tokens by name, the rest as text."""
        return self._ids(self._parts(text))

    def _ids(self, parts: list[int | str]) -> list[int]:
        return [i for p in parts for i in ([p] if isinstance(p, int) else self.encode(p))]

    def _turn(self, role: str, content: str) -> tuple[list[int], list[int]]:
        """Ids and loss mask of one message with the format's text around it. Plain text that
        touches the message (ChatML's "user\n" before it) is encoded together with it, as a
        tokenizer reading the whole conversation would (a leading space can merge into it)."""
        before, after = self.chat.turns[role]
        pre, post = list(self._parts(before)), list(self._parts(after))
        lead = pre.pop() if pre and isinstance(pre[-1], str) else ""
        trail = post.pop(0) if post and isinstance(post[0], str) else ""
        mid = self.encode(lead + content + trail)
        k, seen, n_lead = 0, 0, len(lead.encode("utf-8"))  # tokens that are all `lead`
        while k < len(mid) and seen + len(self.token_bytes[mid[k]]) <= n_lead and n_lead:
            seen += len(self.token_bytes[mid[k]])
            k += 1
        pre_ids, post_ids = self._ids(pre), self._ids(post)
        ids = pre_ids + mid + post_ids
        if role != "assistant":
            return ids, [0] * len(ids)
        # the answer, and the format's text up to and including its end-of-turn token, are
        # learned; what follows that token (ChatML's newline) is not: decoding stops before it
        end = post_ids.index(self.assistant_end) + 1 if self.assistant_end in post_ids else 0
        return ids, ([0] * (len(pre_ids) + k) + [1] * (len(mid) - k + end)
                     + [0] * (len(post_ids) - end))

    def render_conversation(self, messages: list[dict], where: str = "conversation"
                            ) -> tuple[list[int], list[int]]:
        """Ids and a 0/1 mask (1 = trained on) for a whole conversation, in `self.chat`.

        Echo's format: <|bos|> [<|system_start|> text <|system_end|>] then turns of
        <|user_start|> text <|user_end|> <|assistant_start|> text <|assistant_end|>.
        The model learns only the assistant's text and its end-of-turn token: it should learn
        to answer and to stop, never to imitate the user.
        """
        for k, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise EchoError(f"{where}: message {k} is not an object")
            role, content = msg.get("role"), msg.get("content")
            if role not in ROLES:
                raise EchoError(f"{where}: message {k}: role must be one of {ROLES}, "
                                f"got {role!r}")
            if not isinstance(content, str):
                raise EchoError(f"{where}: message {k}: 'content' must be a string")
            if role == "system" and k != 0:
                raise EchoError(f"{where}: message {k}: a system message must come first")
        ids = self.format_ids(self.chat.bos)
        mask = [0] * len(ids)
        for msg in self.chat.with_system(messages):
            t_ids, t_mask = self._turn(msg["role"], msg["content"])
            ids += t_ids
            mask += t_mask
        return ids, mask

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation ending with an open assistant turn, ready to generate."""
        if messages and messages[-1].get("role") == "assistant":
            raise EchoError("the last message must not be the assistant's when prompting")
        ids, _ = self.render_conversation(messages)
        return ids + self.format_ids(self.chat.turns["assistant"][0])

    def render_user(self, text: str) -> list[int]:
        """Ids of one user message and the open assistant turn: what every stage samples
        answers to (RL, ranking, evaluation, the gold measurement)."""
        return self.render_prompt([{"role": "user", "content": text}])


def iter_texts(texts: Iterable[str], limit_bytes: int) -> Iterator[str]:
    """Yield texts until about `limit_bytes` have been yielded (a BPE trainer's input budget)."""
    seen = 0
    for t in texts:
        if seen >= limit_bytes:
            return
        t = t[: limit_bytes - seen]
        seen += len(t.encode("utf-8"))
        yield t
