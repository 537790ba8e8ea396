"""core.integrity.files_digest: one SHA-256 over files under a folder, equal to the formula the SD3
inversion has recorded as ``transformer_sha256`` since before it was shared (so recorded runs still match)."""

from __future__ import annotations

import hashlib

from pgraft.core.integrity import files_digest, sha256_file


def test_it_equals_the_recorded_formula_and_follows_names_and_contents(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, data in (("b.safetensors", b"bb"), ("a.bin", b"a"), ("sub/c.json", b"{}")):
        (tmp_path / name).write_bytes(data)
    files = [tmp_path / "b.safetensors", tmp_path / "a.bin"]
    reference = hashlib.sha256()
    for path in sorted(files):   # the inline loop transformer_digest had: name, then the file's SHA-256
        reference.update(path.name.encode() + sha256_file(path).encode())
    assert files_digest(tmp_path, reversed(files)) == reference.hexdigest()
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    digest = files_digest(tmp_path, everything)
    (tmp_path / "sub" / "c.json").write_bytes(b"{ }")
    assert files_digest(tmp_path, everything) != digest
    (tmp_path / "sub" / "c.json").write_bytes(b"{}")
    assert files_digest(tmp_path, everything) == digest
    (tmp_path / "sub" / "c.json").rename(tmp_path / "sub" / "d.json")
    assert files_digest(tmp_path, [p for p in tmp_path.rglob("*") if p.is_file()]) != digest
