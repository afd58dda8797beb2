"""`echolm export gguf` checked in llama.cpp itself (through llama-cpp-python).

For an Echo-trained run (default: runs/demo, stage sft) and for two imported Hugging Face
checkpoints built here (random weights, own byte-level BPE: a Llama with GPT-2's split and a
Qwen2 with Qwen2's split, saved with save_pretrained and brought in with `echolm import hf`),
each exported as f32 (and the run also as f16 and q8_0):

* tokenization: llama.cpp's ids for varied text (unicode, digits, runs of newlines and
  spaces, contractions, code, emoji) equal Echo's, with and without the BOS it adds;
* chat: the file's chat template, rendered as llama-cpp-python renders it and tokenized by
  llama.cpp with special tokens parsed, gives Echo's prompt ids (chat stages);
* greedy decoding: 64 steps on 3 prompts, llama.cpp's argmax of its logits after each token
  against Echo's own engine (`echolm.engine.generate_ids`, temperature 0); the largest
  |logit difference| over all steps is reported too. Where the two part, the step is a
  near-tie when Echo's margin between the two tokens is within the logit difference measured
  there (random weights, as the imported checkpoints have, make those likely): reported as
  such; any other parting is a failure.

llama-cpp-python is a source build of llama.cpp (cmake and a C++ compiler; many minutes on
a small machine), so it is an optional extra, never part of `make test`:

    .venv/bin/pip install -e '.[llamacpp]'
    python bench/gguf_llamacpp.py [--run runs/demo] [--stage sft]

The last line of stdout is one JSON object; the exit status is 1 when an f32 file differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

if importlib.util.find_spec("llama_cpp") is None:
    sys.exit("gguf_llamacpp.py needs llama.cpp's Python binding, which is not installed: "
             "`.venv/bin/pip install -e '.[llamacpp]'` (builds llama.cpp from source: cmake "
             "and a C++ compiler, many minutes)")

from common import emit_json  # noqa: E402

from echolm.checkpoint import load_model  # noqa: E402
from echolm.engine import SamplingParams, generate_ids  # noqa: E402
from echolm.export_gguf import QWEN2_PATTERN, export_gguf  # noqa: E402
from echolm.hf import import_hf  # noqa: E402
from echolm.tokenizer import Tokenizer  # noqa: E402

STEPS = 64
TEXTS = [
    "The quick brown fox jumps over the lazy dog.", " leading space", "trailing space ",
    "It's 12:30 -- we'll see; they'RE here, I'D go, you've, she'd, 'tis", "don't\n's 'll",
    "x = 1234567890\n\n\n\tdef f(a, b):\n        return a+b  # sum\r\n\r\n}",
    "naïve café, Zürich, Ελληνικά, русский, 北京 東京 서울, عربى, हिन्दी",
    "🙂👍🏽👨‍👩‍👧 — “quoted” ‘single’ …", "   \n \n  \t\t  spaces   and\ttabs  ",
    "3.14159e-10 +42 -7 ١٢٣ ²³ ½ 1,000,000", "a\u00a0b\u2003c \u200bd\u3000e",
    "<|bos|> <|user_start|> special-token text stays text", "!!!???...\n\n!!  --==>>",
    "```python\nprint('hi')\n```\n\n\n\n", "it'\u017ft (long s after an apostrophe)", "",
]
CHAT_PROMPTS = ["What is 12 + 30?", "Write one sentence about the sea.",
                "Spell the word 'cat' backwards, please!"]
DOC_PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):\n"]


def echo_greedy(model, tok: Tokenizer, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    steps: list[torch.Tensor] = []
    out = [int(t[0]) for t in generate_ids(
        model, [prompt], SamplingParams(max_tokens=STEPS, temperature=0.0), pad_id=tok.pad,
        on_draw=lambda _rows, logits, _next: steps.append(logits[0].float().clone()))]
    return out, steps


def llama_greedy(llm, prompt: list[int], echo_logits: list[torch.Tensor]
                 ) -> tuple[list[int], list[float]]:
    """llama.cpp's greedy tokens, and each step's largest |logit diff| to Echo's."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    out, diffs = [], []
    for i in range(STEPS):
        logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        ref = echo_logits[i].numpy()
        diffs.append(float(np.abs(logits[: len(ref)] - ref).max()))
        out.append(int(logits.argmax()))
        if i < STEPS - 1:
            llm.eval([out[-1]])
    return out, diffs


def check_file(path: Path, run: Path, stage: str, label: str, chat: bool) -> dict:
    from llama_cpp import Llama

    tok = Tokenizer.load(run / "tokenizer")
    model = load_model(run / stage).eval()
    llm = Llama(model_path=str(path), n_ctx=model.cfg.max_seq_len, n_threads=2,
                logits_all=True, verbose=False)
    res: dict = {"file": path.name, "tokenize_equal": 0, "tokenize_total": len(TEXTS)}
    for text in TEXTS:
        ours = tok.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        with_bos = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if theirs == ours and with_bos == [tok.bos, *ours]:
            res["tokenize_equal"] += 1
        else:
            print(f"  {label}: tokenization differs on {text!r}:\n    echo  {ours}\n"
                  f"    llama {theirs}")
    if chat:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata["tokenizer.chat_template"]
        fmt = Jinja2ChatFormatter(template, eos_token="<|assistant_end|>", bos_token="<|bos|>")
        ok = 0
        for q in CHAT_PROMPTS:
            text = fmt(messages=[{"role": "user", "content": q}]).prompt
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            ok += ids == tok.render_user(q)
        res["chat_template_equal"] = ok
    prompts = ([tok.render_user(q) for q in CHAT_PROMPTS] if chat else
               [[tok.bos, *tok.encode(d)] for d in DOC_PROMPTS])
    same, worst, ties, real = [], 0.0, [], []
    with torch.no_grad():
        for p in prompts:
            ours, logits = echo_greedy(model, tok, p)
            theirs, diffs = llama_greedy(llm, p, logits)
            agree = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b),
                         len(ours))
            same.append(agree)
            # up to the first different token both sides saw the same text
            worst = max(worst, *diffs[: agree + 1])
            tie = ""
            if agree < STEPS:  # a near-tie: Echo's own two candidates closer than the sides
                margin = float(logits[agree][ours[agree]] - logits[agree][theirs[agree]])
                if margin <= diffs[agree]:
                    ties.append(agree)
                    tie = (f" (a near-tie at step {agree + 1}: Echo's margin {margin:.2g} <= "
                           f"the logit difference {diffs[agree]:.2g} there)")
                else:
                    real.append(agree)
            print(f"  {label}: prompt {len(p)} tokens -> {agree}/{STEPS} greedy tokens equal"
                  f"{tie}; echo {tok.decode(ours)[:60]!r}")
    res.update(greedy_equal_steps=same, max_logit_diff=worst, near_ties=ties,
               differs=bool(real))
    print(f"{label}: tokenization {res['tokenize_equal']}/{len(TEXTS)} texts equal"
          + (f", chat template {ok}/{len(CHAT_PROMPTS)} prompts equal" if chat else "")
          + f", greedy {same} of {STEPS} steps equal, max |logit diff| {worst:.3g}")
    llm.close()
    return res


def foreign_checkpoint(folder: Path, kind: str) -> Path:
    """A small random `kind` model with its own byte-level BPE (GPT-2's split for llama,
    Qwen2's for qwen2), trained here on Echo's own source text."""
    import transformers
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    root = Path(__file__).resolve().parent.parent
    texts = [p.read_text(encoding="utf-8") for p in sorted((root / "echolm").rglob("*.py"))]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if kind == "llama"
                        else pre_tokenizers.Sequence([
                            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-5))
    with torch.no_grad():  # random weights of a trained model's scale: distinct logits
        for p in model.parameters():
            p.normal_(1.0 if p.ndim == 1 else 0.0, 0.1 if p.ndim == 1 else 0.08)
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<|endoftext|>",
                                         eos_token="<|im_end|>").save_pretrained(folder)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="an Echo run")
    ap.add_argument("--stage", default="sft")
    ap.add_argument("--no-import", action="store_true", help="skip the imported checkpoints")
    a = ap.parse_args()
    torch.set_num_threads(2)
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}")
    results, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jobs = [(a.run, a.stage, d, f"{a.run.name}/{a.stage} {d}", a.stage != "base")
                for d in ("f32", "f16", "q8_0")]
        if not a.no_import:
            for kind in ("llama", "qwen2"):
                src = foreign_checkpoint(tmp / f"src-{kind}", kind)
                import_hf(src, tmp / f"imported-{kind}", log=lambda *_: None)
                jobs.append((tmp / f"imported-{kind}", "base", "f32", f"imported {kind} f32",
                             False))
        for run, stage, dtype, label, chat in jobs:
            path = tmp / f"{label.replace('/', '-').replace(' ', '-')}.gguf"
            info = export_gguf(run, path, stage=stage, dtype=dtype, log=lambda *_: None)
            res = check_file(path, run, stage, label, chat)
            res.update(architecture=info["architecture"], pre=info["pre_tokenizer"])
            results[label] = res
            if dtype == "f32":
                ok &= (res["tokenize_equal"] == len(TEXTS)
                       and not res["differs"]  # 64 equal steps, or parted at a near-tie
                       and res.get("chat_template_equal", len(CHAT_PROMPTS)) == len(CHAT_PROMPTS))
    print("every f32 file equals Echo in llama.cpp" if ok else "llama.cpp DIFFERS from Echo")
    emit_json({"bench": "gguf_llamacpp", "ok": ok, "steps": STEPS, "results": results})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
