"""Checkpoints: atomic writes, verified reads (weights_only=True), clear errors."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# ----------------------------------------------------------------------------- issue 16


def test_atomic_write_and_stale_temp_cleaning(tmp_path):
    p = ckpt.atomic_write(tmp_path / "metrics.csv", "a,b\n1,2\n")
    assert p.read_text() == "a,b\n1,2\n"
    ckpt.atomic_write(p, b"x")
    assert p.read_bytes() == b"x"
    stale = [tmp_path / ".metrics.csv.tmp-4242", tmp_path / ".summary.json.tmp",
             tmp_path / ".loss.tmp-77.png", tmp_path / ".epoch_0003.pt.tmp-1"]
    keep = [tmp_path / "epoch_0001.pt", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for f in stale + keep:
        f.write_bytes(b"junk")
    removed = ckpt.clean_stale_temp(tmp_path, tmp_path / "missing")
    assert sorted(removed) == sorted(stale)
    assert all(f.exists() for f in keep)


def _envelope_file(tmp_path, obj) -> os.PathLike:
    path = tmp_path / "epoch_0005.pt"
    torch.save(obj, path)
    return path


_junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                  st.binary(max_size=16), st.lists(st.integers(), max_size=3))
_payload = st.one_of(
    _junk,
    st.binary(max_size=64).map(lambda b: torch.tensor(list(b), dtype=torch.uint8)),
    st.integers(0, 5).map(lambda n: torch.ones(n)),
)


@st.composite
def _envelopes(draw):
    kind = draw(st.sampled_from(["dict", "not a dict", "valid digest"]))
    if kind == "not a dict":
        return draw(_junk)
    if kind == "valid digest":  # the digest matches, the content is junk or not a dict
        inner = draw(st.one_of(st.binary(max_size=64), _junk.map(_torch_bytes)))
        return {"format": "ocnet-checkpoint", "version": 1,
                "sha256": hashlib.sha256(inner).hexdigest(),
                "payload": torch.tensor(list(inner), dtype=torch.uint8)}
    env = {"format": draw(st.one_of(st.just("ocnet-checkpoint"), _junk)),
           "version": draw(st.one_of(st.just(1), _junk)),
           "sha256": draw(st.one_of(st.text(alphabet="0123456789abcdef", min_size=64,
                                            max_size=64), _junk)),
           "payload": draw(_payload)}
    drop = draw(st.lists(st.sampled_from(sorted(env)), max_size=2))
    return {k: v for k, v in env.items() if k not in drop}


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(envelope=_envelopes())
def test_a_malformed_envelope_is_always_a_checkpoint_error(tmp_path, envelope):
    path = _envelope_file(tmp_path, envelope)
    try:
        state = ckpt.load_checkpoint(path)
    except CheckpointError as err:
        assert str(path) in str(err)
    else:  # only a genuine envelope of a dict loads
        assert isinstance(state, dict)
