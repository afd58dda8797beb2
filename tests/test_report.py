"""The report says what each stage's budget did to it: the schedules table, and a warning
nobody can miss for a stage the clock stopped; the machine it ran on."""

from __future__ import annotations

import json
from pathlib import Path

from echolm.report import cut_short_warning, machine_section, schedule_table


def _summary() -> dict:
    return {
        "base": {"steps": 142, "planned_steps": 300, "cut_short": False, "budget_minutes": 8.0,
                 "schedule": "planned 300 steps; this machine fits 142 in 8.0 min (2.66 s "
                             "each): ran 142", "minutes": 6.5, "tok_per_s": 3421, "mfu": 0.49,
                 "dtype": "bfloat16"},
        "rm": {"steps": 58, "planned_steps": 211, "cut_short": True, "budget_minutes": 1.5,
               "schedule": "CUT SHORT by the 1.5 min budget: ran 58 of the 71 steps it had "
                           "planned to (of 211 configured)", "minutes": 1.45},
        "rank": {"prompts": 992, "planned_prompts": 1000, "cut_short": False,
                 "budget_minutes": 2.5, "seconds": 144.7,
                 "schedule": "planned 1000 prompts; this machine fits 992 in 2.5 min (0.13 s "
                             "each): ran 992"},
    }


def test_a_cut_short_stage_is_announced_and_the_others_are_not() -> None:
    lines = cut_short_warning(_summary())
    assert len([ln for ln in lines if ln]) == 1
    assert "`rm` was CUT SHORT" in lines[0] and "ran 58 of the 71" in lines[0]
    assert cut_short_warning({"base": _summary()["base"]}) == []


def test_the_schedule_table_has_one_row_per_budgeted_stage() -> None:
    rows = [r for r in schedule_table(_summary()) if r.startswith("| ")]
    assert rows[0].startswith("| stage | budget | planned | ran |")
    base, rm, rank = rows[1:]
    assert base == ("| base | 8 min | 300 | 142 | planned 300 steps; this machine fits 142 in "
                    "8.0 min (2.66 s each): ran 142 | 6.5 min | 3,421 | 49.0% | bf16 |")
    assert "| rm | 1.5 min | 211 | 58 | CUT SHORT" in rm
    assert rank.startswith("| rank | 2.5 min | 1000 | 992 |") and "| 2.4 min |" in rank
    assert rm.endswith("| – | – |") and rank.endswith("| – | – | – |")  # no dtype recorded
    assert schedule_table({}) == []


def test_the_machine_section_names_the_cpu_its_instruction_sets_and_peaks(tmp_path: Path
                                                                          ) -> None:
    (tmp_path / "machine.json").write_text(json.dumps({
        "cpu": "AMD EPYC", "isa": ["AVX2"], "cores": 2, "torch_threads": 2,
        "cpu_capability": "AVX2", "native_bf16": False, "dtype": "float32", "processes": 1,
        "peak_tflops": {"fp32": 0.169, "bf16": 0.0013}}))
    text = "\n".join(machine_section(tmp_path))
    assert "AMD EPYC (2 cores); instruction sets: AVX2" in text
    assert 'bf16 matmul native: no (emulated); dtype "auto" trains in float32 here' in text
    assert "fp32 169 GFLOP/s, bf16 1.3 GFLOP/s" in text
    assert machine_section(tmp_path / "none") == []


def test_yue_verdict_counts_only_changes_beyond_sampling_noise():
    from echolm.report import yue_verdict

    def task(p1, p1_after, pk, pk_after, n):
        return {"pass@1_before": p1, "pass@1_after": p1_after, "n": n,
                "pass@k_before": {"1": p1, "8": pk}, "pass@k_after": {"1": p1_after, "8": pk_after}}

    # 48 problems: 1.96 * sqrt((.396 * .604 + .438 * .562) / 48) = 0.197, so +4.2 is flat
    v = yue_verdict(task(0.068, 0.180, 0.396, 0.438, 48))
    assert v.startswith("Reproduced: pass@1 rose by 11.2 points while pass@8 moved +4.2")
    assert "n=48 problems: pass@8 moves of up to 19.7 points are noise" in v
    # 1000 problems: 1.96 * sqrt((.25 + .24) / 1000) = 0.0434, so +10 is a real rise
    v = yue_verdict(task(0.30, 0.40, 0.50, 0.60, 1000))
    assert v.startswith("Not reproduced: pass@1 rose by 10.0 points and pass@8 also rose by "
                        "10.0 points") and "up to 4.3 points" in v
    assert yue_verdict(task(0.30, 0.31, 0.5, 0.5, 48)).startswith("Inconclusive")


def test_one_answer_baseline_is_the_commonest_answers_share():
    from echolm.evaluate import one_answer_baseline
    from echolm.tasks import Problem, get_task

    task = get_task("letter_count")

    def p(i, answer):
        return Problem("letter_count", str(i), "How many?", answer, f"Answer: {answer}")

    # answers 1, 1, 2, 1, 0: "1" three times of five
    problems = [p(0, "1"), p(1, "1"), p(2, "2"), p(3, "1"), p(4, "0")]
    assert one_answer_baseline(task, problems) == {"answer": "1", "accuracy": 0.6}
    # 2, 0, 2, 0: a tie goes to the answer met first
    tie = [p(0, "2"), p(1, "0"), p(2, "2"), p(3, "0")]
    assert one_answer_baseline(task, tie) == {"answer": "2", "accuracy": 0.5}
    # no answer repeats: no commonest answer, and the share of one right guess (1 of 4)
    assert one_answer_baseline(task, [p(i, str(i)) for i in range(4)]) == {"answer": None,
                                                                          "accuracy": 0.25}
    assert one_answer_baseline(task, []) == {"answer": None, "accuracy": 0.0}
    # the commonest answer really scores its share under the task's own verifier
    assert sum(task.score(q, "Answer: 1") for q in problems) / len(problems) == 0.6


def test_a_gain_no_higher_than_one_answer_to_all_is_called_out():
    from echolm.report import summary_table, yue_verdict

    def task(p1, p1_after, pk, pk_after, n, one=None):
        t = {"pass@1_before": p1, "pass@1_after": p1_after, "n": n,
             "pass@k_before": {"1": p1, "8": pk}, "pass@k_after": {"1": p1_after, "8": pk_after}}
        return t | ({"one_answer": one} if one else {})

    # letter counts, a third each 0 / 1 / 2+: 2.3% -> 31.8% is answering "1" (33.3%) to all
    v = yue_verdict(task(0.023, 0.318, 0.188, 0.354, 48, {"answer": "1", "accuracy": 0.3333}))
    assert 'pass@1 after RL (31.8%) does not beat "1" to all: 33.3%: RL may have taught' in v
    # 34.5% is above it, but by less than 2 points
    v = yue_verdict(task(0.023, 0.345, 0.188, 0.354, 48, {"answer": "1", "accuracy": 0.3333}))
    assert 'pass@1 after RL (34.5%) is within 2 points of "1" to all: 33.3%' in v
    # arithmetic's commonest answer scores 4%: 3.9% -> 19.8% is more than that
    v = yue_verdict(task(0.039, 0.198, 0.208, 0.354, 48, {"answer": "12", "accuracy": 0.04}))
    assert "commonest answer" not in v
    # the eval table names the baseline in the row's label
    evals = {"sft": {"tasks": {"letter_count": {
        "accuracy": 0.8, "n": 40, "ci95": [0.65, 0.9],
        "one_answer": {"answer": "1", "accuracy": 0.8}}}}}
    evals["sft"]["tasks"]["spelling"] = {"accuracy": 0.1, "n": 40, "ci95": [0.04, 0.23],
                                         "one_answer": {"answer": None, "accuracy": 0.025}}
    table = "\n".join(summary_table(evals, ["sft"]))
    assert '| letter_count accuracy (n=40; "1" to all: 80.0%) | 80.0% [65.0%, 90.0%] |' in table
    assert "| spelling accuracy (n=40) | 10.0% [4.0%, 23.0%] |" in table  # nothing repeats


def test_the_report_of_a_run_with_edge_case_results_says_what_was_measured(tmp_path: Path
                                                                          ) -> None:
    """A reward model with no held-out pairs (no calibration error), RL started from the
    base model, DPO's answers sampled at 0.7: the report is written and says so."""
    from echolm.report import build_report

    task = {"pass@1_before": 0.1, "pass@1_after": 0.3, "pass@k_before": {"1": 0.1, "4": 0.3},
            "pass@k_after": {"1": 0.3, "4": 0.5}, "n": 40, "samples_per_problem": 4,
            "temperature": 1.0}
    rl = {"tasks": {"arithmetic": task}, "init": "base", "dtype": "bfloat16",
          "sampler": {"tis_cap": 2.0, "steps": 12, "sampler_kl": 0.00345, "tis_capped": 0.0012}}
    summary = {"rl": rl, "rm": {"heldout_accuracy": None, "n": 0, "ece": None},
               "dpo": {"gold_win_rate_vs_sft": 0.6, "gold_reward": 0.5, "sft_gold": 0.4,
                       "n": 48, "samples_per_prompt": 4, "temperature": 0.7}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "done.json").write_text(json.dumps(rl))
    text = build_report(tmp_path, log=lambda _m: None).read_text()
    assert "Held-out pairwise accuracy **–** (n=0 pairs)." in text
    assert "Does RL add reasoning beyond BASE?" in text
    assert "pass@k from 4 answers per problem (n problems), sampled at temperature 1." in text
    assert "(n=48 prompts x 4 answers, sampled at temperature 0.7)" in text
    assert ("learned from in bfloat16; their log-probs differed by 0.0034 nats a token (k3 "
            "estimate of KL, mean over 12 steps). Truncated importance sampling (cap 2) weighed "
            "each token by their ratio and capped 0.12% of tokens.") in text


def test_sampler_note_says_when_nothing_corrected_it_or_nothing_was_recorded() -> None:
    from echolm.report import sampler_note

    rl = {"sampler": {"tis_cap": 0.0, "steps": 3, "sampler_kl": 0.0, "tis_capped": 0.0}}
    assert sampler_note(rl)[1].endswith("Not corrected (rl.tis_cap = 0).")
    assert "in float32;" in sampler_note(rl)[1]
    assert sampler_note({}) == [] and sampler_note({"sampler": {"steps": 0}}) == []


def test_figures_measured_from_a_replaced_sft_model_are_called_stale(tmp_path: Path) -> None:
    from echolm.checkpoint import file_fingerprint
    from echolm.report import replaced_start

    weights = tmp_path / "sft" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"the SFT model DPO started from")
    dpo = {"gold_win_rate_vs_sft": 0.6, "start_fingerprint": file_fingerprint(weights)}
    assert replaced_start(tmp_path, "dpo", dpo) == []
    assert replaced_start(tmp_path, "dpo", {"gold_win_rate_vs_sft": 0.6}) == []  # older run
    weights.unlink()
    weights.write_bytes(b"an SFT model trained again with --force")
    note = replaced_start(tmp_path, "dpo", dpo)
    assert "replaced since" in note[0] and "`echolm dpo --force`" in note[0]
    rl = {"init": "base", "start_fingerprint": dpo["start_fingerprint"]}  # RL from base
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"the SFT model DPO started from")
    assert replaced_start(tmp_path, "rl", rl) == []
