"""`echolm report`: DIR/report/report.md — one column per stage, the figures, the same fixed
prompts answered by every stage, the environment, wall time and peak memory per stage.
Everything is read from what the stages wrote (summary.json, done.json, eval/, timings.json);
only the fixed-prompt answers are generated here (greedy, a few tokens)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from pathlib import Path

from echolm.atomic import atomic_write_text
from echolm.checkpoint import MODEL_STAGES, file_fingerprint, load_model, model_file
from echolm.errors import EchoError
from echolm.plots import plot_all
from echolm.runfiles import CONFIG_FIX, TIMINGS_FIX, read_json
from echolm.summary import read_summary

FIXED_PROMPTS = ["What is 23 + 19?", "Spell the word 'garden'.", "Who are you?",
                 "Write a short line about the sea.", "How many times does the letter 'r' "
                 "appear in 'carrot'?", "How many r's are in the word strawberry?"]
MEMORY_BUDGET_MB = 6 * 1024


def _n_answers(d: dict) -> str:
    """'n=48 prompts x 4 answers, sampled at temperature 1' (older summaries: no temperature)."""
    k, t = d.get("samples_per_prompt", 1), d.get("temperature")
    return (f"n={d['n']} prompts" + (f" x {k} answers" if k > 1 else "")
            + (f", sampled at temperature {t:g}" if t is not None else ""))


def _win(d: dict) -> str:
    """The win rate in bold and its 95% interval over prompts (ties counted half)."""
    from echolm.evaluate import wilson_interval

    lo, hi = wilson_interval(round(d["gold_win_rate_vs_sft"] * d["n"]), d["n"])
    return f"**{_pct(d['gold_win_rate_vs_sft'])}** (95% CI {_pct(lo)}-{_pct(hi)})"


def _json(path: Path, fix: str) -> dict | None:
    return read_json(path, fix, default=None)


def current_evals(run_dir: Path, stages: list[str], log=print) -> dict[str, dict | None]:
    """Each stage's DIR/eval/<stage>.json if it measured the model files now in the run;
    a result of other (since retrained) models is left out, never shown as this one's."""
    from echolm.scorecard import same_models

    out: dict[str, dict | None] = {}
    for s in stages:
        path = run_dir / "eval" / f"{s}.json"
        ev = _json(path, f"delete it and run `echolm eval --run {run_dir}`")
        if ev is not None and not same_models(run_dir, ev):
            log(f"report: {path} measured other model files than those now in {run_dir}: "
                f"left out (run `echolm eval --run {run_dir}` to measure them)")
            ev = None
        out[s] = ev
    return out


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f
                               if ln.startswith("model name")), env["cpu"])
        with open("/proc/meminfo") as f:
            env["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    for pkg in ("tokenizers", "tiktoken", "transformers", "numpy"):
        try:
            env[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["git_commit"] = None
    return env


def fixed_answers(run_dir: Path, stages: list[str], max_tokens: int = 80) -> dict:
    from echolm.engine import SamplingParams, generate
    from echolm.tokenizer import Tokenizer

    tok = Tokenizer.load(run_dir / "tokenizer")
    prompts = [tok.render_user(p) for p in FIXED_PROMPTS]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                            stop_ids=tok.stop_ids)
    out = {}
    for stage in stages:
        model = load_model(run_dir / stage).eval()
        out[stage] = [tok.decode(o) for o in generate(model, tok, prompts, params)]
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def one_answer_note(t: dict) -> str:
    """'"1" to all: 80.0%' for a task result whose problems share a commonest answer, else ''
    (none measured, or no answer repeats)."""
    one = t.get("one_answer")
    return f'"{one["answer"]}" to all: {_pct(one["accuracy"])}' if one and one["answer"] else ""


def summary_table(evals: dict[str, dict], stages: list[str],
                  extra: dict[str, dict[str, str]] | None = None, n_in_cells: bool = False
                  ) -> list[str]:
    """Metric rows x one column per stage (`stages` name the columns of `evals`); `extra`
    rows (name -> column -> text) come first. `n_in_cells`: a row per measurement whatever
    its sample size, the size in each cell (runs measured with different sizes)."""
    rows: dict[str, dict[str, str]] = dict(extra or {})
    for stage in stages:
        ev = evals.get(stage) or {}
        if "val_bpb" in ev:
            bpb = ev["val_bpb"]
            cell, size = f"{bpb['value']:.3f}", f"{bpb['tokens']:,} tokens"
            if n_in_cells:
                rows.setdefault("held-out bits/byte", {})[stage] = f"{cell} ({size})"
            else:
                rows.setdefault(f"held-out bits/byte ({size})", {})[stage] = cell
        for name, t in (ev.get("tasks") or {}).items():
            if "accuracy" in t:
                cell = f"{_pct(t['accuracy'])} [{_pct(t['ci95'][0])}, {_pct(t['ci95'][1])}]"
                size = "; ".join(x for x in (f"n={t['n']}", one_answer_note(t)) if x)
                if n_in_cells:
                    rows.setdefault(f"{name} accuracy", {})[stage] = f"{cell} ({size})"
                else:
                    rows.setdefault(f"{name} accuracy ({size})", {})[stage] = cell
            elif "pass@1" in t:
                rows.setdefault("HumanEval pass@1 (prompts that fit the context)", {})[stage] = (
                    f"{_pct(t['pass@1'])} (n={t['n']})")
        if "gold" in ev:
            g = ev["gold"]
            if n_in_cells:
                rows.setdefault("gold reward, greedy answers", {})[stage] = (
                    f"{g['reward']:.3f} (n={g['n']})")
            else:
                label = f"gold reward, greedy answers (n={g['n']} prompts)"
                rows.setdefault(label, {})[stage] = f"{g['reward']:.3f}"
            if "win_rate_vs" in g:
                rows.setdefault("gold win rate vs previous, greedy", {})[stage] = (
                    f"{_pct(g['win_rate_vs']['value'])} vs {g['win_rate_vs']['stage']}")
    head = ["| metric | " + " | ".join(s.upper() for s in stages) + " |",
            "|---|" + "---|" * len(stages)]
    return head + [f"| {name} | " + " | ".join(vals.get(s, "–") for s in stages) + " |"
                   for name, vals in rows.items()]


def run_facts(run_dir: Path) -> tuple[str, str]:
    """(parameters, what the base model was trained on) of a run, as the report shows them."""
    imported = _json(run_dir / "import.json", "re-import the model") or {}
    summary = read_summary(run_dir)
    if imported:
        name = imported.get("name") or Path(imported.get("source", "?")).name
        return f"{imported.get('params', 0) / 1e6:.1f}M", f"imported ({name})"
    b = summary.get("base") or {}
    return (f"{b['params'] / 1e6:.1f}M" if "params" in b else "?",
            f"{b['tokens'] / 1e6:.1f}M tokens here" if "tokens" in b else "?")


def beside_section(run_dir: Path, other: Path, stages: list[str], evals: dict, log=print
                   ) -> list[str]:
    """This run's evaluation beside another run's (`run.beside`): the same measurements of
    every stage's model, so a reader sees what a bigger or longer-trained model buys."""
    if not (other / "summary.json").exists():
        log(f"report: run.beside={other}: no run there (no summary.json); section left out")
        return []
    o_stages = [s for s in MODEL_STAGES if (other / s / "model.safetensors").exists()]
    o_evals = current_evals(other, o_stages, log)
    cols: dict[str, dict] = {}
    extra: dict[str, dict[str, str]] = {"parameters": {}, "base model": {}}
    for name, d, st, ev in ((other.name, other, o_stages, o_evals),
                            (run_dir.name, run_dir, stages, evals)):
        params, trained = run_facts(d)
        for s in st:
            col = f"{name}: {s}"
            cols[col] = ev.get(s) or {}
            extra["parameters"][col], extra["base model"][col] = params, trained
    return [f"## Beside `{other}`", "", "The same measurements of both runs' models (each "
            "cell's n is its sample size; a measurement one run lacks shows –).", ""] + \
        summary_table(cols, list(cols), extra, n_in_cells=True) + [""]


def yue_verdict(t: dict) -> str:
    """Does RL raise pass@1 while pass@k at large k stays flat or falls (Yue et al., 2025)?
    "Flat" allows for sampling noise: a change of pass@k within ~2 standard errors of the
    difference of two proportions over `n` problems (at least 2 points) does not count."""
    kmax = max(t["pass@k_after"], key=int)
    d1 = t["pass@1_after"] - t["pass@1_before"]
    before, after = t["pass@k_before"][kmax], t["pass@k_after"][kmax]
    dk = after - before
    n = t.get("n") or 0
    noise = (1.96 * math.sqrt((before * (1 - before) + after * (1 - after)) / n)) if n else 0.0
    within = max(0.02, noise)
    where = f" (n={n} problems: pass@{kmax} moves of up to {100 * within:.1f} points are noise)"
    one, p1 = t.get("one_answer"), t["pass@1_after"]
    # within 2 points of answering one thing to all: the rise may be that answer, not the skill
    constant = ""
    if one and one["answer"] and d1 > 0.02 and p1 <= one["accuracy"] + 0.02:
        than = "does not beat" if p1 <= one["accuracy"] else "is within 2 points of"
        constant = (f" But pass@1 after RL ({_pct(p1)}) {than} {one_answer_note(t)}: RL may "
                    "have taught the commonest answer rather than the task.")
    if d1 > 0.02 and dk <= within:
        return (f"Reproduced: pass@1 rose by {100 * d1:.1f} points while pass@{kmax} moved "
                f"{100 * dk:+.1f} points{where}: RL sharpened what the starting model could "
                "already sample rather than adding new solutions." + constant)
    if d1 > 0.02:
        return (f"Not reproduced: pass@1 rose by {100 * d1:.1f} points and pass@{kmax} also "
                f"rose by {100 * dk:.1f} points at this scale{where}." + constant)
    return f"Inconclusive: RL did not raise pass@1 here ({100 * d1:+.1f} points)."


TRAINING_STAGES = ("base", "sft", "rl", "rm", "rlhf", "dpo")


def cut_short_warning(summary: dict) -> list[str]:
    """A line nobody can miss for every stage a time budget stopped before its schedule."""
    out = []
    for stage in (*TRAINING_STAGES, "rank"):
        d = summary.get(stage) or {}
        if d.get("cut_short"):
            out.append(f"> **WARNING: `{stage}` was CUT SHORT by its time budget**: "
                       f"{d.get('schedule', '')}. Its figures are those of an unfinished "
                       "stage.")
        u = d.get("unguarded") or {}
        if u.get("cut_short"):
            out.append(f"> **WARNING: the unguarded RLHF run was CUT SHORT**: {u['schedule']}.")
    return out + ([""] if out else [])


def schedule_table(summary: dict) -> list[str]:
    """What each stage planned, what this machine fitted into its budget, what ran."""
    rows = ["| stage | budget | planned | ran | what happened | time | tokens/s | MFU | dtype |",
            "|---|---|---|---|---|---|---|---|---|"]
    for stage in (*TRAINING_STAGES, "rank"):
        d = summary.get(stage)
        if not d or "schedule" not in d:
            continue
        budget = f"{d['budget_minutes']:g} min" if d.get("budget_minutes") else "none"
        planned = d.get("planned_steps", d.get("planned_prompts", "–"))
        ran = d.get("steps", d.get("prompts", "–"))
        minutes = d.get("minutes", (d.get("seconds") or 0) / 60)
        tok_s = f"{d['tok_per_s']:,}" if d.get("tok_per_s") else "–"
        mfu = _pct(d["mfu"]) if "mfu" in d else "–"
        dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(d.get("dtype"), d.get("dtype", "–"))
        rows.append(f"| {stage} | {budget} | {planned} | {ran} | {d['schedule']} | "
                    f"{minutes:.1f} min | {tok_s} | {mfu} | {dtype} |")
    if len(rows) == 2:
        return []
    return ["## Schedules fitted to the time budgets", "",
            "A stage with a budget times its first steps, then fixes its schedule (warmdown "
            "included) so that the whole stage, evaluations and saving included, fits; a "
            "slower machine runs fewer steps and says so here. MFU: model FLOPs per second "
            "over the measured matmul peak of the dtype the stage trained in (see Machine).",
            "", *rows, ""]


def machine_section(run_dir: Path) -> list[str]:
    path, fix = run_dir / "machine.json", "delete it (`echolm run` measures the machine again)"
    m = _json(path, fix)
    if not m:
        return []
    try:
        return _machine_lines(m)
    except (KeyError, TypeError, ValueError) as e:  # edited by hand, or an older layout
        raise EchoError(f"{path}: field {e} is missing or not as `echolm run` writes it; "
                        f"{fix}") from None


def _machine_lines(m: dict) -> list[str]:
    peaks = m.get("peak_tflops", {})
    lines = ["## Machine", "",
             f"- CPU: {m['cpu']} ({m['cores']} cores); instruction sets: "
             f"{', '.join(m['isa']) or 'unknown'}; torch kernels: {m['cpu_capability']}",
             f"- bf16 matmul native: {'yes' if m['native_bf16'] else 'no (emulated)'}; "
             f"dtype \"auto\" trains in {m.get('auto_dtype', m.get('dtype', '?'))} here (each "
             f"stage's own: Schedules); processes: {m.get('processes', 1)} x "
             f"{m['torch_threads']} torch thread(s)"]
    if peaks:
        lines.append(f"- measured matmul peak ({m['torch_threads']} threads): "
                     f"fp32 {1000 * peaks['fp32']:.0f} GFLOP/s, bf16 "
                     f"{1000 * peaks['bf16']:.1f} GFLOP/s")
    if m.get("gpu"):
        lines.append(f"- GPU: {m['gpu']}")
    return lines + [""]


def replaced_start(run_dir: Path, stage: str, result: dict) -> list[str]:
    """A warning when `stage`'s result was measured from a start model (SFT's, or RL's
    `init`) that has been replaced since (`echolm sft --force`): its before/after figures
    and win rates compare with a model the run no longer has. Results without the record
    (older runs) get none."""
    recorded = result.get("start_fingerprint")
    init = result.get("init", "sft") if stage == "rl" else "sft"
    start = model_file(run_dir, init)
    if not recorded or (start.exists() and file_fingerprint(start) == recorded):
        return []
    return [f"> **Stale:** these figures compare with the {init.upper()} model this stage "
            f"started from, replaced since; run `echolm {stage} --force` to measure again.", ""]


def status_banner(run_dir: Path, status: dict) -> list[str]:
    """How the last command that wrote the run ended (DIR/status.json), unless it succeeded."""
    from echolm.runlock import in_use

    state = status.get("state") or ("failed" if status.get("failed_stage") else "succeeded")
    stage, error = status.get("stage") or status.get("failed_stage"), status.get("error", "")
    if state == "failed":
        line = f"**Stage `{stage}` failed:** {error}. Earlier stages' results are intact."
    elif state == "interrupted":
        line = (f"**Stage `{stage}` was interrupted** ({error}): run `{status.get('command')}` "
                "again to resume. Earlier stages' results are intact.")
    elif state == "running" and in_use(run_dir):
        line = (f"**Still running:** `{status.get('command')}` is in stage `{stage}` (since "
                f"{status.get('started')}); below are the stages finished so far.")
    elif state == "running":
        line = (f"**`{status.get('command')}` stopped in stage `{stage}` without saying why** "
                "(killed?): run it again to resume.")
    else:
        return []
    return ["> " + line, ""]


def sampler_note(rl: dict) -> list[str]:
    """How far the sampler's numbers were from the trainer's over the RL steps, and what
    truncated importance sampling did about it ([] for a run that did not record it)."""
    m = rl.get("sampler")
    if not m or not m.get("steps"):
        return []
    text = (f"Sampler vs trainer: the answers were drawn from fp32 weights and learned from in "
            f"{rl.get('dtype', 'float32')}; their log-probs differed by {m['sampler_kl']:.4f} "
            f"nats a token (k3 estimate of KL, mean over {m['steps']} steps). ")
    if m["tis_cap"] > 0:
        text += (f"Truncated importance sampling (cap {m['tis_cap']:g}) weighed each token by "
                 f"their ratio and capped {m['tis_capped']:.2%} of tokens.")
    else:
        text += "Not corrected (rl.tis_cap = 0)."
    return ["", text]


def build_report(run_dir: Path, log=print) -> Path:
    summary = read_summary(run_dir)
    stages = [s for s in MODEL_STAGES if (run_dir / s / "model.safetensors").exists()]
    evals = current_evals(run_dir, stages, log)
    timings = read_json(run_dir / "timings.json", TIMINGS_FIX, values=dict, default={})
    if bad := [k for k, t in timings.items() if type(t.get("seconds")) not in (int, float)]:
        raise EchoError(f"{run_dir / 'timings.json'}: '{bad[0]}' has no number of seconds; "
                        f"{TIMINGS_FIX}")
    status = _json(run_dir / "status.json", "delete it (it only tells whether the last "
                   "`echolm run` failed)") or {}
    figures = plot_all(run_dir)
    answers = fixed_answers(run_dir, stages) if stages else {}
    env = environment()
    cfg = _json(run_dir / "config.json", CONFIG_FIX) or {}

    md = [f"# Echo run report: `{run_dir.name}`", "",
          f"Preset `{cfg.get('preset', '?')}`, written {time.strftime('%Y-%m-%d %H:%M')}. "
          "Every figure below comes with its sample size; the Summary's accuracies and the "
          "win rates carry a 95% Wilson interval.", ""]
    md += status_banner(run_dir, status)
    md += cut_short_warning(summary)
    md += ["## Summary", ""] + summary_table(evals, stages) + [""]
    md += schedule_table(summary) + machine_section(run_dir)
    if any(evals.values()) is False:
        md += ["(Run `echolm eval --run DIR` to fill this table.)", ""]
    imported = _json(run_dir / "import.json", "re-import the model")
    if imported:
        fmt = imported.get("chat_format") or {}
        own_sft = (run_dir / "sft" / "model.safetensors").exists()
        role = ("; the SFT column is this run's own fine-tuning of it" if own_sft else
                " (it is also the SFT model the later stages start from)"
                if imported.get("instruct") else "")
        md += ["## Imported model", "", f"`{Path(imported['source']).name}` "
               f"({imported.get('model_type')}, {imported['params']:,} parameters, "
               f"{'instruct' if imported.get('instruct') else 'base'} model): the BASE column "
               "is this model as imported" + role
               + f". Chat format: {fmt.get('name', 'echo')}"
               + (f", default system prompt \"{fmt['default_system']}\""
                  if fmt.get("default_system") else "") + ".", ""]
    beside = (cfg.get("run") or {}).get("beside")
    if beside:
        md += beside_section(run_dir, Path(beside), stages, evals, log)

    tk = summary.get("tokenizer")
    if tk:
        md += ["## Tokens", "", f"Byte-level BPE, vocabulary {tk['vocab_size']:,}, "
               f"{tk['bytes_per_token']:.2f} bytes per token on held-out text.", ""]
    b = summary.get("base")
    if b:
        md += ["## Pretraining (base)", "",
               f"{b['params']:,} parameters, {b['tokens']:,} tokens in {b['minutes']:.1f} min "
               f"({b.get('tok_per_s', 0):,} tokens/s, {b.get('dtype', '')}): held-out "
               f"**{b['val_bpb']:.3f} bits per byte**.", "", "![pretraining](pretrain.png)", ""]
    s = summary.get("sft")
    if s:
        md += ["## Supervised fine-tuning", "", "| task | base | SFT | base (sampled) | "
               "SFT (sampled) | n |", "|---|---|---|---|---|---|"]
        for name, t in s["tasks"].items():
            md.append(f"| {name} | {_pct(t['base'])} | {_pct(t['sft'])} | "
                      f"{_pct(t.get('base_sampled'))} | {_pct(t.get('sft_sampled'))} | {t['n']} |")
        md += ["", "![sft](sft.png)", ""]
    r = summary.get("rl")
    if r:
        md += ["## Reinforcement learning on checkable tasks", ""] + replaced_start(
            run_dir, "rl", r) + [
               "| task | pass@1 before | pass@1 after | pass@k before | pass@k after | n | "
               "one answer to all |", "|---|---|---|---|---|---|---|"]
        for name, t in r["tasks"].items():
            kmax = max(t["pass@k_after"], key=int)
            md.append(f"| {name} | {_pct(t['pass@1_before'])} | {_pct(t['pass@1_after'])} | "
                      f"{_pct(t['pass@k_before'][kmax])} (k={kmax}) | "
                      f"{_pct(t['pass@k_after'][kmax])} | {t['n']} | "
                      f"{_cell(one_answer_note(t)) or '–'} |")
        md += ["", "*One answer to all*: the score of answering every problem with the "
               "commonest answer among them, what a model scores without reading the question."]
        first = next(iter(r["tasks"].values()), {})
        if first.get("samples_per_problem"):
            md[-1] += (f" pass@k from {first['samples_per_problem']} answers per problem (n "
                       "problems)" + (f", sampled at temperature {first['temperature']:g}"
                                      if first.get("temperature") is not None else "") + ".")
        md += sampler_note(r)
        start = r.get("init", "sft").upper()
        md += ["", "![rl](rl.png)", "", f"### Does RL add reasoning beyond {start}? "
               "(Yue et al., 2025)", ""] + [f"- **{n}**: {yue_verdict(t)}"
                                             for n, t in r["tasks"].items()]
        md += ["", "![pass@k](pass_at_k.png)", ""]
    rm = summary.get("rm")
    if rm:
        md += ["## Reward model", "", f"Held-out pairwise accuracy **{_pct(rm['heldout_accuracy'])}"
               f"** (n={rm['n']} pairs)" + (f", calibration error {rm['ece']:.3f}"
                                            if rm.get("ece") is not None else "") + ".", ""]
    h = summary.get("rlhf")
    if h:
        md += ["## RLHF", ""] + replaced_start(run_dir, "rlhf", h) + [
               f"{h.get('algorithm', 'ppo').upper()}, KL beta "
               f"{h.get('kl_beta', '?')}, SFT-loss (ptx) weight {h.get('ptx_coef', 0)}. "
               f"Gold reward {h.get('sft_gold', float('nan')):.3f} (SFT) -> "
               f"{h['gold_reward']:.3f}; win rate against SFT by the gold annotator "
               f"{_win(h)} ({_n_answers(h)}); "
               f"proxy {h['proxy_reward']:.3f}; KL {h['kl']:.2f}; step kept by gold: "
               f"{h.get('best_step', '?')} (0 = the SFT model itself); guard stopped the run: "
               f"{h['guard_stopped']}. Measured afresh (another sampling seed) after the step "
               "was chosen.", "",
               "![rlhf](rlhf_overoptimisation.png)", ""]
    dpo = summary.get("dpo")
    if dpo and "gold_win_rate_vs_sft" in dpo:
        md += ["## DPO", ""] + replaced_start(run_dir, "dpo", dpo) + [
               "Win rate against SFT by the gold annotator "
               f"{_win(dpo)} ({_n_answers(dpo)}); gold reward "
               f"{dpo.get('sft_gold', float('nan')):.3f} (SFT) -> "
               f"{dpo.get('gold_reward', float('nan')):.3f}.", ""]
    if answers:
        md += ["## The same prompts through every stage", "", "Greedy decoding, 80 tokens "
               "at most.", ""]
        for i, p in enumerate(FIXED_PROMPTS):
            md += [f"**{p}**", "", "| stage | answer |", "|---|---|"]
            md += [f"| {st} | {_cell(answers[st][i]) or '(empty)'} |" for st in stages] + [""]
    md += ["## Time and memory", "", "| stage | wall time | peak RSS so far |", "|---|---|---|"]
    for name, t in timings.items():
        over = " (over the 6 GiB budget)" if t.get("peak_rss_mb", 0) > MEMORY_BUDGET_MB else ""
        md.append(f"| {name} | {t['seconds'] / 60:.1f} min | {t.get('peak_rss_mb', 0):,.0f} MB"
                  f"{over} |")
    if timings:
        md.append(f"| **total** | {sum(t['seconds'] for t in timings.values()) / 60:.1f} min | |")
    md += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]
    md += ["", "Figures: " + ", ".join(f.name for f in figures), ""]
    out = run_dir / "report" / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(md))
    log(f"report: {out}")
    return out
