"""Untrusted folders, checkpoints and configs (issue 22): confined, bounded, one-line errors."""

import gzip
import os
import threading
from pathlib import Path

import pytest

from diffkit import files
from diffkit.files import UnreadableFileError, confined, read_gzip
from diffkit.tokenizers import CLIPTokenizer

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


def _merges(path: Path) -> Path:
    """A valid CLIP merges file (49152 - 256 - 2 merges after a header), gzipped."""
    merges = [f"a{i} b{i}" for i in range(49152 - 256 - 2)]
    path.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(merges)).encode()))
    return path


def _bomb(path: Path, inflated: int) -> Path:
    """``inflated`` zero bytes, gzipped (a gzip bomb when ``inflated`` is large)."""
    with gzip.open(path, "wb", compresslevel=9) as handle:
        block = bytes(2**20)
        for _ in range(inflated // len(block)):
            handle.write(block)
    return path


def _in_thread(fn: object, timeout: float = 20) -> BaseException | None:
    """Run ``fn`` in a daemon thread; fail if it hangs, else return what it raised."""
    raised: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as err:
            raised[0] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "hung"
    return raised[0]


# ------------------------------------------------------------------ reads (issue case 1)


def test_confined_refuses_absolute_dotdot_and_symlinks_leaving_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "pipe"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "v.gz").write_bytes(b"x")
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", folder / "tokenizer" / "out.gz")
    os.symlink("v.gz", folder / "tokenizer" / "in.gz")
    assert confined(folder, "tokenizer/v.gz") == (folder / "tokenizer" / "v.gz").resolve()
    assert confined(folder, "tokenizer/in.gz").name == "v.gz"  # a link inside is fine
    for name, message in [
        ("/etc/passwd", "relative"),
        (str(tmp_path / "secret"), "relative"),
        ("../secret", r"\.\."),
        ("tokenizer/../../secret", r"\.\."),
        ("tokenizer/out.gz", "leaves the folder"),
        ("tokenizer/missing.gz", "no such file"),
        ("tokenizer", "a directory"),
        ("", "relative"),
    ]:
        with pytest.raises(UnreadableFileError, match=message):
            confined(folder, name)


@needs_fifo
def test_confined_refuses_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnreadableFileError, match="FIFO"):
        confined(tmp_path, "fifo")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "cannot read .*No such file"),
        (lambda p: (p.mkdir(), p)[1], "a directory"),
        (lambda p: (p.write_bytes(b"not gzip at all"), p)[1], "not a gzip file"),
        (lambda p: (p.write_bytes(gzip.compress(b"x" * 1000)[:20]), p)[1], "truncated"),
        (lambda p: (p.write_bytes(gzip.compress(b"#v\nhello")), p)[1], "not a CLIP merges"),
        (lambda p: (p.write_bytes(gzip.compress(b"\xff\xfe\xfa")), p)[1], "not UTF-8"),
    ],
    ids=["missing", "directory", "not-gzip", "truncated", "bad-merges", "not-utf8"],
)
def test_tokenizer_file_errors_are_one_line_naming_the_file(
    tmp_path: Path, make: object, message: str
) -> None:
    path = make(tmp_path / "vocab.txt.gz")  # type: ignore[operator]
    with pytest.raises(UnreadableFileError, match=message) as info:
        CLIPTokenizer(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)
    assert "vocab.txt.gz" in str(info.value) and "\n" not in str(info.value)


def test_tokenizer_reads_a_valid_merges_file(tmp_path: Path) -> None:
    assert CLIPTokenizer(_merges(tmp_path / "v.gz")).vocab_size == 49408


@needs_fifo
def test_tokenizer_refuses_a_fifo_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.gz")
    err = _in_thread(lambda: CLIPTokenizer(tmp_path / "fifo.gz"))
    assert isinstance(err, UnreadableFileError) and "FIFO" in str(err)


def test_tokenizer_refuses_dev_stdin_and_dev_zero_without_hanging() -> None:
    for device in ("/dev/stdin", "/dev/zero"):
        if not os.path.exists(device):
            continue
        err = _in_thread(lambda device=device: CLIPTokenizer(device))
        assert isinstance(err, UnreadableFileError), err


def test_gzip_bomb_is_refused_in_bounded_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = _bomb(tmp_path / "bomb.gz", 200 * 2**20)  # 200 MiB of zeros, ~200 KB on disk
    assert bomb.stat().st_size < 2**20
    monkeypatch.setattr(files, "MAX_READ_BYTES", 8 * 2**20)
    with pytest.raises(UnreadableFileError, match=r"bomb\.gz is larger than 8,388,608 bytes"):
        CLIPTokenizer(bomb)
    with pytest.raises(UnreadableFileError, match="larger than 1,000 bytes inflated"):
        read_gzip(bomb, limit=1000)
    assert len(read_gzip(_bomb(tmp_path / "small.gz", 2**20), limit=2**20)) == 2**20
