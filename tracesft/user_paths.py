"""Files and folders a user names: every way one can be wrong becomes one line that says what to do.

Inputs are UTF-8 text. A UTF-8 byte-order mark (Excel and many Windows tools write one) is
skipped; any other encoding is refused with the line and byte where decoding failed, because
guessing an encoding could silently change the text of a problem. A missing path, a folder, a
link loop or an unreadable file is named as such. Outputs go only into a folder that is new or
empty, so nothing a user made is ever overwritten.
"""

from __future__ import annotations

import codecs
import errno
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tracesft.errors import TracesftError

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def read_bytes(path: Path, what: str) -> bytes:
    """The bytes of a file; `what` names it in messages ("eval set")."""
    with _reading(path, what):
        return path.read_bytes()


def read_text(path: Path, what: str) -> str:
    """The whole of a UTF-8 text file; `what` names it in messages ("eval set")."""
    data = read_bytes(path, what)
    _refuse_utf16(data, path, what)
    return _decode(data, path, what, first_line=1, offset=0)


def jsonl_lines(path: Path, what: str) -> Iterator[tuple[int, str | TracesftError]]:
    """(line number from 1, text) of a JSONL file, streamed; a line that is not UTF-8 comes as its error.

    Lines end at "\\n" only: `str.splitlines()` would also break at U+2028, U+2029, U+0085 and
    \\x1c-\\x1e, which JSON writers leave unescaped inside strings. An undecodable line is
    yielded, not raised, so a caller may stop there or skip it; a file that cannot be opened, or
    that is UTF-16 as a whole, raises.
    """
    with _reading(path, what), path.open("rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                _refuse_utf16(raw, path, what)
            try:
                line: str | TracesftError = _decode(raw, path, what, first_line=number, offset=offset)
            except TracesftError as err:
                line = err
            yield number, line
            offset += len(raw)


def require_new_folder(path: Path, what: str) -> None:
    """Refuse to write `what` into `path` unless it is absent or an empty folder."""
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise TracesftError(f"{path}: already exists and is not a folder; give a new or empty folder for the {what}.")
    with _reading(path, what):
        empty = next(path.iterdir(), None) is None
    if not empty:
        raise TracesftError(
            f"{path}: the folder is not empty; give a new or empty folder for the {what}, or remove what is in it."
        )


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn the operating system's refusal to read `path` into a message that names it."""
    try:
        yield
    except FileNotFoundError:
        raise TracesftError(f"{path}: {what} not found; check the path.") from None
    except IsADirectoryError:
        raise TracesftError(f"{path}: a folder, not a file; give the path of the {what}.") from None
    except NotADirectoryError:
        raise TracesftError(f"{path}: a part of the path is a file, not a folder; check the path.") from None
    except PermissionError:
        raise TracesftError(f"{path}: permission denied; make the {what} readable.") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise TracesftError(f"{path}: a symbolic link that loops; point it at the {what} itself.") from None
        raise TracesftError(f"{path}: the {what} cannot be read ({err.strerror or err}).") from None


def _decode(data: bytes, path: Path, what: str, first_line: int, offset: int) -> str:
    """`data` as UTF-8 (a leading byte-order mark skipped); `offset` is where it starts in the file."""
    skipped = len(codecs.BOM_UTF8) if offset == 0 and data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skipped:].decode("utf-8")
    except UnicodeDecodeError as err:
        position = skipped + err.start
        line = first_line + data.count(b"\n", 0, position)
        raise _not_utf8(f"{path} (line {line}, byte {offset + position})", what, "is not UTF-8 text") from None
    if "\x00" in text:
        line = first_line + text.count("\n", 0, text.index("\x00"))
        raise _not_utf8(f"{path} (line {line})", what, "holds NUL characters (UTF-16 or binary, not UTF-8 text)")
    return text


def _refuse_utf16(start: bytes, path: Path, what: str) -> None:
    if start.startswith(_UTF16_BOMS):
        raise _not_utf8(f"{path}", what, "is UTF-16 text")


def _not_utf8(where: str, what: str, finding: str) -> TracesftError:
    return TracesftError(f"{where}: the {what} {finding}; re-save it as UTF-8, the one encoding tracesft reads.")
