"""The `echolm` command: one sub-command per stage, plus the whole pipeline. Thin: it parses
arguments, then calls one function. User errors print one line and exit 2 (no traceback)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from echolm.errors import EchoError


def _run_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--out", "--run", dest="run", type=Path, required=out_required,
                   help="run directory (e.g. runs/demo)")
    p.add_argument("--preset", default=None,
                   help="preset name (micro, cpu, gpu-small, gpu-d20) or a TOML file; default: "
                        "the run's saved config, else cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="override any config field (repeatable)")
    p.add_argument("--force", action="store_true", help="redo the stage even if finished")


def cmd_data(a: argparse.Namespace) -> None:
    from echolm.data.builtin import build_builtin_corpus

    folder = build_builtin_corpus(force=a.force)
    manifest = json.loads((folder / "manifest.json").read_text())
    print(f"built-in corpus in {folder}")
    print(json.dumps(manifest.get("totals", manifest), indent=2))


def cmd_tokenizer(a: argparse.Namespace) -> None:
    from echolm.tokenizer import Tokenizer

    if a.action == "train":
        from echolm.pipeline import resolve_run_config
        from echolm.train.tokenize import run_tokenizer

        cfg = resolve_run_config(a.run, a.preset, a.overrides)
        run_tokenizer(cfg, a.run, force=a.force)
        return
    tok = Tokenizer.load(a.run / "tokenizer")
    text = a.text if a.text is not None else sys.stdin.read()
    if a.action == "encode":
        print(json.dumps(tok.encode(text)))
        return
    pieces = tok.pieces(text)  # show
    if a.json:
        print(json.dumps([{"id": i, "piece": s} for i, s in pieces], ensure_ascii=False))
        return
    colors = ["\x1b[48;5;153m", "\x1b[48;5;223m", "\x1b[48;5;194m", "\x1b[48;5;218m"]
    color = sys.stdout.isatty()
    line = "".join((colors[k % 4] + s + "\x1b[0m") if color else f"[{s}]"
                   for k, (_, s) in enumerate(pieces))
    print(line)
    print(f"{len(pieces)} tokens, {len(text.encode('utf-8'))} bytes "
          f"({len(text.encode('utf-8')) / max(len(pieces), 1):.2f} bytes/token)")
    print("ids:", " ".join(str(i) for i, _ in pieces))


def cmd_pretrain(a: argparse.Namespace) -> None:
    from echolm.pipeline import resolve_run_config
    from echolm.train.pretrain import run_pretrain

    if a.resume and not (a.run / "base" / "ckpt" / "latest").exists():  # before writing
        raise EchoError(f"{a.run / 'base'}: no checkpoint to resume from")
    cfg = resolve_run_config(a.run, a.preset, a.overrides)
    run_pretrain(cfg, a.run, force=a.force)


def cmd_sft(a: argparse.Namespace) -> None:
    from echolm.pipeline import resolve_run_config
    from echolm.train.sft import run_sft

    cfg = resolve_run_config(a.run, a.preset, a.overrides)
    run_sft(cfg, a.run, force=a.force)


def cmd_rl(a: argparse.Namespace) -> None:
    from echolm.pipeline import resolve_run_config
    from echolm.train.grpo import run_rl

    cfg = resolve_run_config(a.run, a.preset, a.overrides)
    run_rl(cfg, a.run, force=a.force)


def cmd_run(a: argparse.Namespace) -> None:
    from echolm.pipeline import resolve_run_config, run_pipeline

    cfg = resolve_run_config(a.run, a.preset, a.overrides)
    summary = run_pipeline(cfg, a.run, force=a.force)
    print(json.dumps(summary, indent=2))


def cmd_chat(a: argparse.Namespace) -> None:
    from echolm.chat import run_chat

    run_chat(a.run, stage=a.stage, prompt=a.prompt, temperature=a.temperature, top_k=a.top_k,
             top_p=a.top_p, max_tokens=a.max_tokens, seed=a.seed, system=a.system)


def cmd_explain(a: argparse.Namespace) -> None:
    from echolm.explain import run_explain

    run_explain(a.run, a.text, stage=a.stage, top_k=a.top_k, generate=a.generate,
                temperature=a.temperature, seed=a.seed, chat=a.chat, as_json=a.json)


def cmd_presets(a: argparse.Namespace) -> None:
    from echolm.config import load_config

    cfg = load_config(a.name, a.overrides)
    print(json.dumps(cfg.to_dict(), indent=2))


def build_parser() -> argparse.ArgumentParser:
    from echolm.config import list_presets

    parser = argparse.ArgumentParser(
        prog="echolm", description="Echo: build a chat language model end to end and see what "
        "each step did. Stages: data -> tokenizer -> pretrain -> sft -> rl (more to come).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run every stage into one run directory (resumable)")
    _run_args(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("data", help="build the built-in offline corpus")
    p.add_argument("source", choices=["builtin"], help="which corpus")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("tokenizer", help="train a BPE tokenizer, or show how text is cut")
    p.add_argument("action", choices=["train", "encode", "show"])
    p.add_argument("text", nargs="?", help="text to encode/show (default: stdin)")
    p.add_argument("--json", action="store_true", help="machine-readable output for show")
    _run_args(p)
    p.set_defaults(fn=cmd_tokenizer)

    p = sub.add_parser("pretrain", help="pretrain the base model (resumes automatically)")
    _run_args(p)
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint to resume from (resuming is automatic anyway)")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("chat", help="talk to a run's model in the terminal (or answer one "
                       "--prompt)")
    p.add_argument("--run", "--out", dest="run", type=Path, required=True, help="run directory")
    p.add_argument("--stage", default=None,
                   help="base, sft, rl, rlhf or dpo (default: the latest present)")
    p.add_argument("--prompt", default=None, help="answer this one message, print only the answer")
    p.add_argument("--system", default=None, help="a system message to start the conversation")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="longest answer (default: half the model's context)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("explain", help="show how text is cut into tokens and what the model "
                       "predicts next at each one")
    p.add_argument("text", nargs="?", help="the text (default: stdin)")
    p.add_argument("--run", "--out", dest="run", type=Path, required=True, help="run directory")
    p.add_argument("--stage", default=None,
                   help="base, sft, rl, rlhf or dpo (default: the latest present)")
    p.add_argument("--top-k", type=int, default=5, help="candidates shown per position")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="then continue the text N tokens, showing each choice")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="for --generate: 0 = greedy (default), else sample")
    p.add_argument("--seed", type=int, default=None, help="seed for sampled --generate")
    p.add_argument("--chat", action="store_true",
                   help="wrap the text as a user message, to see the assistant's first tokens")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("sft", help="supervised fine-tuning on conversations (resumes "
                       "automatically)")
    _run_args(p)
    p.set_defaults(fn=cmd_sft)

    p = sub.add_parser("rl", help="reinforcement learning on checkable tasks (GRPO family; "
                       "resumes automatically)")
    _run_args(p)
    p.set_defaults(fn=cmd_rl)

    p = sub.add_parser("presets", help="print a preset's full configuration")
    p.add_argument("name", nargs="?", default="cpu", help=f"one of {', '.join(list_presets())}")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE")
    p.set_defaults(fn=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except EchoError as e:
        print(f"echolm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\necholm: interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
