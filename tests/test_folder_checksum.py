"""The checksum manifest of folders written through another library (torch.distributed.checkpoint)."""

from __future__ import annotations

import hashlib
import json

import pytest

from nmsparse.plumbing.checksum import UnverifiedFileWarning
from nmsparse.plumbing.errors import LoadError
from nmsparse.plumbing.folder_checksum import MANIFEST, file_digest, sign_folder, verify_folder

HINT = "the file is damaged: write it again, or use a good copy"


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / ".metadata").write_bytes(b"meta")
    (d / "__0_0.distcp").write_bytes(bytes(range(256)) * 50_000)  # several read chunks
    sign_folder(d)
    return d


def test_the_manifest_lists_every_file_with_its_sha256(folder):
    rec = json.loads((folder / MANIFEST).read_text())
    assert rec == {"algorithm": "sha256", "files": {
        ".metadata": hashlib.sha256(b"meta").hexdigest(),
        "__0_0.distcp": hashlib.sha256(bytes(range(256)) * 50_000).hexdigest()}}
    assert file_digest(folder / ".metadata") == hashlib.sha256(b"meta").hexdigest()
    assert verify_folder(folder) is True


def _error(folder) -> str:
    with pytest.raises(LoadError) as e:
        verify_folder(folder)
    return str(e.value)


def test_one_changed_bit_names_the_file(folder):
    p = folder / "__0_0.distcp"
    raw = bytearray(p.read_bytes())
    raw[123_457] ^= 1
    p.write_bytes(bytes(raw))
    assert _error(folder) == f"cannot load {folder}: checksum mismatch in '__0_0.distcp'; {HINT}"


def test_missing_added_and_foreign_entries_are_refused(folder):
    (folder / "extra.distcp").write_bytes(b"x")
    assert _error(folder) == (f"cannot load {folder}: holds 'extra.distcp', which its checksum manifest does not "
                              f"list; {HINT}")
    (folder / "extra.distcp").unlink()
    (folder / ".metadata").unlink()
    assert _error(folder) == f"cannot load {folder}: lacks '.metadata', which its checksum manifest lists; {HINT}"
    (folder / ".metadata").write_bytes(b"meta")
    (folder / "sub").mkdir()
    assert _error(folder) == f"cannot load {folder}: holds 'sub', which is not a file; {HINT}"


@pytest.mark.parametrize("text", ["", "{", "[]", '{"algorithm": "md5", "files": {}}', '{"algorithm": "sha256"}',
                                  '{"algorithm": "sha256", "files": {"a": 1}}'])
def test_a_damaged_manifest_is_refused(folder, text):
    (folder / MANIFEST).write_text(text)
    assert _error(folder) == f"cannot load {folder}: has a damaged checksum manifest ({MANIFEST}); {HINT}"


def test_a_folder_without_a_manifest_reads_unverified_with_a_note(folder):
    (folder / MANIFEST).unlink()
    with pytest.warns(UnverifiedFileWarning, match="carries no checksum"):
        assert verify_folder(folder) is False
    assert verify_folder(folder, note=False) is False
