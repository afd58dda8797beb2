"""`echolm run --from FILE`: an open model (here a SmolLM-like GGUF made in the test, ChatML and
all) is imported into the run directory and post-trained by the chosen stages (`run.stages`),
with LoRA, then evaluated and reported like any run, beside another run (`--beside`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import data_overrides
from test_import_gguf import smol_tokenizer, write_smol  # noqa: F401 (a fixture)

from echolm.config import RunConfig
from echolm.errors import EchoError

SMALL = ["rl.max_steps=2", "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_tokens=8",
         "rl.eval_problems=2", "rl.eval_samples=2", "rl.lora_rank=4", "rl.lr_matrix=1e-3",
         'rl.tasks=["letter_count:max_len=5"]', "rank.prompts=6", "rank.k=2",
         "dpo.max_steps=2", "dpo.micro_batch=2", "dpo.lora_rank=4", "dpo.seq_len=64",
         "data.eval_problems=2", "data.humaneval=0", "data.gold_prompts=2",
         'data.tasks=["letter_count:max_len=5"]', "pretrain.eval_tokens=256",
         "pretrain.seq_len=32", "rlhf.eval_prompts=2", "rlhf.final_samples=1",
         "rlhf.max_tokens=8", 'run.stages=["rl","rank","dpo","eval"]']


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.mark.slow
def test_run_from_gguf_post_trains_the_imported_model(smol_tokenizer, tmp_path,  # noqa: F811
                                                      corpus, run_dir, echolm_cli):
    src = tmp_path / "smol.gguf"
    write_smol(src, smol_tokenizer)
    run = tmp_path / "smolrun"  # (run_dir is tmp_path / "run")
    (run_dir / "summary.json").write_text("{}")  # the run shown beside: no models yet
    args = ["run", "--preset", "micro", "--from", src, "--out", run, "--beside", run_dir,
            *_sets([*data_overrides(corpus), *SMALL])]
    r = echolm_cli(*args, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "== sft == left out (run.stages)" in r.stdout
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["source"] == str(src.resolve())
    info = json.loads((run / "import.json").read_text())
    assert info["chat_format"]["name"] == "chatml" and not (run / "sft").exists()
    for stage in ("rl", "dpo"):  # LoRA: the merged model and the adapter beside it
        assert (run / stage / "adapter" / "adapter_config.json").exists()
        assert json.loads((run / stage / "done.json").read_text())["lora"]["rank"] == 4
    dpo = json.loads((run / "summary.json").read_text())["dpo"]  # no reward model: gold only
    assert 0 <= dpo["gold_win_rate_vs_sft"] <= 1 and dpo["proxy_reward"] is None
    timings = json.loads((run / "timings.json").read_text())
    assert list(timings)[:2] == ["import", "rl"] and "pretrain" not in timings
    evals = {s: json.loads((run / "eval" / f"{s}.json").read_text()) for s in ("base", "rl")}
    assert evals["base"]["val_bpb"]["tokens"] > 0  # held-out text encoded for the import
    report = (run / "report" / "report.md").read_text()
    assert "## Imported model" in report and "chat format: chatml" in report.lower()
    assert f"## Beside `{run_dir}`" in report, r.stdout[-3000:]
    assert f"{run.name}: rl".upper() in report  # one column per model of both runs
    # every accuracy beside the score of one answer to all (what no reading of the question buys)
    rl_tasks = json.loads((run / "summary.json").read_text())["rl"]["tasks"]
    assert all(0 < t["one_answer"]["accuracy"] <= 1 for t in rl_tasks.values()), rl_tasks
    assert "one answer to all |" in report and " to all: " in report
    assert all("one_answer" in t for t in evals["rl"]["tasks"].values() if "accuracy" in t)
    # a second run goes on from where it is: nothing imported or trained again
    before = (run / "rl" / "model.safetensors").read_bytes()
    r = echolm_cli(*args, timeout=600)
    assert r.returncode == 0 and "import: already done" in r.stdout, r.stderr[-2000:]
    assert (run / "rl" / "model.safetensors").read_bytes() == before
    # another model into the same run directory is refused in one line
    other = tmp_path / "other.gguf"
    write_smol(other, smol_tokenizer, seed=1)
    args[args.index(src)] = other
    r = echolm_cli(*args)  # a saved setting: refused as any other change is
    assert r.returncode == 2 and "run.source:" in r.stderr and "--reconfigure" in r.stderr
    r = echolm_cli(*args, "--reconfigure")  # and the imported model is not replaced
    assert r.returncode == 2 and "not run.source" in r.stderr and r.stderr.count("\n") == 1
    assert (run / "rl" / "model.safetensors").read_bytes() == before


def test_from_refused_into_a_run_with_its_own_model(smol_tokenizer, run_dir,  # noqa: F811
                                                    tmp_path, echolm_cli):
    src = tmp_path / "smol.gguf"
    write_smol(src, smol_tokenizer)
    before = (run_dir / "tokenizer" / "tokenizer.json").read_bytes()
    r = echolm_cli("run", "--from", src, "--out", run_dir, "--reconfigure")
    assert r.returncode == 2 and "needs a new run directory" in r.stderr, r.stderr
    assert (run_dir / "tokenizer" / "tokenizer.json").read_bytes() == before
    assert not (run_dir / "import.json").exists()


@pytest.mark.parametrize("stages,why", [([], "one or more"), (["sft", "pretrain"], "order"),
                                        (["rl", "train"], "unknown")])
def test_run_stages_checked(stages, why):
    with pytest.raises(EchoError) as e:
        RunConfig(stages=stages).validate()
    assert why in str(e.value) and "run.stages" in str(e.value)


def test_missing_source_is_one_line(tmp_path: Path, echolm_cli):
    r = echolm_cli("run", "--preset", "micro", "--from", tmp_path / "nope.gguf", "--out",
                   tmp_path / "run")
    assert r.returncode == 2 and "no such file" in r.stderr and r.stderr.count("\n") == 1


def test_a_stopped_import_of_another_model_is_not_moved_in(tmp_path: Path):
    """An import killed while its entries were moved into the run is finished by the next
    run, but only for the same model: a staged import of another one is refused, named, and
    left where it is."""
    from echolm.pipeline import import_source
    from echolm.settings import load_config

    src = tmp_path / "b.gguf"
    src.write_bytes(b"not read: the staged import is checked first")
    run = tmp_path / "run"
    run.mkdir()
    staged = tmp_path / ".run.import"
    (staged / "tokenizer").mkdir(parents=True)
    (staged / "import.json").write_text(json.dumps({"source": str(tmp_path / "a.gguf")}))
    cfg = load_config("smollm2-cpu", [f"run.source={src}"])
    with pytest.raises(EchoError, match=r"\.run\.import: a stopped import of .*a\.gguf"):
        import_source(cfg, run, log=lambda _m: None)
    assert (staged / "tokenizer").is_dir() and not (run / "tokenizer").exists()
    # the same model's stopped import is moved in
    (staged / "import.json").write_text(json.dumps({"source": str(src.resolve())}))
    assert import_source(cfg, run, log=lambda _m: None)["source"] == str(src.resolve())
    assert (run / "tokenizer").is_dir() and (run / "import.json").exists()
    assert not staged.exists()


def test_a_stage_with_nothing_to_do_keeps_the_time_its_work_took(run_dir, monkeypatch):
    """`echolm run` again on a finished run: a stage whose checks alone take over a second
    (eval hashes every model's files: seconds for 135M models) has not done its work again,
    so timings.json keeps the time the work took; a stage that does work (--force) records
    its new time."""
    import time

    import echolm.pipeline as pipeline
    from echolm.pipeline import _run_stages, resolve_run_config
    from echolm.train.tokenize import run_tokenizer

    def slow_check(cfg, run, force=False, log=print):
        time.sleep(1.2)  # as long as hashing the models takes
        return run_tokenizer(cfg, run, force=force, log=log)

    monkeypatch.setattr(pipeline, "stages", lambda: [("tokenizer", slow_check)])
    monkeypatch.setattr(pipeline, "record_machine", lambda run: {})
    cfg = resolve_run_config(run_dir, None, ['run.stages=["tokenizer"]'], reconfigure=True)
    (run_dir / "timings.json").write_text(json.dumps(
        {"tokenizer": {"seconds": 7.0, "peak_rss_mb": 1}}))
    _run_stages(cfg, run_dir, False, lambda *_: None, lambda _s: None)
    assert json.loads((run_dir / "timings.json").read_text())["tokenizer"]["seconds"] == 7.0
    _run_stages(cfg, run_dir, True, lambda *_: None, lambda _s: None)  # redone: a new time
    assert json.loads((run_dir / "timings.json").read_text())["tokenizer"]["seconds"] != 7.0
