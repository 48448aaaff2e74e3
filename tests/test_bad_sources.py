"""Damaged GGUF model sources are refused by a bounded header walk before gguf's reader or transformers touch them:
a clear SourceError naming the file, in well under a second, never a struct.error, a hang or unbounded memory."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest

import qlorakit
from qlorakit.errors import SourceError
from qlorakit.load import check_gguf_file, default_model_gguf


def _tiny_gguf(path, tensors=(("w", (4, 8)),), **kv):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    if "alignment" in kv:
        writer.add_custom_alignment(kv.pop("alignment"))  # the key and the writer's padding agree
    for key, value in kv.items():
        writer.add_uint32(key, value)
    for name, shape in tensors:
        writer.add_tensor(name, np.ones(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])
    return path


# (case, how to make the file, what the message must say)
CASES = [
    ("garbage", lambda p: p.write_bytes(b"definitely not a model " * 8) and p,
     r"not a usable GGUF file \(it does not start with the GGUF magic bytes\)"),
    ("too short", lambda p: p.write_bytes(b"GGUF") and p, r"it is 4 bytes long, shorter than a GGUF header"),
    ("unknown version", lambda p: p.write_bytes(b"GGUF" + struct.pack("<IQQ", 7, 1, 0) + bytes(64)) and p,
     r"GGUF version 7; readers support versions 2 and 3"),
    ("truncated in the header", lambda p: _cut(_tiny_gguf(p, alignment=32), lambda n: 40),
     r"\(it declares 1 tensors, more than its 40 bytes can hold: the file is truncated or damaged\)"),
    ("truncated in the tensor data", lambda p: _cut(_tiny_gguf(p), lambda n: n - 16),
     r"tensor 'w' ends at byte \d+, past the file's end at \d+: the file is truncated"),
    ("no tensors", lambda p: _tiny_gguf(p, tensors=()), r"it declares no tensors: it holds no model weights"),
    ("absurd key count", lambda p: p.write_bytes(_header(1, 2**60) + bytes(64)) and p,
     r"it declares 1152921504606846976 metadata keys, more than its 88 bytes can hold"),
    ("absurd tensor count", lambda p: p.write_bytes(_header(2**40, 0) + bytes(64)) and p,
     r"it declares 1099511627776 tensors, more than its 88 bytes can hold"),
    ("absurd array length", lambda p: p.write_bytes(
        _header(1, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2**50) + bytes(64)) and p,
     r"it declares 1125899906842624 elements in 'k', more than its \d+ bytes can hold"),
    ("absurd string length", lambda p: p.write_bytes(_header(1, 1) + struct.pack("<Q", 2**62) + bytes(64)) and p,
     r"it declares 4611686018427387904 bytes in a metadata key, more than its \d+ bytes can hold"),
]


@pytest.mark.parametrize("case,make,message", CASES, ids=[c[0] for c in CASES])
def test_damaged_gguf_is_a_clear_error_before_loading(tmp_path, monkeypatch, case, make, message):
    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "cache"))
    path = make(tmp_path / "model.gguf")
    started = time.perf_counter()
    with pytest.raises(SourceError, match=message) as e:
        qlorakit.load(str(path), device="cpu")
    assert str(path) in str(e.value) and "re-download or re-export it" in str(e.value)
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("config.json"))


def test_valid_gguf_files_pass_the_header_walk(tmp_path):
    check_gguf_file(_tiny_gguf(tmp_path / "ok.gguf", alignment=64))
    check_gguf_file(default_model_gguf())  # the real default model, 1 vocabulary of 49k strings


def test_every_case_is_documented():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for case, _, _ in CASES:
        assert f"| GGUF: {case} |" in docs, case
