"""The per-machine cache of exported towers (embed/towercache.py)."""

from __future__ import annotations

import os

from itrcli.embed import towercache


def test_publish_lookup_and_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("ITR_TOWER_CACHE", str(tmp_path / "towers"))
    assert towercache.lookup("org/m", "abc", "text") is None
    tmp = towercache.staging("org/m", "abc", "text")
    (tmp / "model.onnx").write_bytes(b"x")
    assert towercache.lookup("org/m", "abc", "text") is None  # not published yet
    final = towercache.publish(tmp, "org/m", "abc", "text", {"format": 1})
    assert towercache.lookup("org/m", "abc", "text") == final
    assert (final / "model.onnx").read_bytes() == b"x" and not tmp.exists()
    # another revision, another kind: other entries
    assert towercache.lookup("org/m", "def", "text") is None
    assert towercache.lookup("org/m", "abc", "image-onnx") is None
    # a second publisher of the same entry keeps the first one's
    tmp2 = towercache.staging("org/m", "abc", "text")
    (tmp2 / "model.onnx").write_bytes(b"y")
    assert towercache.publish(tmp2, "org/m", "abc", "text") == final
    assert (final / "model.onnx").read_bytes() == b"x" and not tmp2.exists()
    towercache.remove("org/m", "abc", "text")
    assert towercache.lookup("org/m", "abc", "text") is None


def test_a_local_model_is_keyed_by_its_files(tmp_path):
    m = tmp_path / "model"
    m.mkdir()
    (m / "model.safetensors").write_bytes(b"1234")
    k1 = towercache.model_key(str(m), None)
    assert k1 == towercache.model_key(str(m), None) and k1.startswith("model-")
    (m / "model.safetensors").write_bytes(b"123456")  # retrained in place
    os.utime(m / "model.safetensors", (1, 1))
    assert towercache.model_key(str(m), None) != k1
    assert "/" not in towercache.model_key("org/name", "rev")
