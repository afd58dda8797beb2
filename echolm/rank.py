"""`echolm rank`: people rank a few of the model's answers, best first (the data RLHF and DPO
learn from), or the simulated annotator does (`--simulated`, for offline demos and tests).

For each prompt the stage's model samples K answers (temperature 1 by default, a fixed seed
per prompt, so the same prompt gets the same answers whatever order prompts come in). Only
different answers are kept: when two samples are identical the model is asked again (a few
rounds at most); a prompt with fewer than two different answers is skipped (nothing to
compare). The prompt, the answers (with the stage, the checkpoint folder, the sampling
settings, the weights' fingerprint and whether each answer ended its turn) and the ranking
(with the annotator's name) go into `DIR/prefs.sqlite` (`echolm.prefs.PreferenceStore`).

Resumable: prompts this annotator has already ranked (answers of the same model) are
skipped, and a prompt whose answers were sampled but not yet ranked (quit, skip, crash)
shows the stored answers again instead of sampling new ones.

In the terminal the answers are numbered and the order is typed best first: "3142" or
"3 1 4 2" (with 10+ answers, separated). `s` skips the prompt (asked again next time), `q`
(or Ctrl-D) stops; anything else is explained and asked again.
"""

from __future__ import annotations

import getpass
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from echolm.annotator import (
    SIMULATED,
    SimulatedAnnotator,
    gold_score,
    is_simulated_name,
    pair_agreement,
)
from echolm.checkpoint import file_fingerprint
from echolm.data.prompts import PromptItem, rlhf_prompts
from echolm.data.text import read_jsonl
from echolm.errors import EchoError
from echolm.prefs import PreferenceStore
from echolm.rank_terminal import (
    DEFAULT_K,
    DEFAULT_N,
    MAX_K,
    MAX_TOKENS,
    QUIT,
    SKIP,
    TEMPERATURE,
    Chooser,
    Question,
    terminal_chooser,
)
from echolm.rollout import sample_responses
from echolm.schedule import Schedule, describe
from echolm.tasks import get_task
from echolm.tasks.base import Problem, stable_hash

STORE_NAME = "prefs.sqlite"
# extra sampling rounds (new seeds) when samples repeat each other
RESAMPLE_ROUNDS = 3


def store_path(run_dir: Path) -> Path:
    return Path(run_dir) / STORE_NAME


def default_annotator() -> str:
    """The OS user name (a person ranking at this terminal)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "human"


def prompt_seed(seed: int, text: str) -> int:
    return stable_hash(f"rank:{seed}:{text}") % 2**31


# ---- prompts from a file ------------------------------------------------------------------
def read_prompt_file(path: Path) -> list[PromptItem]:
    """Prompts from a text file (one per line, blank lines ignored) or, for a .jsonl file,
    records with a "prompt" field; a record may add "task" (a family name) and "answer" to
    make the prompt checkable. Duplicates are dropped."""
    path = Path(path)
    if not path.is_file():
        raise EchoError(f"{path}: no such prompts file")
    items: list[PromptItem] = []
    if path.suffix == ".jsonl":
        for n, rec in read_jsonl(path, "prompt"):
            where = f"{path}:{n}"
            if not rec["prompt"].strip():
                raise EchoError(f"{where}: field 'prompt' is empty")
            problem = None
            if "task" in rec or "answer" in rec:
                task, answer = rec.get("task"), rec.get("answer")
                if not isinstance(task, str) or type(answer) not in (str, int):
                    raise EchoError(f"{where}: a checkable prompt needs 'task' (a family "
                                    "name) and 'answer' (a string)")
                get_task(task)  # unknown family -> EchoError naming the known ones
                problem = Problem(task, f"file:{n}", rec["prompt"], str(answer), "")
            kind = f"task:{problem.task}" if problem else "file"
            items.append(PromptItem(rec["prompt"].strip(), problem, kind, (), where))
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")  # a leading BOM is dropped
        except UnicodeDecodeError:
            raise EchoError(f"{path}: not valid UTF-8 text") from None
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                items.append(PromptItem(line.strip(), None, "file", (), f"{path}:{n}"))
    seen: set[str] = set()
    items = [i for i in items if not (i.text in seen or seen.add(i.text))]
    if not items:
        raise EchoError(f"{path}: no prompts in this file")
    return items


# ---- the model that answers ----------------------------------------------------------------
def weights_fingerprint(folder: Path) -> str:
    return file_fingerprint(folder / "model.safetensors")


class Policy:
    """A run's stage model, sampling K different answers to a prompt."""

    def __init__(self, run_dir: Path, stage: str | None, device: str | None = None) -> None:
        from echolm.checkpoint import stage_dir
        from echolm.explain import load_run

        self.tok, self.model, self.stage = load_run(run_dir, stage, device)
        self.folder = stage_dir(Path(run_dir), self.stage)
        self.checkpoint = str(self.folder.resolve())
        self.weights = weights_fingerprint(self.folder)

    @torch.inference_mode()
    def sample(self, item: PromptItem, k: int, seed: int, temperature: float | list[float],
               max_tokens: int) -> tuple[list[str], list[dict]]:
        """Up to `k` different answers and, for each, its sampling record: settings, seed,
        row, the weights' fingerprint and "stopped" (it ended its turn; the key
        echolm.train.reward_model reads). A list of temperatures samples answer j at
        temperature[j % len]: answers that differ more than one temperature gives."""
        tok = self.tok
        ids = tok.render_user(item.text)
        room = self.model.cfg.max_seq_len - len(ids)
        if room < 8:
            raise EchoError(f"{item.source or 'prompt'}: the prompt is {len(ids)} tokens, too "
                            f"long for the model's context ({self.model.cfg.max_seq_len})")
        temps = [temperature] if isinstance(temperature, int | float) else list(temperature)
        want = Counter(temps[j % len(temps)] for j in range(k))
        texts: list[str] = []
        metas: list[dict] = []
        for r in range(1 + RESAMPLE_ROUNDS):
            for n_t, t in enumerate(sorted(want)):
                have = sum(m["temperature"] == t for m in metas)
                if have >= want[t]:
                    continue
                s = seed + r * 1_000_003 + n_t * 7_919
                sampled = sample_responses(self.model, tok, [ids], want[t] - have,
                                           min(max_tokens, room), t, s)
                for i, drawn in enumerate(sampled):
                    text, stopped = tok.decode(drawn.answer).strip(), drawn.stopped
                    if text not in texts and len(texts) < k:
                        texts.append(text)
                        metas.append({"temperature": t, "top_k": 0,
                                      "max_tokens": min(max_tokens, room), "seed": s,
                                      "row": i, "stopped": stopped, "weights": self.weights})
            if len(texts) >= k:
                break
        return texts, metas

    @torch.inference_mode()
    def sample_batch(self, items: list[PromptItem], k: int, seed: int,
                     temperature: float | list[float], max_tokens: int
                     ) -> list[tuple[list[str], list[dict]]]:
        """`sample` for many prompts in one batched generation per temperature (far faster
        than one prompt at a time). The answers depend on the seed and on the batch's prompts
        (one random stream for the batch). A prompt left with fewer than `k` different answers
        is sampled again alone, as `sample` does (its own seed, several rounds)."""
        tok = self.tok
        prompts = [tok.render_user(it.text) for it in items]
        room = self.model.cfg.max_seq_len - max(len(p) for p in prompts)
        if room < 8:  # a prompt too long for the context: `sample` says which
            return [self.sample(it, k, prompt_seed(seed, it.text), temperature, max_tokens)
                    for it in items]
        limit = min(max_tokens, room)
        temps = [temperature] if isinstance(temperature, int | float) else list(temperature)
        want = Counter(temps[j % len(temps)] for j in range(k))
        out: list[tuple[list[str], list[dict]]] = [([], []) for _ in items]
        for n_t, t in enumerate(sorted(want)):
            s = seed + n_t * 7_919
            sampled = sample_responses(self.model, tok, prompts, want[t], limit, t, s)
            for j, drawn in enumerate(sampled):
                texts, metas = out[j // want[t]]
                text, stopped = tok.decode(drawn.answer).strip(), drawn.stopped
                if text not in texts:
                    texts.append(text)
                    metas.append({"temperature": t, "top_k": 0, "max_tokens": limit,
                                  "seed": s, "row": j, "stopped": stopped,
                                  "weights": self.weights})
        return [got if len(got[0]) >= k else
                self.sample(it, k, prompt_seed(seed, it.text), temperature, max_tokens)
                for it, got in zip(items, out, strict=True)]


def earlier_ranking(store: PreferenceStore, item: PromptItem, pid: int, mine: list[dict],
                    annotator: str) -> tuple[Question, list[int]] | None:
    """The answers among `mine` (this model's, in the store) this annotator already ranked
    for `item`, best first, and that order: what a resumed run counts as ranked before."""
    by_id = {r["id"]: r for r in mine}
    for ids in store.ranked_orders(pid, annotator):
        if set(ids) <= by_id.keys():
            rows = [by_id[i] for i in ids]
            q = Question(item, pid, ids, [r["text"] for r in rows],
                         [bool(r["sampling"].get("stopped", True)) for r in rows], True)
            return q, list(range(len(ids)))
    return None


def stored_answers(store: PreferenceStore, policy: Policy, item: PromptItem) -> tuple[int, list]:
    """The prompt's id in the store and the answers this model (same weights) gave it."""
    pid = store.add_prompt(item.text, source=item.source)
    return pid, [r for r in store.responses(pid) if r["stage"] == policy.stage
                 and r["sampling"].get("weights") == policy.weights]


def prepare(store: PreferenceStore, policy: Policy, item: PromptItem, k: int, seed: int,
            temperature: float | list[float], max_tokens: int, annotator: str,
            sampled: tuple[list[str], list[dict]] | None = None
            ) -> Question | str | tuple[Question, list[int]]:
    """The question for one prompt; or, when this annotator already ranked this model's
    answers, that earlier question and order (`earlier_ranking`); or "identical" (fewer than
    two different answers). `sampled`: answers already sampled for it (in a batch), used when
    the store has none."""
    pid, mine = stored_answers(store, policy, item)
    if mine and (earlier := earlier_ranking(store, item, pid, mine, annotator)):
        return earlier
    if len(mine) >= 2:
        mine = mine[:k]
        return Question(item, pid, [r["id"] for r in mine], [r["text"] for r in mine],
                        [bool(r["sampling"].get("stopped", True)) for r in mine], True)
    if mine:
        return "identical"
    texts, metas = sampled or policy.sample(item, k, prompt_seed(seed, item.text), temperature,
                                            max_tokens)
    ids = store.add_responses(pid, texts, stage=policy.stage, checkpoint=policy.checkpoint,
                              sampling=metas)
    if len(texts) < 2:
        return "identical"
    return Question(item, pid, ids, texts, [m["stopped"] for m in metas], False)




def rank_prompts(store: PreferenceStore, policy: Policy, items: list[PromptItem], k: int,
                 annotator: str, choose: Chooser, seed: int = 0,
                 temperature: float | list[float] = TEMPERATURE, max_tokens: int = MAX_TOKENS,
                 on_question: Callable[[Question, list[int]], None] | None = None,
                 batch: int = 1, keep_going: Callable[[int], bool] | None = None,
                 on_earlier: Callable[[Question, list[int]], None] | None = None) -> dict:
    """Ask `choose` (a person or the simulated annotator) to rank each prompt's answers;
    store each ranking at once. Returns counts. `batch` > 1 samples the answers of that many
    prompts together (the same batches again on a resumed run, so the same answers);
    `keep_going(done)` is asked before each batch (a time budget), after `done` prompts.
    `on_question` sees each ranking made now, `on_earlier` each one found from before."""
    counts = {"prompts": len(items), "ranked": 0, "already_ranked": 0, "skipped": 0,
              "identical": 0, "sampled": 0, "reused": 0, "responses": 0, "quit": False}
    for start in range(0, len(items), batch):
        if keep_going is not None and not keep_going(start):
            counts["prompts"] = start
            break
        chunk = items[start:start + batch]
        presampled: list = [None] * len(chunk)
        if batch > 1 and any(not stored_answers(store, policy, it)[1] for it in chunk):
            chunk_seed = stable_hash(f"rank:{seed}:" + "\n".join(it.text for it in chunk))
            presampled = policy.sample_batch(chunk, k, chunk_seed % 2**31, temperature,
                                             max_tokens)
        for n, (item, sampled) in enumerate(zip(chunk, presampled, strict=True), start + 1):
            q = prepare(store, policy, item, k, seed, temperature, max_tokens, annotator,
                        sampled)
            if isinstance(q, tuple):  # ranked before (a resumed run)
                counts["already_ranked"] += 1
                if on_earlier is not None:
                    on_earlier(*q)
                continue
            if isinstance(q, str):
                counts["identical"] += 1
                continue
            counts["reused" if q.reused else "sampled"] += 1
            order = choose(q, n, len(items))
            if order == QUIT:
                counts["quit"] = True
                return counts
            if order == SKIP:
                counts["skipped"] += 1
                continue
            store.add_ranking(q.prompt_id, [q.response_ids[i] for i in order], annotator)
            counts["ranked"] += 1
            counts["responses"] += len(order)
            if on_question is not None:
                on_question(q, order)
    return counts


# ---- entry points -------------------------------------------------------------------------
def _check_k(k: int) -> None:
    if not 2 <= k <= MAX_K:
        raise EchoError(f"--k must be between 2 and {MAX_K}, got {k}")


def collect_rankings(run_dir: Path, n_prompts: int, k: int = DEFAULT_K,
                     annotator: SimulatedAnnotator | None = None, *, stage: str = "sft",
                     items: list[PromptItem] | None = None, split: str = "train",
                     seed: int = 0, temperature: float | list[float] = TEMPERATURE,
                     max_tokens: int = MAX_TOKENS, device: str | None = None,
                     batch: int = 32, budget_s: float = 0.0,
                     log: Callable[[str], None] = print) -> dict:
    """Rank `n_prompts` prompts (default: `rlhf_prompts(split, n_prompts, seed)`) with the
    simulated annotator, end to end, into DIR/prefs.sqlite, answers sampled `batch` prompts
    at a time. Resumable like the terminal. With `budget_s` > 0, as many whole batches as
    the budget fits (the result says how many of the planned prompts that was).

    Returns counts (prompts, ranked, already_ranked, identical, sampled, reused, responses;
    ranked_total and responses_total: now and before, what an interrupted and resumed run
    ranked in all), the annotator label, gold statistics of all those rankings (gold_mean:
    mean gold score of the answers; gold_best_mean: of the best per prompt; gold_agreement:
    share of answer pairs with different gold scores that the noisy rankings order as gold
    does), the store's totals, the plan (planned and fitted prompts, cut short) and the
    seconds it took."""
    t0 = time.perf_counter()
    _check_k(k)
    annotator = annotator or SimulatedAnnotator()
    if items is None:
        items = rlhf_prompts(split, n_prompts, seed)
    items = items[:n_prompts]
    policy = Policy(run_dir, stage, device)
    store = PreferenceStore(store_path(run_dir))
    golds: list[float] = []
    best: list[float] = []
    agree = pairs = before = before_responses = 0
    plan = Schedule(len(items), len(items), 0, 0.0, 1.0, budget_s)
    marks: list[tuple[int, float]] = []
    bar = tqdm(total=len(items), desc="rank", unit="prompt", dynamic_ncols=True)

    def choose(q: Question, n: int, total: int) -> list[int]:
        return annotator.rank(q.item, q.texts, q.finished)

    def measure(q: Question, order: list[int]) -> None:
        nonlocal agree, pairs
        scores = [gold_score(q.item, t, f) for t, f in zip(q.texts, q.finished, strict=True)]
        golds.extend(scores)
        best.append(max(scores))
        a, p = pair_agreement(order, scores)
        agree, pairs = agree + a, pairs + p

    def earlier(q: Question, order: list[int]) -> None:
        nonlocal before, before_responses
        before, before_responses = before + 1, before_responses + len(order)
        measure(q, order)

    def keep_going(done: int) -> bool:
        """Progress, and the budget: another batch is ranked while one more fits (timed over
        the batches so far, the first one's warm-up included, with a 5% margin). Nothing
        here is scheduled ahead (no learning rate), so the count is decided batch by batch
        and the stage is never left half done."""
        bar.update(done - bar.n)
        elapsed = time.perf_counter() - t0
        marks.append((done, elapsed))
        if done >= plan.steps:
            return False
        if budget_s <= 0 or len(marks) < 2:
            return True
        per_prompt = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
        plan.step_s = round(per_prompt, 4)
        if elapsed + 1.05 * per_prompt * min(batch, plan.steps - done) <= budget_s:
            return True
        plan.steps, plan.fitted = done, True
        bar.total = done
        bar.set_description(f"rank ({done} of {plan.planned} planned fit {budget_s / 60:g} min)")
        return False

    try:
        counts = rank_prompts(store, policy, items, k, annotator.label, choose, seed,
                              temperature, max_tokens, on_question=measure, batch=batch,
                              keep_going=keep_going, on_earlier=earlier)
        totals = store.counts()
    finally:
        store.close()
        bar.close()
    counts.pop("quit")
    counts.pop("skipped")
    result = {**counts, "ranked_total": counts["ranked"] + before,
              "responses_total": counts["responses"] + before_responses,
              "annotator": annotator.label, "stage": policy.stage, "k": k,
              "gold_mean": round(sum(golds) / len(golds), 4) if golds else None,
              "gold_best_mean": round(sum(best) / len(best), 4) if best else None,
              "gold_agreement": round(agree / pairs, 4) if pairs else None,
              "store": str(store_path(run_dir)), "store_counts": totals,
              "planned_prompts": plan.planned, "fitted": plan.fitted, "cut_short": False,
              "budget_minutes": round(budget_s / 60, 2),
              "schedule": describe(plan, counts["prompts"], False, "prompts"),
              "seconds": round(time.perf_counter() - t0, 2)}
    log(f"rank: {result['ranked']} prompts ranked by {annotator.label} "
        f"({result['already_ranked']} already ranked, {result['identical']} with identical "
        f"answers) in {result['seconds']:.1f}s; gold mean {result['gold_mean']}, "
        f"agreement with gold {result['gold_agreement']}; {result['schedule']}")
    return result


def run_rank(run_dir: Path, prompts: Path | None = None, k: int = DEFAULT_K,
             stage: str = "sft", n: int | None = None, annotator: str | None = None,
             simulated: bool = False, noise: float = 0.1, seed: int = 0,
             temperature: float = TEMPERATURE, max_tokens: int = MAX_TOKENS,
             out: TextIO | None = None, inp: TextIO | None = None) -> dict:
    """`echolm rank`: a person ranks at the terminal, or the simulated annotator does."""
    out, inp = out or sys.stdout, inp or sys.stdin
    _check_k(k)
    if n is not None and n < 1:
        raise EchoError(f"--n must be at least 1, got {n}")
    if temperature <= 0:
        raise EchoError(f"--temperature must be > 0 to get different answers, got "
                        f"{temperature}")
    if max_tokens < 1:
        raise EchoError(f"--max-tokens must be at least 1, got {max_tokens}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EchoError(f"{run_dir}: no such run directory")
    name = "" if simulated else (annotator or default_annotator()).strip()
    if not simulated and not name:
        raise EchoError("--annotator must not be empty")
    if is_simulated_name(name):  # a person may not pass as the simulated annotator
        raise EchoError(f"--annotator '{name}': names starting with '{SIMULATED}' are reserved "
                        "for the simulated annotator (--simulated); choose another name")
    if prompts is not None:
        items = read_prompt_file(prompts)
        items = items[:n] if n else items
    else:
        items = rlhf_prompts("train", n or DEFAULT_N, seed)
    if simulated:
        if noise < 0:
            raise EchoError(f"--noise must be >= 0, got {noise}")
        return collect_rankings(run_dir, len(items), k, SimulatedAnnotator(noise, seed),
                                stage=stage, items=items, seed=seed, temperature=temperature,
                                max_tokens=max_tokens,
                                log=lambda m: print(m, file=out, flush=True))
    out.write(f"loading the {stage} model from {run_dir} ...\n")
    out.flush()
    t0 = time.time()
    policy = Policy(run_dir, stage)
    store = PreferenceStore(store_path(run_dir))
    try:
        out.write(f"ranking as '{name}': {len(items)} prompts, {k} answers each; answers are "
                  f"saved in {store.path}\n")
        counts = rank_prompts(store, policy, items, k, name,
                              terminal_chooser(policy.stage, out, inp), seed, temperature,
                              max_tokens)
    finally:
        store.close()
    left = len(items) - counts["ranked"] - counts["already_ranked"] - counts["identical"]
    out.write(f"\nranked {counts['ranked']} this time ({counts['already_ranked']} done "
              f"before, {counts['skipped']} skipped, {counts['identical']} with identical "
              f"answers); {left} left" + (" - run the same command to continue" if left else "")
              + "\n")
    out.flush()
    return {**counts, "annotator": name, "seconds": round(time.time() - t0, 2)}
