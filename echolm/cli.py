"""The `echolm` command: one sub-command per stage, plus the whole pipeline. Thin: it parses
arguments, then calls one function. User errors print one line and exit 2 (no traceback)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from echolm.cli_args import SEED, number, run_args, stage_settings
from echolm.errors import EchoError


def cmd_data(a: argparse.Namespace) -> None:
    from echolm.data.builtin import build_builtin_corpus
    from echolm.runfiles import read_json

    folder = build_builtin_corpus(force=a.force)
    manifest = read_json(folder / "manifest.json", "rebuild it: `echolm data builtin --force`")
    print(f"built-in corpus in {folder}")
    print(json.dumps(manifest.get("totals", manifest), indent=2))


def cmd_tokenizer(a: argparse.Namespace) -> None:
    from echolm.tokenizer import Tokenizer

    if a.action == "train":
        from echolm.pipeline import run_config
        from echolm.train.tokenize import run_tokenizer

        with run_config(a.run, a.preset, a.overrides, a.reconfigure) as cfg:
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
    from echolm.pipeline import run_config
    from echolm.train.pretrain import run_pretrain

    if a.resume and not (a.run / "base" / "ckpt" / "latest").exists():  # before writing
        raise EchoError(f"{a.run / 'base'}: no checkpoint to resume from")
    with run_config(a.run, a.preset, a.overrides, a.reconfigure) as cfg:
        run_pretrain(cfg, a.run, force=a.force)


def cmd_stage(a: argparse.Namespace) -> None:
    """One training stage: the run's config (+ overrides), then its `run_*` function."""
    import importlib

    from echolm.pipeline import run_config

    module, name = a.runner.split(":")
    run = getattr(importlib.import_module(module), name)
    with run_config(a.run, a.preset, a.overrides, a.reconfigure) as cfg:
        run(cfg, a.run, force=a.force)


def cmd_eval(a: argparse.Namespace) -> None:
    from echolm.pipeline import resolve_run_config
    from echolm.scorecard import evaluate_run

    if not (a.run / "config.json").exists():
        raise EchoError(f"{a.run}: not a run directory (no config.json)")
    # read-only: --preset/--set apply to this evaluation only, DIR/config.json stays as it is
    cfg = resolve_run_config(a.run, a.preset, a.overrides, read_only=True)
    stages = [a.stage] if a.stage else None
    log = (lambda *_: None) if a.json else print
    results = evaluate_run(cfg, a.run, stages, force=a.force, log=log,
                           humaneval=cfg.data.humaneval, gold_prompts=cfg.data.gold_prompts)
    if a.json:
        print(json.dumps({s: {k: v for k, v in r.items() if k != "gold_scores"}
                          for s, r in results.items()}, indent=2))
        return
    from echolm.report import summary_table

    print("\n".join(summary_table(results, list(results))))


def cmd_report(a: argparse.Namespace) -> None:
    from echolm.report import build_report

    if not (a.run / "summary.json").exists():
        raise EchoError(f"{a.run}: no summary.json (run some stages first)")
    build_report(a.run)


def cmd_run(a: argparse.Namespace) -> None:
    from echolm.pipeline import run_config, run_pipeline

    given = [(a.source and str(a.source.expanduser().resolve()), "source"),
             (a.chat_format, "chat_format"), (a.beside, "beside")]
    overrides = a.overrides + [f"run.{key}={json.dumps(str(v))}" for v, key in given if v]
    with run_config(a.run, a.preset, overrides, a.reconfigure) as cfg:
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


def cmd_rank(a: argparse.Namespace) -> None:
    from echolm.rank import run_rank

    result = run_rank(a.run, prompts=a.prompts, k=a.k, stage=a.stage, n=a.n,
                      annotator=a.annotator, simulated=a.simulated, noise=a.noise, seed=a.seed,
                      temperature=a.temperature, max_tokens=a.max_tokens)
    if a.simulated:
        print(json.dumps(result, indent=2))


def cmd_export(a: argparse.Namespace) -> None:
    if a.format == "gguf":
        from echolm.export_gguf import export_gguf

        export_gguf(a.run, a.out, stage=a.stage, dtype=a.dtype or "f16", force=a.force)
        return
    from echolm.hf import export_hf

    if a.dtype is not None:
        raise EchoError("--dtype applies to `export gguf` only (export hf writes fp32)")
    export_hf(a.run, a.out, stage=a.stage, force=a.force)


def cmd_import(a: argparse.Namespace) -> None:
    from echolm.runlock import run_lock

    # --force onto an earlier import holds its lock, so a stage that started on it meanwhile
    # is not swapped out from under (refused: "in use by ..."), nor one started during it
    with run_lock(a.out, "echolm import"):
        if a.format == "gguf":
            from echolm.import_gguf import import_gguf

            import_gguf(a.source, a.out, force=a.force, chat_format=a.chat_format)
            return
        from echolm.hf import import_hf

        import_hf(a.source, a.out, force=a.force, chat_format=a.chat_format)


def cmd_sandbox(a: argparse.Namespace) -> None:
    from echolm.sandbox import run_python

    try:
        code = a.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EchoError(f"{a.file}: cannot read: {e}") from e
    v = run_python(code, timeout_s=a.timeout, memory_mb=a.memory_mb)
    if a.json:
        print(json.dumps(v.to_dict(), indent=2))
    else:
        sys.stdout.write(v.stdout)
        sys.stderr.write(v.stderr)
        print(f"sandbox: {v.status}{' (' + v.detail + ')' if v.detail else ''}, "
              f"{v.wall_s:.2f}s wall, {v.cpu_s:.2f}s cpu, {v.max_rss_mb:.0f} MB; "
              f"isolation: {v.isolation.split(';')[0]}", file=sys.stderr)
    if not v.ok:
        raise SystemExit(1)


def cmd_serve(a: argparse.Namespace) -> None:
    from echolm.serve.api import serve
    from echolm.serve.limits import Limits

    limits = Limits(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Limits)})
    try:
        limits.validate()
    except ValueError as e:
        raise EchoError(str(e)) from None
    serve(a.run, host=a.host, port=a.port, api_key=a.api_key, limits=limits, device=a.device,
          threads=a.threads, allow_hosts=a.allow_host)


def cmd_presets(a: argparse.Namespace) -> None:
    from echolm.settings import load_config, to_toml

    cfg = load_config(a.name, a.overrides)
    print(json.dumps(cfg.to_dict(), indent=2) if a.json else to_toml(cfg), end="\n" * a.json)


def build_parser() -> argparse.ArgumentParser:
    from echolm.config import RankConfig
    from echolm.rank_terminal import DEFAULT_K, MAX_K, MAX_TOKENS, TEMPERATURE
    from echolm.settings import list_presets

    parser = argparse.ArgumentParser(
        prog="echolm", description="Echo: build a chat language model end to end and see what "
        "each step did. Stages: data -> tokenizer -> pretrain -> sft -> rl -> rank -> rm -> "
        "rlhf / dpo -> eval -> report.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run every stage into one run directory (resumable)")
    run_args(p)
    p.add_argument("--from", dest="source", type=Path, default=None,
                   help="start from an open model instead of training one: a .gguf file or a "
                        "Hugging Face folder, imported first (run.source; e.g. with --preset "
                        "smollm2-cpu)")
    p.add_argument("--chat-format", choices=["auto", "source", "echo"], default=None,
                   help="the imported model's chat format (run.chat_format; default auto: "
                        "its own when Echo can read it)")
    p.add_argument("--beside", type=Path, default=None,
                   help="another run directory whose evaluation the report shows beside this "
                        "run's (run.beside), e.g. the cpu preset's")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("data", help="build the built-in offline corpus")
    p.add_argument("source", choices=["builtin"], help="which corpus")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("tokenizer", help="train a BPE tokenizer, or show how text is cut")
    # one sub-command per action: then the text may come before or after the options
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = actions.add_parser("train", help="train the run's tokenizer on data.pretrain")
    run_args(t)
    stage_settings(t, "tokenizer", "data")
    for action, what in (("encode", "print the token ids of a text (JSON)"),
                         ("show", "show how a text is cut into tokens")):
        t = actions.add_parser(action, help=what)
        t.add_argument("text", nargs="?", help="the text (default: stdin)")
        t.add_argument("--run", "--out", dest="run", type=Path, required=True,
                       help="run directory")
        if action == "show":
            t.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_tokenizer)

    p = sub.add_parser("pretrain", help="pretrain the base model (resumes automatically)")
    run_args(p)
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint to resume from (resuming is automatic anyway)")
    stage_settings(p, "pretrain", "model", "data")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("chat", help="talk to a run's model in the terminal (or answer one "
                       "--prompt)")
    p.add_argument("--run", "--out", dest="run", type=Path, required=True, help="run directory")
    p.add_argument("--stage", default=None,
                   help="base, sft, rl, rlhf or dpo (default: the latest present)")
    p.add_argument("--prompt", default=None, help="answer this one message, print only the answer")
    p.add_argument("--system", default=None, help="a system message to start the conversation")
    p.add_argument("--temperature", type=number(float, 0), default=0.7,
                   help="0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=number(int, 0), default=50,
                   help="sample among the k likeliest (0 = off)")
    p.add_argument("--top-p", type=number(float, 0, 1, above=True), default=1.0,
                   help="nucleus sampling (1 = off)")
    p.add_argument("--max-tokens", type=number(int, 1), default=None,
                   help="longest answer (default: half the model's context)")
    p.add_argument("--seed", type=SEED, default=None, help="seed for reproducible sampling")
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("explain", help="show how text is cut into tokens and what the model "
                       "predicts next at each one")
    p.add_argument("text", nargs="?", help="the text (default: stdin)")
    p.add_argument("--run", "--out", dest="run", type=Path, required=True, help="run directory")
    p.add_argument("--stage", default=None,
                   help="base, sft, rl, rlhf or dpo (default: the latest present)")
    p.add_argument("--top-k", type=number(int, 1), default=5,
                   help="candidates shown per position")
    p.add_argument("--generate", type=number(int, 0), default=0, metavar="N",
                   help="then continue the text N tokens, showing each choice")
    p.add_argument("--temperature", type=number(float, 0), default=0.0,
                   help="for --generate: 0 = greedy (default), else sample")
    p.add_argument("--seed", type=SEED, default=None, help="seed for sampled --generate")
    p.add_argument("--chat", action="store_true",
                   help="wrap the text as a user message, to see the assistant's first tokens")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("sft", help="supervised fine-tuning on conversations (resumes "
                       "automatically)")
    run_args(p)
    stage_settings(p, "sft", "data")
    p.set_defaults(fn=cmd_stage, runner="echolm.train.sft:run_sft")

    p = sub.add_parser("rl", help="reinforcement learning on checkable tasks (GRPO family; "
                       "resumes automatically)")
    run_args(p)
    stage_settings(p, "rl")
    p.set_defaults(fn=cmd_stage, runner="echolm.train.grpo:run_rl")

    p = sub.add_parser("rm", help="train a reward model on the rankings in DIR/prefs.sqlite "
                       "(Bradley-Terry or Plackett-Luce; resumes automatically)")
    run_args(p)
    stage_settings(p, "rm")
    p.set_defaults(fn=cmd_stage, runner="echolm.train.reward_model:run_rm")

    p = sub.add_parser("dpo", help="direct preference optimisation (DPO or IPO) of the SFT "
                       "model on the rankings in DIR/prefs.sqlite (resumes automatically)")
    run_args(p)
    stage_settings(p, "dpo")
    p.set_defaults(fn=cmd_stage, runner="echolm.train.dpo:run_dpo")

    p = sub.add_parser("rank", help="rank K sampled answers per prompt, best first, into "
                       "DIR/prefs.sqlite (you at the terminal, or --simulated); resumable")
    p.add_argument("--run", "--out", dest="run", type=Path, required=True, help="run directory")
    p.add_argument("--prompts", type=Path, default=None,
                   help="a text file (one prompt per line) or JSONL with a 'prompt' field "
                        "(default: built-in RLHF prompts, train split)")
    p.add_argument("--k", type=number(int, 2, MAX_K), default=DEFAULT_K,
                   help=f"answers per prompt (default {DEFAULT_K})")
    p.add_argument("--stage", default="sft", help="which stage's model answers (default sft)")
    p.add_argument("--n", type=number(int, 1), default=None,
                   help="number of prompts (default 20, or all of --prompts)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--annotator", default=None,
                     help="your name, stored with each ranking (default: your user name)")
    who.add_argument("--simulated", action="store_true",
                     help="let the simulated annotator (echolm/annotator.py) rank, no human")
    noise = RankConfig.annotator_noise
    p.add_argument("--noise", type=number(float, 0), default=noise,
                   help=f"simulated annotator's temperature (0 = exact gold order; default "
                        f"{noise})")
    p.add_argument("--temperature", type=number(float, 0, above=True), default=TEMPERATURE,
                   help=f"sampling temperature of the answers (default {TEMPERATURE})")
    p.add_argument("--max-tokens", type=number(int, 1), default=MAX_TOKENS,
                   help=f"longest answer (default {MAX_TOKENS})")
    p.add_argument("--seed", type=SEED, default=0, help="seed for prompts and sampling")
    p.set_defaults(fn=cmd_rank)

    p = sub.add_parser("export", help="write a stage's model and tokenizer as a Hugging Face "
                       "folder (transformers' AutoModelForCausalLM / AutoTokenizer) or one GGUF "
                       "file (llama.cpp, Ollama, LM Studio)")
    p.add_argument("format", choices=["hf", "gguf"], help="output format")
    p.add_argument("--run", dest="run", type=Path, required=True, help="run directory")
    p.add_argument("--stage", default=None,
                   help="base, sft, rl, rlhf or dpo (default: the latest present)")
    p.add_argument("--out", dest="out", type=Path, required=True,
                   help="folder to write (hf), .gguf file to write (gguf)")
    p.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default=None,
                   help="GGUF weights: f32 (exact), f16 (default) or q8_0")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("import", help="make a run directory (tokenizer + finished base stage) "
                       "from a local Llama / Qwen2 / Qwen3 Hugging Face checkpoint folder or "
                       "GGUF file")
    p.add_argument("format", choices=["hf", "gguf"], help="input format")
    p.add_argument("source", type=Path, help="hf: checkpoint folder (config.json, "
                   "*.safetensors, tokenizer.json); gguf: the .gguf file")
    p.add_argument("--out", "--run", dest="out", type=Path, required=True,
                   help="run directory to create")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--chat-format", choices=["auto", "source", "echo"], default="auto",
                   help="how conversations are laid out: the model's own chat template "
                   "(source; auto: when Echo can read it, else Echo's) or Echo's format (echo)")
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("sandbox", help="run a Python file in the code sandbox (no network, "
                       "private filesystem, limits); exit 1 unless it succeeds")
    p.add_argument("file", type=Path, help="the Python file to run")
    p.add_argument("--timeout", type=number(float, 0.01, 86_400), default=5.0,
                   help="wall-clock seconds (default 5)")
    p.add_argument("--memory-mb", type=number(int, 32, 1 << 20), default=512,
                   help="memory limit (default 512)")
    p.add_argument("--json", action="store_true", help="print the full verdict as JSON")
    p.set_defaults(fn=cmd_sandbox)

    p = sub.add_parser("serve", help="an OpenAI-compatible API and a web page (chat, compare "
                       "stages, rank answers, tokens) over a run's models")
    p.add_argument("--run", "--out", dest="run", type=Path, required=True, help="run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=number(int, 1, 65_535), default=8000,
                   help="port (default 8000)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header names NAME (repeatable; '*' = "
                        "any, e.g. behind a reverse proxy). Default: localhost, 127.0.0.1, ::1 "
                        "and the --host address; on 0.0.0.0 also any IP address and this "
                        "machine's host name. Others get 421 (against DNS rebinding)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 and /api (default: the "
                        "ECHOLM_API_KEY environment variable; unset = no key)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=number(int, 1, 4096), default=None,
                   help="torch CPU threads")
    from echolm.serve.limits import Limits  # not .schemas: no pydantic for every command
    from echolm.settings import field_docs

    docs = field_docs(Limits)  # the limits, their defaults and docs: one place (Limits)
    for f in dataclasses.fields(Limits):
        p.add_argument("--" + f.name.replace("_", "-"), type=number(int, 1), default=f.default,
                       help=f"{docs[f.name]} (default {f.default})")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("rlhf", help="optimise the SFT model against the reward model (PPO, "
                       "RLOO or GRPO) with a KL penalty and a reward-hacking guard")
    run_args(p)
    stage_settings(p, "rlhf")
    p.set_defaults(fn=cmd_stage, runner="echolm.train.rlhf:run_rlhf")

    p = sub.add_parser("eval", help="the same measurements for every stage's model")
    run_args(p, reconfigure=False)  # read-only: --preset/--set for this evaluation only
    p.add_argument("--stage", choices=["base", "sft", "rl", "rlhf", "dpo"],
                   help="evaluate one stage (default: every finished one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("report", help="write DIR/report/report.md with figures")
    p.add_argument("--run", "--out", dest="run", type=Path, required=True)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("presets", help="print a preset's full configuration, every field with "
                       "its one-line doc (TOML: a preset file to start from)")
    p.add_argument("name", nargs="?", default="cpu", help=f"one of {', '.join(list_presets())}")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE")
    p.add_argument("--json", action="store_true", help="JSON, as DIR/config.json holds it")
    p.set_defaults(fn=cmd_presets)
    return parser


# Commands that write a run directory: one at a time per run (echolm/runlock.py), and the
# stage whose outcome they record in DIR/status.json (`run` records each of its stages).
# Read-only ones (chat, explain, export, report) and `serve` (prefs.sqlite locks itself)
# take no lock. Value: (creates the run directory, stage).
WRITERS = {"run": (True, None), "tokenizer": (True, "tokenizer"),
           "pretrain": (True, "pretrain"), "sft": (True, "sft"), "rl": (True, "rl"),
           "rank": (False, "rank"), "rm": (True, "rm"), "rlhf": (True, "rlhf"),
           "dpo": (True, "dpo"), "eval": (False, "eval")}


def _writes(args: argparse.Namespace) -> bool:
    # of `tokenizer`, only `train` writes (encode and show read the run's tokenizer)
    return args.command in WRITERS and getattr(args, "action", "train") == "train"


def _command(args: argparse.Namespace) -> None:
    """Run the command; a writer holds the run's lock and records its outcome."""
    if not _writes(args):
        args.fn(args)
        return
    from echolm.pipeline import recording
    from echolm.runlock import run_lock

    name = f"echolm {args.command}" + (" train" if args.command == "tokenizer" else "")
    create, stage = WRITERS[args.command]
    with run_lock(args.run, name, create=create), (  # `run` records each of its stages
            contextlib.nullcontext() if stage is None else recording(args.run, name, stage)):
        args.fn(args)


def main(argv: list[str] | None = None) -> int:
    from echolm import interrupt

    args = build_parser().parse_args(argv)
    # a writer stops cleanly on Ctrl-C or SIGTERM (echolm/interrupt.py); the others (chat,
    # serve) keep Python's own handling
    with interrupt.handled() if _writes(args) else contextlib.nullcontext():
        try:
            _command(args)
        except EchoError as e:
            print(f"echolm: error: {e}", file=sys.stderr)
            return 2
        except interrupt.Interrupted as e:
            print(f"\necholm: interrupted {e}; run the same command again to resume",
                  file=sys.stderr)
            return interrupt.exit_code()
        except KeyboardInterrupt:
            print("\necholm: interrupted; run the same command again to resume (a training "
                  "stage restarts from its last checkpoint)", file=sys.stderr)
            return interrupt.exit_code()
    return 0


if __name__ == "__main__":
    sys.exit(main())
