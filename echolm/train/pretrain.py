"""Stage 2, pretraining: next-token prediction on plain text, from random weights to a base
model. Reads the run's tokenizer, encodes the text into token shards once, then trains with
the shared loop; writes `base/model.safetensors` and the `base` entry of summary.json."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from echolm.atomic import atomic_path, atomic_write_json
from echolm.checkpoint import file_fingerprint, save_model
from echolm.config import Config
from echolm.data.shards import BatchSampler, load_tokens, write_meta, write_shards
from echolm.data.text import iter_documents
from echolm.engine import SamplingParams, generate
from echolm.errors import EchoError
from echolm.evaluate import bpb_key, cached, eval_bpb
from echolm.model import Transformer
from echolm.runfiles import read_cache
from echolm.runtime import autocast, check_seq_len, setup_distributed
from echolm.staging import StageOutput
from echolm.tokenizer import Tokenizer
from echolm.trainer import Trainer

SAMPLE_PROMPTS = ["The", "Once upon a time", "To be, or not to be", "In the beginning",
                  "The meaning of life is"]


def prepare_tokens(cfg: Config, run_dir: Path, tok: Tokenizer, log=print) -> Path:
    """Encode train/val text into run_dir/tokens, once per tokenizer and data: meta.json keeps
    what they were encoded from, so a retrained tokenizer (`tokenizer --force`) or other
    data re-encodes them (built beside the old ones, swapped in when complete)."""
    folder = run_dir / "tokens"
    source = {"tokenizer": file_fingerprint(run_dir / "tokenizer" / "tokenizer.json"),
              "pretrain": [str(p) for p in cfg.data.pretrain],
              "val_fraction": cfg.data.val_fraction}
    meta_file = folder / "meta.json"
    if meta_file.exists():
        old = read_cache(meta_file, log)  # unreadable: said, and encoded again below
        if old is not None and old.get("source") == source:
            return folder
        log(f"tokens: {folder} was encoded from another tokenizer or data: encoding again")
    t0 = time.time()
    meta: dict = {"source": source}
    with atomic_path(folder) as tmp:
        for split in ("train", "val"):
            docs = iter_documents(cfg.data.pretrain, split, cfg.data.val_fraction,
                                  log if split == "train" else None)
            meta[split] = write_shards(docs, tok, tmp, split)
        meta["seconds"] = round(time.time() - t0, 2)
        write_meta(tmp, meta)
        if folder.exists():  # the old shards go only once the new ones are complete
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            shutil.rmtree(old)
    mb = meta["train"]["bytes"] / 1e6
    log(f"tokens: {meta['train']['tokens']:,} train / {meta['val']['tokens']:,} val tokens from "
        f"{mb:.1f} MB in {meta['seconds']:.1f}s ({mb / max(meta['seconds'], 1e-9):.1f} MB/s)")
    return folder


def sample_texts(model: Transformer, tok: Tokenizer, prompts: list[str], max_tokens: int = 48,
                 seed: int = 0) -> list[str]:
    ids = [[tok.bos, *tok.encode(p)] for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50, seed=seed,
                            stop_ids=(tok.bos,))
    outs = generate(model, tok, ids, params)
    return [p + tok.decode(o) for p, o in zip(prompts, outs, strict=True)]


def run_pretrain(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    """One step = one optimizer update on `micro_batch x grad_accum` rows per process."""
    started = time.perf_counter()
    stage = StageOutput(run_dir, "base", force, label="pretrain")
    if (finished := stage.finished(log)) is not None:
        return finished
    d = setup_distributed()
    tcfg, mcfg = cfg.pretrain, cfg.model
    tok = Tokenizer.load(run_dir / "tokenizer")
    if tok.vocab_size > mcfg.vocab_size:
        raise EchoError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                        f"{tok.vocab_size}")
    check_seq_len("pretrain", tcfg.seq_len, mcfg.max_seq_len)
    if d.main:
        prepare_tokens(cfg, run_dir, tok, log)
    if d.world > 1:
        dist.barrier()
    folder = run_dir / "tokens"
    train_tokens, val_tokens = load_tokens(folder, "train"), load_tokens(folder, "val")
    sampler = BatchSampler(train_tokens, tok.bos, tcfg.seq_len, tcfg.micro_batch,
                           tcfg.grad_accum, tcfg.seed, d.rank, d.world,
                           pin_memory=d.device.type == "cuda")

    torch.manual_seed(tcfg.seed)
    model = Transformer(mcfg)
    out = stage.start(log)  # inputs read: only now is anything written
    trainer = Trainer(model, tcfg, out, "base", stage.log_dir, d, shardable=True,
                      started=started)
    if trainer.resume():
        log(f"pretrain: resuming from step {trainer.step}")
    elif d.main:
        log(f"pretrain: {model.num_params():,} parameters ({model.num_params(True):,} "
            f"non-embedding), {model.flops_per_token(tcfg.seq_len) / 1e6:.1f} MFLOP/token, "
            f"dtype {trainer.dtype}, {d.world} process(es) x {torch.get_num_threads()} "
            f"thread(s), {sampler.rows_per_step} rows x {tcfg.seq_len} tokens per step")
    ctx = autocast(d.device, trainer.dtype)

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch  # pinned on GPUs: the copies overlap with the previous step's kernels
        return m(x.to(d.device, non_blocking=True), targets=y.to(d.device, non_blocking=True))

    def evaluate() -> dict | None:
        """Held-out bits per byte on rank 0; a sharded (FSDP) model needs every process to
        run the same forward passes, and then they all do."""
        if not (d.main or trainer.sharded):
            return None
        return eval_bpb(model, tok, val_tokens, tcfg.seq_len, tcfg.eval_tokens, autocast_ctx=ctx)

    # A budget leaves room for the final evaluation and the periodic ones: the first is timed
    # right after the first step (FSDP: evaluation only ever follows a training step)
    tokens_per_step = tcfg.micro_batch * tcfg.grad_accum * tcfg.seq_len
    trainer.plan(every=tcfg.eval_every)
    while trainer.running():
        loss = trainer.update(sampler.micro_batches(trainer.step), loss_fn, tokens_per_step)
        record: dict = {"loss": loss, "epoch": round(sampler.epoch(trainer.step + 1), 4)}
        untimed = not trainer.eval_times and trainer.schedule.budget_s > 0
        if (tcfg.eval_every and (trainer.step + 1) % tcfg.eval_every == 0) or untimed:
            with trainer.evaluating():
                ev = evaluate()
            if ev is not None and d.main:
                record["val_bpb"] = round(ev["bpb"], 5)
            trainer.plan(reserve_s=trainer.eval_times[-1] + 5.0)  # the final one, and saving
        if tcfg.sample_every and (trainer.step + 1) % tcfg.sample_every == 0:
            whole = trainer.unsharded()  # FSDP: gathered on rank 0 (every process joins)
            if d.main:
                record["samples"] = sample_texts(whole, tok, SAMPLE_PROMPTS[:2])
        trainer.end_step(record, show=("loss", "val_bpb"))
    facts = trainer.finish(tcfg.seq_len)

    result: dict = {}
    ev = evaluate()
    whole = trainer.unsharded()
    if d.main and ev is not None and whole is not None:
        samples = sample_texts(whole, tok, SAMPLE_PROMPTS)
        save_model(whole, out)
        # `echolm eval` measures the same bits per byte of the same file, in fp32: it reads
        # this one when it was measured in fp32 too (not under bf16 autocast)
        if trainer.dtype == torch.float32:
            cached(run_dir / "eval" / "cache", out / "model.safetensors",
                   bpb_key(tcfg.seq_len, tcfg.eval_tokens), lambda: ev)
        facts["minutes"] = round(trainer.clock.seconds() / 60, 2)
        result = {"val_bpb": round(ev["bpb"], 4), "val_loss": round(ev["loss"], 4),
                  "params": whole.num_params(), "params_non_embedding": whole.num_params(True),
                  **facts, "eval_tokens": ev["tokens"], "samples": samples}
        atomic_write_json(out / "samples.json", samples)
        stage.commit(result, {k: v for k, v in result.items() if k != "samples"})
        log(f"pretrain: val {ev['bpb']:.4f} bits/byte after {trainer.step} steps, "
            f"{trainer.tokens:,} tokens, {facts['minutes']:.1f} min; {facts['schedule']}")
        for s in samples:
            log("  sample: " + s.replace("\n", " ⏎ "))
    if d.world > 1:
        dist.barrier()
    return result
