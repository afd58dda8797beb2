"""Chat formats as data: the text around each message of a conversation.

A chat model was trained on conversations laid out one particular way, and it only behaves
when it is prompted the same way. Echo's own models use Echo's format (`ECHO`); a model
imported from an open checkpoint keeps its own (SmolLM2's ChatML:
``<|im_start|>user\\n...<|im_end|>\\n``, with a default system prompt). A format is a few
strings, saved as ``DIR/tokenizer/chat_format.json`` beside the tokenizer it belongs to
(no file = Echo's format), and `echolm.tokenizer.Tokenizer` renders every conversation through
it: chat, serve, SFT loss masks, RL prompts, rankings, DPO pairs, evaluation, export.

A format is read from a model's Jinja chat template (`from_template`) by rendering probe
conversations with marker texts and cutting the output around the markers; the result is then
checked by rendering more conversations both ways, so a template whose layout is not "prefix,
message, suffix" per role (one that merges the system prompt into the first user turn, say)
is refused with a one-line reason rather than half understood.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from echolm.atomic import atomic_write_json
from echolm.errors import EchoError

ROLES = ("system", "user", "assistant")
FILE = "chat_format.json"

# Echo's chat format as a Jinja template (what `echolm export` writes for Echo's format). The
# {% generation %} block marks what Echo trains on (assistant text and its end token), so
# transformers' `return_assistant_tokens_mask=True` gives Echo's loss mask.
ECHO_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('role must be system, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' and not loop.first -%}"
    "{{- raise_exception('a system message must come first') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- generation -%}{{- message['content'] + '<|assistant_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '_start|>' + message['content'] + '<|' + message['role']"
    " + '_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation is laid out as text (special tokens written as their text)."""
    name: str  # "echo", or where it came from ("chatml" for an <|im_start|> layout, "source")
    bos: str  # text at the very start of a conversation ("" = none)
    turns: dict[str, tuple[str, str]]  # role -> (text before the message, text after it)
    end_of_turn: str  # the special token that ends an assistant turn: trained on, stops decoding
    stops: tuple[str, ...] = ()  # more special tokens that end decoding (end of document, eos)
    default_system: str = ""  # the system prompt used when a conversation has none ("" = none)
    template: str = ECHO_TEMPLATE  # the Jinja template (exports write it)

    def text(self, messages: list[dict], generation_prompt: bool = False) -> str:
        """The conversation as one string (what the Jinja template renders)."""
        msgs = self.with_system(messages)
        out = self.bos + "".join(self.turns[m["role"]][0] + m["content"] + self.turns[m["role"]][1]
                                 for m in msgs)
        return out + (self.turns["assistant"][0] if generation_prompt else "")

    def with_system(self, messages: list[dict]) -> list[dict]:
        """`messages` with the default system prompt first when they have no system message."""
        if self.default_system and (not messages or messages[0].get("role") != "system"):
            return [{"role": "system", "content": self.default_system}, *messages]
        return messages

    def save(self, folder: Path) -> None:
        atomic_write_json(folder / FILE, {**asdict(self), "turns": {
            r: list(v) for r, v in self.turns.items()}, "stops": list(self.stops)})

    def is_echo(self) -> bool:
        return (self.bos, self.turns, self.end_of_turn, self.default_system) == (
            ECHO.bos, ECHO.turns, ECHO.end_of_turn, ECHO.default_system)


ECHO = ChatFormat("echo", "<|bos|>", {r: (f"<|{r}_start|>", f"<|{r}_end|>") for r in ROLES},
                  "<|assistant_end|>", ("<|bos|>",))


def load_format(folder: Path) -> ChatFormat:
    """The chat format saved beside a tokenizer (`folder/chat_format.json`), else Echo's."""
    path = folder / FILE
    if not path.exists():
        return ECHO
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EchoError(f"{path}: not valid JSON ({e}); re-import the model") from None
    if not isinstance(d, dict):
        raise EchoError(f"{path}: expected a JSON object; re-import the model")
    for key in ("name", "bos", "end_of_turn", "default_system", "template"):
        if not isinstance(d.get(key), str):
            raise EchoError(f"{path}: '{key}' must be a string; re-import the model")
    turns = d.get("turns")
    if not (isinstance(turns, dict) and set(turns) == set(ROLES) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(s, str) for s in v)
            for v in turns.values())):
        raise EchoError(f"{path}: 'turns' must map system, user and assistant to [before, "
                        "after] strings; re-import the model")
    stops = d.get("stops", [])
    if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise EchoError(f"{path}: 'stops' must be a list of strings; re-import the model")
    return ChatFormat(d["name"], d["bos"], {r: tuple(v) for r, v in turns.items()},
                      d["end_of_turn"], tuple(stops), d["default_system"], d["template"])


# ---- reading a Jinja chat template ------------------------------------------------------------

_MARK = {k: f"\u2983{k}-{v}\u2984" for k, v in
         {"B": "bos", "S": "sys", "U": "usr", "A": "ast", "U2": "usr2", "A2": "ast2"}.items()}


def _jinja(template: str, where: str) -> Any:
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' {% generation %} marker: render its body
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(msg: str) -> None:
        raise ValueError(msg)

    # as transformers' own sandbox: {% break %} / {% continue %} (loopcontrols) parse too
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except Exception as e:  # jinja2's TemplateSyntaxError and friends
        raise EchoError(f"{where}: the chat template does not parse ({e})") from None


def from_template(template: str, eos_token: str | None, bos_token: str = "",
                  where: str = "chat template") -> ChatFormat:
    """Read a "prefix, message, suffix per role" format off a Jinja chat template; EchoError
    (one line) if the template is laid out otherwise or its end-of-turn token is unknown."""
    tmpl = _jinja(template, where)

    def render(pairs: list[tuple[str, str]], gen: bool, bos: str = bos_token) -> str:
        msgs = [{"role": r, "content": _MARK[m]} for r, m in pairs]
        try:
            return tmpl.render(messages=msgs, add_generation_prompt=gen, bos_token=bos,
                               eos_token=eos_token or "")
        except Exception as e:  # the template's own raise_exception, undefined names ...
            raise EchoError(f"{where}: the chat template failed on a plain conversation "
                            f"({e})") from None

    def cut(text: str, *marks: str) -> list[str]:
        parts, rest = [], text
        for m in marks:
            head, sep, rest = rest.partition(_MARK[m])
            if not sep:
                raise EchoError(f"{where}: the chat template drops or changes message text "
                                "(Echo needs each message as it is)")
            parts.append(head)
        return [*parts, rest]

    if not eos_token:
        raise EchoError(f"{where}: no end-of-turn token is known for the chat template")
    full = render([("system", "S"), ("user", "U"), ("assistant", "A"), ("user", "U2"),
                   ("assistant", "A2")], False)
    head, s_u, u_a, a_u2, u2_a2, tail = cut(full, "S", "U", "A", "U2", "A2")
    one = render([("user", "U")], False)
    gen = render([("user", "U")], True)
    if gen == one:
        raise EchoError(f"{where}: the chat template writes no generation prompt "
                        "(add_generation_prompt adds nothing)")
    if not gen.startswith(one):
        raise EchoError(f"{where}: the generation prompt is not appended to the conversation")
    a_pre, a_suf = gen[len(one):], tail
    if eos_token not in a_suf:
        raise EchoError(f"{where}: the end-of-turn token {eos_token!r} does not follow an "
                        "assistant message in the chat template")
    if not (a_u2.startswith(a_suf) and u_a.endswith(a_pre) and u_a == u2_a2):
        raise EchoError(f"{where}: the chat template's turns are not laid out the same way "
                        "each time (prefix, message, suffix per role)")
    u_pre = a_u2[len(a_suf):]
    u_suf = u_a[: len(u_a) - len(a_pre)]
    if not s_u.endswith(u_pre):
        raise EchoError(f"{where}: the system message is not a turn of its own")
    s_suf = s_u[: len(s_u) - len(u_pre)]
    # the text at the start: the template's {{ bos_token }} (rendered as a marker to tell it
    # apart from the same text starting a turn), or a literal one (Echo's '<|bos|>'): what a
    # one-user conversation has before its turn that a system turn starts with too
    lead = cut(one, "U")[0]
    if render([("user", "U")], False, _MARK["B"]).startswith(_MARK["B"]):
        bos = bos_token
    else:
        before = lead[: len(lead) - len(u_pre)] if lead.endswith(u_pre) else ""
        bos = before if head.startswith(before) else ""
    s_pre = head[len(bos):]
    # a default system prompt: one-user conversations get a system turn nobody wrote
    default = ""
    if lead != bos + u_pre:
        if not (lead.startswith(bos + s_pre) and lead.endswith(s_suf + u_pre)):
            raise EchoError(f"{where}: the chat template adds text before the first user "
                            "turn that is not a system turn")
        default = lead[len(bos + s_pre): len(lead) - len(s_suf + u_pre)]
    fmt = ChatFormat("chatml" if u_pre.startswith("<|im_start|>") else "source", bos,
                     {"system": (s_pre, s_suf), "user": (u_pre, u_suf),
                      "assistant": (a_pre, a_suf)}, eos_token, (), default, template)
    _check(fmt, tmpl, bos_token, eos_token, where)
    return fmt


def _check(fmt: ChatFormat, tmpl: Any, bos_token: str, eos_token: str, where: str) -> None:
    """Render conversations of other shapes both ways: the format must give the same text."""
    cases = [[("user", "hi")], [("system", "be brief"), ("user", "hi")],
             [("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?")],
             [("system", "s"), ("user", "a\nb"), ("assistant", " c "), ("user", "d"),
              ("assistant", "e")]]
    for pairs in cases:
        msgs = [{"role": r, "content": c} for r, c in pairs]
        for gen in (False, True):
            try:  # a template may refuse a shape (raise_exception): it then is not this format
                theirs = tmpl.render(messages=msgs, add_generation_prompt=gen,
                                     bos_token=bos_token, eos_token=eos_token)
            except Exception as e:  # jinja2's errors and what the template raises
                raise EchoError(f"{where}: the chat template fails on a {len(msgs)}-message "
                                f"conversation ({e})") from None
            if theirs != fmt.text(msgs, gen):
                raise EchoError(f"{where}: the chat template lays out {len(msgs)}-message "
                                "conversations differently from its first ones")


def format_dict(fmt: ChatFormat) -> dict[str, Any]:
    """What a summary shows of a format."""
    d = asdict(fmt)
    d.pop("template")
    return d

