from pathlib import Path

from flywheel_trainer_dispatch.adapters.local import read_tail


def test_the_tail_is_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))

    assert read_tail(log, max_lines=3) == "line 97\nline 98\nline 99"


def test_a_short_log_is_returned_whole(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("only\ntwo\n")

    assert read_tail(log, max_lines=40) == "only\ntwo"


def test_the_tail_reads_a_bounded_number_of_bytes_and_drops_the_cut_line(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("x" * 10_000 + "\n" + "last line\n")

    tail = read_tail(log, max_lines=40, max_bytes=20)

    assert tail == "last line"


def test_a_missing_log_has_an_empty_tail(tmp_path: Path) -> None:
    assert read_tail(tmp_path / "absent.log", max_lines=5) == ""


def test_undecodable_bytes_do_not_break_the_tail(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_bytes(b"ok\n\xff\xfe broken\n")

    assert read_tail(log, max_lines=5).splitlines() == ["ok", "\ufffd\ufffd broken"]
