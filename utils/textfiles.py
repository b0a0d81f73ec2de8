"""Reading the text files a user gives (profiles, attack lists, pinned sets, model lists).

One reader, so that every such file fails the same way: :func:`read_text` returns its text, or
raises ValueError with one line naming the file and what is wrong (missing, a folder,
unreadable, or not UTF-8 text, with the offset of the first bad byte). Callers turn it into
their own error (a :class:`utils.errors.UserError` in the scripts).
"""

from __future__ import annotations


def read_text(path: str, what: str = "the file") -> str:
    """The UTF-8 text of ``path``; ValueError (one line, naming ``what`` and ``path``) when it
    cannot be read or is not UTF-8 text."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder: give the file inside it") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path} ({e.strerror or type(e).__name__})") \
            from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at "
                         f"offset {e.start}): give a text file") from None
