"""Stage 1, tokens: train the BPE tokenizer on the training text and measure it."""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from echolm.config import Config
from echolm.data.text import iter_documents
from echolm.errors import EchoError
from echolm.runfiles import read_json
from echolm.runtime import setup_distributed
from echolm.staging import StageOutput
from echolm.tokenizer import Tokenizer, iter_texts, train_tokenizer


def bytes_per_token(tok: Tokenizer, docs: list[str]) -> float:
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(docs, threads=2))
    return n_bytes / max(n_tokens, 1)


def run_tokenizer(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    stage = StageOutput(run_dir, "tokenizer", force)
    if (finished := stage.finished(log)) is not None:
        return finished
    done = stage.final / "done.json"
    fix = "rerun `echolm tokenizer train --force` (and the stages after it)"
    d = setup_distributed()
    if not d.main:  # under torchrun, rank 0 trains the tokenizer and the others wait for it
        dist.barrier()
        return read_json(done, fix)
    t0 = time.time()
    texts = iter_texts(iter_documents(cfg.data.pretrain, "train", cfg.data.val_fraction, log),
                       cfg.tokenizer.train_bytes)
    tok = train_tokenizer(texts, cfg.tokenizer.vocab_size)
    if tok.vocab_size < 256 + 16:
        raise EchoError("the training text is too small to learn any merges")
    val = []
    for doc in iter_documents(cfg.data.pretrain, "val", cfg.data.val_fraction):
        val.append(doc)
        if sum(map(len, val)) > 2_000_000:
            break
    if not val:
        raise EchoError("no held-out (val) documents: add more text or raise data.val_fraction")
    tok.save(stage.start(log))  # the text read and learnt from: only now is anything written
    result = {"vocab_size": tok.vocab_size, "bytes_per_token": round(bytes_per_token(tok, val), 4),
              "seconds": round(time.time() - t0, 2)}
    stage.commit(result)
    log(f"tokenizer: vocab {tok.vocab_size}, {result['bytes_per_token']:.2f} bytes/token on "
        f"held-out text, {result['seconds']:.1f}s")
    if d.world > 1:
        dist.barrier()
    return result
