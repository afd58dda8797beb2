"""Checkpoints: model save/load round trip (tied and untied embeddings), training-state
checkpoints that appear atomically, cleanup of a killed save's leftovers, keep-last-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from echolm.checkpoint import (
    latest_checkpoint,
    load_model,
    load_training_state,
    save_model,
    save_training_state,
)
from echolm.config import ModelConfig
from echolm.errors import EchoError
from echolm.model import Transformer


def tiny(tie: bool = False, **kw) -> Transformer:
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                      max_seq_len=64, tie_embeddings=tie, **kw)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # init zeroes some matrices: fill everything so a mix-up shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tie: bool, tmp_path: Path) -> None:
    model = tiny(tie)
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in stored) is not tie  # tied: stored once, as the embedding

    loaded = load_model(tmp_path)
    assert loaded.cfg == model.cfg
    want, have = model.state_dict(), loaded.state_dict()
    assert want.keys() == have.keys()
    for k in want:
        assert torch.equal(want[k], have[k]), k
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    else:
        assert not torch.equal(loaded.lm_head.weight, loaded.embed_tokens.weight)
    # non-persistent RoPE tables were rebuilt, so the whole model computes the same thing
    assert torch.equal(loaded.rope_cos, model.rope_cos)
    assert torch.equal(loaded.rope_sin, model.rope_sin)
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_config_json_is_the_model_config(tmp_path: Path) -> None:
    model = tiny(qk_norm=False, head_dim=16)
    save_model(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["qk_norm"] is False and saved["head_dim"] == 16
    assert load_model(tmp_path).cfg == model.cfg


def test_weights_that_do_not_match_config(tmp_path: Path) -> None:
    save_model(tiny(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_embd"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EchoError, match="does not match config.json") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value)


def _state(step: int) -> dict:
    return {"step": step, "tokens": step * 100, "elapsed": 1.5 * step, "optimizers": [],
            "rng_torch": torch.get_rng_state(), "extra": {"note": f"s{step}"}}


def test_training_state_round_trip(tmp_path: Path) -> None:
    model = tiny()
    save_training_state(tmp_path, 3, model, _state(3))
    path = latest_checkpoint(tmp_path)
    assert path == tmp_path / "ckpt" / "step_000003"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors",
                                                      "state.pt"]
    st = load_training_state(path)
    assert st["step"] == 3 and st["tokens"] == 300 and st["extra"] == {"note": "s3"}
    assert torch.equal(st["rng_torch"], _state(3)["rng_torch"])
    loaded = load_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_no_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "ckpt").mkdir()
    assert latest_checkpoint(tmp_path) is None


def test_latest_checkpoint_removes_leftovers_of_a_killed_save(tmp_path: Path) -> None:
    model = tiny()
    save_training_state(tmp_path, 2, model, _state(2))
    root = tmp_path / "ckpt"
    # a save of step 4 killed half-way: its folder never got its final name
    half = root / "step_000004.tmp"
    half.mkdir()
    (half / "model.safetensors.tmp").write_bytes(b"\x00" * 10)
    (root / "step_000006.tmp").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step_000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002"]
    # saving the same step again after a resume also works over a leftover
    (root / "step_000004.tmp").mkdir()
    save_training_state(tmp_path, 4, model, _state(4))
    assert latest_checkpoint(tmp_path) == root / "step_000004"
    assert load_training_state(root / "step_000004")["step"] == 4


def test_keep_last_two(tmp_path: Path) -> None:
    model = tiny()
    root = tmp_path / "ckpt"
    for step in (1, 2, 3, 10, 100, 1000):
        save_training_state(tmp_path, step, model, _state(step))
        assert latest_checkpoint(tmp_path) == root / f"step_{step:06d}"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000100", "step_001000"]
    assert (root / "latest").read_text().strip() == "step_001000"
    # re-saving the latest step (a resumed run reaching it again) replaces it in place
    save_training_state(tmp_path, 1000, model, _state(1000) | {"extra": {"note": "again"}})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000100", "step_001000"]
    assert load_training_state(root / "step_001000")["extra"] == {"note": "again"}


def test_resave_of_an_older_step_keeps_the_newest_two(tmp_path: Path) -> None:
    """After a resume from step 2 (say step 4's save was the one interrupted), saving step 4
    again must leave steps 2 and 4, the newest complete ones."""
    model = tiny()
    root = tmp_path / "ckpt"
    for step in (2, 4):
        save_training_state(tmp_path, step, model, _state(step))
    (root / "latest").write_text("step_000002")  # as if killed before `latest` moved on
    save_training_state(tmp_path, 4, model, _state(4))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000004"]
    assert latest_checkpoint(tmp_path) == root / "step_000004"


def test_latest_pointing_nowhere(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest").write_text("step_000009")
    with pytest.raises(EchoError, match="step_000009, which is missing"):
        latest_checkpoint(tmp_path)


def test_atomic_path_replaces_only_when_the_write_completes(tmp_path):
    import pytest as _pytest

    from echolm.atomic import atomic_path, atomic_write_json

    target = tmp_path / "summary.json"
    atomic_write_json(target, {"a": 1})
    with _pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": ')  # half written, then the writer dies
            raise RuntimeError("killed")
    assert target.read_text() == '{\n  "a": 1\n}\n'  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left
