"""Chat formats as data (echolm/chat_format.py): a model imported with its own chat template
(ChatML here, SmolLM2's, with its default system prompt) is prompted and trained in that format
everywhere. The reference is transformers' `apply_chat_template` on the same tokenizer and
template: Echo's ids must equal its ids; the loss mask must cover exactly the answers and their
end-of-turn tokens; templates Echo cannot read are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_gguf import CHATML
from test_import_gguf import smol_tokenizer, write_smol  # noqa: F401 (a fixture)
from tokenizers import Tokenizer as HFTokenizer

from echolm.chat_format import ECHO, ECHO_TEMPLATE, from_template, load_format
from echolm.errors import EchoError
from echolm.import_run import add_echo_specials
from echolm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOL_TEMPLATE = (  # SmolLM2-135M-Instruct's own template, as its GGUF file carries it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is 23 + 58?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Spell 'garden'."},
     {"role": "assistant", "content": " g-a-r-d-e-n "},
     {"role": "user", "content": "  How many r's are in strawberry?\n\n"}],
    [{"role": "user", "content": "h\u00e9llo 123 w\u00f6rld\n x"}],
]


def _pair(hf: HFTokenizer, template: str) -> tuple[Tokenizer, object]:
    """Echo's tokenizer in the template's format and transformers' with the template."""
    hf = HFTokenizer.from_str(hf.to_str())
    add_echo_specials(hf)
    tok = Tokenizer(HFTokenizer.from_str(hf.to_str()), from_template(template, "<|im_end|>"))
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, chat_template=template,
                                                  eos_token="<|im_end|>")
    return tok, theirs


def _their_ids(theirs, msgs: list[dict], gen: bool) -> list[int]:
    out = theirs.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("template", [SMOL_TEMPLATE, CHATML])
def test_chatml_ids_equal_transformers(smol_tokenizer, template):  # noqa: F811
    tok, theirs = _pair(smol_tokenizer, template)
    assert tok.chat.name == "chatml" and tok.chat.bos == ""
    assert tok.chat.turns["user"] == ("<|im_start|>user\n", "<|im_end|>\n")
    assert tok.assistant_end == smol_tokenizer.token_to_id("<|im_end|>")
    for msgs in CONVERSATIONS:
        assert tok.render_prompt(msgs) == _their_ids(theirs, msgs, True), msgs
        full = [*msgs, {"role": "assistant", "content": "23 + 58 = 81."}]
        assert tok.render_conversation(full)[0] == _their_ids(theirs, full, False), msgs
    # a user's "<|im_end|>" stays text (transformers would read it as the token): it cannot
    # end the turn early
    ids = tok.render_user("a <|im_end|> b")
    assert ids.count(tok.assistant_end) == (2 if tok.chat.default_system else 1)
    assert tok.chat.default_system == (SYSTEM if template == SMOL_TEMPLATE else "")


def test_chatml_loss_mask_is_answers_and_their_end(smol_tokenizer):  # noqa: F811
    tok, _ = _pair(smol_tokenizer, SMOL_TEMPLATE)
    msgs = [{"role": "user", "content": "Spell 'cat'."},
            {"role": "assistant", "content": "c-a-t"},
            {"role": "user", "content": "And 'dog'?"},
            {"role": "assistant", "content": " d-o-g"}]
    ids, mask = tok.render_conversation(msgs)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    # each answer and its <|im_end|>; never the "\n" after it, the roles or the system prompt
    assert tok.decode(trained) == "c-a-t<|im_end|> d-o-g<|im_end|>"
    assert trained.count(tok.assistant_end) == 2 and mask[-1] == 0  # the final "\n"
    assert SYSTEM in tok.decode(ids) and "Spell" not in tok.decode(trained)


def test_echo_template_reads_as_echo_format(run_dir):
    tok = Tokenizer.load(run_dir / "tokenizer")
    fmt = from_template(ECHO_TEMPLATE, "<|assistant_end|>", "<|bos|>")
    assert fmt.is_echo() and tok.chat is ECHO
    msgs = CONVERSATIONS[1]
    assert fmt.text(msgs, True) == ECHO.text(msgs, True)
    assert ECHO.text(msgs, True).startswith("<|bos|><|system_start|>Be brief.<|system_end|>")


@pytest.mark.parametrize("template,why", [
    # Llama 2's layout: the system prompt inside the first user turn
    ("{% for m in messages %}{% if m['role']=='user' %}[INST] {% if loop.index0 == 1 %}<<SYS>>"
     "{{ messages[0]['content'] }}<</SYS>> {% endif %}{{ m['content'] }} [/INST]"
     "{% elif m['role']=='assistant' %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
     "{% if add_generation_prompt %} {% endif %}", "not laid out the same way"),
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
     "{% endfor %}", "no generation prompt"),
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
     "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
     "differently"),
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "end-of-turn token"),
    ("{% for m in messages %}{{ m['content'][:3] }}{% endfor %}", "drops or changes"),
    ("{% for m in messages %}", "does not parse"),
    # refuses a shape its first conversations did not have (a raw ValueError before)
    ("{% if add_generation_prompt and messages | length > 4 and messages[-1]['role'] == "
     "'assistant' %}{{ raise_exception('the last message must be the user') }}{% endif %}"
     "{% for m in messages %}<|im_start|>"
     "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
     "fails on a 5-message conversation (the last message must be the user)"),
])
def test_unreadable_templates_are_refused_in_one_line(template, why):
    with pytest.raises(EchoError) as e:
        from_template(template, "<|im_end|>", where="x.gguf: chat template")
    assert why in str(e.value) and str(e.value).startswith("x.gguf: chat template")
    assert "\n" not in str(e.value)


def test_templates_with_loop_controls_read_as_transformers_reads_them():
    """{% break %} and {% continue %} parse in transformers' sandbox (jinja2's loopcontrols):
    here too."""
    template = ("{% for m in messages %}{% if m['content'] == '' %}{% continue %}{% endif %}"
                "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fmt = from_template(template, "<|im_end|>")
    assert fmt.name == "chatml" and fmt.end_of_turn == "<|im_end|>"


def test_imported_run_keeps_its_format_everywhere(smol_tokenizer, tmp_path,  # noqa: F811
                                                  echolm_cli):
    src = tmp_path / "smol.gguf"
    write_smol(src, smol_tokenizer)
    run = tmp_path / "run"
    r = echolm_cli("import", "gguf", src, "--out", run)
    assert r.returncode == 0 and "chat format chatml" in r.stdout, r.stdout + r.stderr
    tok = Tokenizer.load(run / "tokenizer")
    assert tok.chat.name == "chatml" and tok.chat.template == CHATML
    info = json.loads((run / "import.json").read_text())
    assert info["chat_format"]["end_of_turn"] == "<|im_end|>"
    # export hf writes the format's template and end token: transformers prompts as Echo does
    out = tmp_path / "hf"
    r = echolm_cli("export", "hf", "--run", run, "--out", out)
    assert r.returncode == 0, r.stderr
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.eos_token == "<|im_end|>"
    for msgs in CONVERSATIONS:
        assert tok.render_prompt(msgs) == _their_ids(theirs, msgs, True)
    # Echo's format on request, as before
    echo_run = tmp_path / "echo"
    r = echolm_cli("import", "gguf", src, "--out", echo_run, "--chat-format", "echo")
    assert r.returncode == 0 and "chat format echo" in r.stdout
    assert not (echo_run / "tokenizer" / "chat_format.json").exists()
    assert Tokenizer.load(echo_run / "tokenizer").chat is ECHO


def test_source_format_that_cannot_be_read_is_refused(smol_tokenizer, tmp_path,  # noqa: F811
                                                      monkeypatch, echolm_cli):
    import test_import_gguf

    src = tmp_path / "odd.gguf"
    monkeypatch.setattr(test_import_gguf, "CHATML", "{% for m in messages %}{{ m['content'] }}"
                        "{% endfor %}")
    write_smol(src, smol_tokenizer)
    r = echolm_cli("import", "gguf", src, "--out", tmp_path / "a", "--chat-format", "source")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "odd.gguf" in r.stderr
    assert not (tmp_path / "a").exists()
    r = echolm_cli("import", "gguf", src, "--out", tmp_path / "b")  # auto: Echo's, said so
    assert r.returncode == 0 and "keeping Echo's chat format" in r.stdout


@pytest.mark.parametrize("text,why", [
    ("{", "not valid JSON"), ("[]", "JSON object"),
    (json.dumps({"name": "x", "bos": "", "end_of_turn": "e", "default_system": "",
                 "template": "", "turns": {"user": ["a", "b"]}}), "'turns'"),
])
def test_damaged_format_file_is_one_line(tmp_path: Path, text, why):
    (tmp_path / "chat_format.json").write_text(text)
    with pytest.raises(EchoError) as e:
        load_format(tmp_path)
    assert why in str(e.value) and "chat_format.json" in str(e.value)


def test_an_end_of_turn_that_is_not_a_special_token_keeps_echos_format(smol_tokenizer  # noqa: F811
                                                                       ):
    """A file whose template ends turns with text its tokenizer does not treat as one special
    token: `auto` keeps Echo's format (and says why, naming the file); `source` refuses."""
    from types import SimpleNamespace

    from echolm.import_run import choose_format

    hf = HFTokenizer.from_str(smol_tokenizer.to_str())
    hf.add_tokens(["<|my_end|>"])  # added, but not special
    template = CHATML.replace("<|im_end|>", "<|my_end|>")
    src = SimpleNamespace(chat={"template": template, "eos_token": "<|my_end|>"}, tokenizer=hf,
                          bos=None, where="odd.gguf", end_tokens=())
    said: list[str] = []
    assert choose_format(src, "auto", said.append) == (ECHO, False)
    assert "odd.gguf: chat template: its end of turn '<|my_end|>' is not a special token" in (
        said[0])
    with pytest.raises(EchoError, match="is not a special token of the file's tokenizer"):
        choose_format(src, "source")
