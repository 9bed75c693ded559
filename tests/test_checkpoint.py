"""Checkpoints: atomic writes, verified reads (weights_only=True), clear errors."""

from __future__ import annotations

import io
import os

import pytest
import torch

from ocnet import checkpoint as ckpt
from ocnet.ocp.errors import CheckpointError


def _state(seed: int = 0, n: int = 4000) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "epoch": seed,
        "model": {"w": torch.randn(n, generator=g, dtype=torch.float64), "b": torch.zeros(3)},
        "generator": g.get_state(),
        "metrics": [{"epoch": 1, "train_loss": 0.5}],
        "config": {"data": "digits", "lr": None, "opts": {"a": (1, 2)}},
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    assert torch.equal(a["model"]["w"], b["model"]["w"])
    assert torch.equal(a["generator"], b["generator"])
    assert a["metrics"] == b["metrics"] and a["config"] == b["config"]


def test_round_trip_and_listing(tmp_path):
    for e in (1, 2, 3, 10):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path / "checkpoints", e), _state(e))
    assert ckpt.latest_checkpoint(tmp_path).name == "epoch_0010.pt"
    assert [p.name for p in ckpt.find_checkpoints(tmp_path)] == [
        "epoch_0010.pt", "epoch_0003.pt", "epoch_0002.pt", "epoch_0001.pt"]
    _assert_same(ckpt.load_checkpoint(tmp_path / "checkpoints" / "epoch_0003.pt"), _state(3))
    removed = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert [p.name for p in ckpt.find_checkpoints(tmp_path)] == ["epoch_0010.pt", "epoch_0003.pt"]
    assert ckpt.latest_checkpoint(tmp_path / "empty") is None


@pytest.mark.parametrize("fail_at", ["save", "fsync", "replace"])
def test_failed_write_leaves_old_file_intact(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "epoch_0001.pt"
    ckpt.save_checkpoint(path, _state(1))
    before = path.read_bytes()
    real_save = torch.save

    def partial_save(obj, f, *a, **k):
        if not (isinstance(obj, dict) and "payload" in obj):  # the inner serialisation works
            return real_save(obj, f, *a, **k)
        f.write(b"PK\x03\x04 partial bytes")  # then the envelope's serialisation dies
        raise OSError("disk full")

    def boom(*a, **k):
        raise OSError(f"{fail_at} failed")

    if fail_at == "save":
        monkeypatch.setattr(torch, "save", partial_save)
    elif fail_at == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(path, _state(2))
    monkeypatch.undo()
    assert path.read_bytes() == before
    _assert_same(ckpt.load_checkpoint(path), _state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001.pt"]  # no temp file left


def _two(tmp_path):
    p1 = ckpt.save_checkpoint(tmp_path / "epoch_0001.pt", _state(1))
    p2 = ckpt.save_checkpoint(tmp_path / "epoch_0002.pt", _state(2))
    return p1, p2


@pytest.mark.parametrize("keep", [0, 100, 0.5, -30])
def test_truncated_checkpoint(tmp_path, keep):
    p1, p2 = _two(tmp_path)
    data = p2.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    p2.write_bytes(data[:n] if n >= 0 else data[:n])
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(p2)
    msg = str(e.value)
    assert str(p2) in msg
    assert "empty" in msg or "truncated or corrupted" in msg
    assert f"the older checkpoint {p1} loads" in msg
    _assert_same(ckpt.load_checkpoint(p1), _state(1))  # the previous checkpoint still loads


def test_flipped_bytes_are_caught(tmp_path):
    p1, p2 = _two(tmp_path)
    data = p2.read_bytes()
    # The serialised state is stored verbatim inside the outer file: flip bytes inside it
    # (weights, where torch.load alone would read a different number) and elsewhere.
    inner = io.BytesIO()
    torch.save(_state(2), inner)
    start = data.find(inner.getvalue())
    assert start > 0  # found verbatim, after the outer header
    digest = data.find(b"sha256") + 12  # inside the stored hex digest (outer pickle)
    positions = [start + k for k in (0, 100, len(inner.getvalue()) // 2,
                                     len(inner.getvalue()) - 10)] + [len(data) // 2, digest]
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x10
        p2.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError) as e:
            ckpt.load_checkpoint(p2)
        assert str(p2) in str(e.value) and "epoch_0001.pt loads" in str(e.value), pos
    _assert_same(ckpt.load_checkpoint(p1), _state(1))


def test_digest_mismatch_message(tmp_path):
    inner = io.BytesIO()
    torch.save(_state(1), inner)
    data = bytearray(inner.getvalue())
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "sha256": "0" * 64,
                "payload": torch.frombuffer(data, dtype=torch.uint8)}, tmp_path / "epoch_0001.pt")
    with pytest.raises(CheckpointError, match="SHA-256 digest mismatch"):
        ckpt.load_checkpoint(tmp_path / "epoch_0001.pt")


def test_foreign_and_unsafe_files(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an ocnet checkpoint"):
        ckpt.load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    # An arbitrary Python object is refused by weights_only=True, with a clear error.
    ckpt.save_checkpoint(tmp_path / "obj.pt", {"thing": ValueError("x")})
    with pytest.raises(CheckpointError, match="weights_only=True"):
        ckpt.load_checkpoint(tmp_path / "obj.pt")
