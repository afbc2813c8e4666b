"""The mail that tells a polling node of queued jobs of its share (kinod.share_mail)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kinod import share_mail
from kinod.share_mail import ShareMail


def pair(tmp_path: Path) -> tuple[ShareMail, ShareMail]:
    folder = tmp_path / "mail"
    folder.mkdir()
    return ShareMail(folder, "a"), ShareMail(folder, "b")


def test_names_posted_reach_their_owner_once_and_only_after_send(tmp_path: Path) -> None:
    a, b = pair(tmp_path)
    assert b.receive() == []  # no mail yet: no file
    a.post("b", "j1.json")
    a.post("b", "j2.yaml")
    a.post("c", "j3.json")
    assert b.receive() == []  # not sent yet
    a.send()
    assert b.receive() == ["j1.json", "j2.yaml"]
    assert b.receive() == []  # read already
    a.post("b", "j4.json")
    a.send()
    assert b.receive() == ["j4.json"]
    assert (tmp_path / "mail" / "c").read_text() == "j3.json\n"
    a.send()  # nothing to send: no write
    assert b.receive() == []


def test_a_line_being_appended_is_read_once_whole(tmp_path: Path) -> None:
    _, b = pair(tmp_path)
    path = tmp_path / "mail" / "b"
    path.write_bytes(b"j1.json\nj2.js")
    assert b.receive() == ["j1.json"]
    with open(path, "ab") as f:
        f.write(b"on\n")
    assert b.receive() == ["j2.json"]


def test_names_that_are_not_plain_file_names_are_ignored(tmp_path: Path) -> None:
    _, b = pair(tmp_path)
    (tmp_path / "mail" / "b").write_bytes(b"../x.json\n.hidden.json\n\n  \nok.json\n\xff\xfe\n")
    assert b.receive() == ["ok.json", "\ufffd\ufffd"]  # a garbled name finds no file


def test_a_file_read_past_the_rotation_size_starts_afresh(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(share_mail, "ROTATE_BYTES", 20)
    a, b = pair(tmp_path)
    for i in range(3):
        a.post("b", f"job{i}.json")
    a.send()
    assert len(b.receive()) == 3
    assert not (tmp_path / "mail" / "b").exists()  # read to its end, past the size: gone
    a.post("b", "next.json")
    a.send()
    assert b.receive() == ["next.json"]


def test_a_file_made_again_is_read_from_its_start(tmp_path: Path) -> None:
    a, b = pair(tmp_path)
    a.post("b", "first-of-many.json")
    a.send()
    assert b.receive() == ["first-of-many.json"]
    (tmp_path / "mail" / "b").unlink()  # e.g. by hand
    a.post("b", "x.json")
    a.send()
    assert b.receive() == ["x.json"]


def test_nothing_is_written_or_read_through_a_link(tmp_path: Path) -> None:
    a, b = pair(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("secret.json\n")
    os.symlink(target, tmp_path / "mail" / "b")
    a.post("b", "j.json")
    a.send()  # refused, and only logged: the owner finds the job at its next listing
    assert target.read_text() == "secret.json\n"
    assert b.receive() == []


def test_a_fifo_planted_as_mail_blocks_neither_sender_nor_owner(tmp_path: Path) -> None:
    a, b = pair(tmp_path)
    fifo = tmp_path / "mail" / "b"
    os.mkfifo(fifo)
    a.post("b", "j.json")
    a.send()  # no reader: refused at once, and only logged
    assert b.receive() == []
    assert fifo.is_fifo()
