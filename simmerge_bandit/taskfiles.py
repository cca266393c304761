"""Reading a task's files: JSON lines of examples and probe prompts, from a file or from content sent instead
(:class:`Upload`), with errors that name the file and line and never a traceback (not UTF-8, not JSON, nested too
deeply, a missing field). :mod:`.catalog` copies what these read into the home.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator

from .errors import InvalidInput


class Upload(str):
    """A file's content sent instead of its path (the daemon's API reads no file outside the directories it
    serves); ``label`` names it in error messages.

    >>> read_jsonl(Upload('{"prompt": "1+1=", "answer": "2"}\\n', "data"), need=("prompt", "answer"))
    [{'prompt': '1+1=', 'answer': '2'}]
    """

    label: str

    def __new__(cls, text: str, label: str = "uploaded content") -> "Upload":
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape: not text a file could hold
            raise InvalidInput(f"{label}: not valid UTF-8 text") from None
        self = super().__new__(cls, text)
        self.label = label
        return self


class ProbeSetName(str):
    """The name of a registered probe set, never a file (a plain ``str`` is a file when one exists there)."""


def _lines(source: str | Path | Upload):
    """``(label, lines)`` of a file or an :class:`Upload`, split as a text file reads (universal newlines); a file
    that is not UTF-8 text is :class:`InvalidInput` when its bad bytes are read."""
    if isinstance(source, Upload):
        return source.label, io.StringIO(source, newline=None)
    p = existing_file(source)

    def read():
        try:
            with open(p, encoding="utf-8") as fh:
                yield from fh
        except UnicodeDecodeError as e:
            raise _not_text(p, e) from None

    return str(p), read()


def existing_file(source: str | Path) -> Path:
    """``source`` as a path to an existing file, else :class:`InvalidInput`."""
    p = Path(source).expanduser()
    if not p.is_file():
        raise InvalidInput(f"{p}: no such file")
    return p


def _not_text(p: Path, e: UnicodeDecodeError) -> InvalidInput:
    return InvalidInput(f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x}); expected JSON lines or one prompt per "
                        f"line")


def read_jsonl(path: str | Path | Upload, *, need: tuple[str, ...]) -> list[dict]:
    """Read a JSON-lines file (or :class:`Upload`) whose objects have string fields ``need``; errors name the
    line."""
    return list(iter_jsonl(path, need=need))


def iter_jsonl(path: str | Path | Upload, *, need: tuple[str, ...]) -> Iterator[dict]:
    """:func:`read_jsonl` one row at a time (a file is read as the rows are taken)."""
    label, lines = _lines(path)
    n = 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise InvalidInput(f"{label}:{i}: not valid JSON ({getattr(e, 'msg', e)})") from None
        except RecursionError:
            raise InvalidInput(f"{label}:{i}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise InvalidInput(f"{label}:{i}: expected a JSON object")
        for key in need:
            if not isinstance(obj.get(key), str):
                raise InvalidInput(f"{label}:{i}: missing string field {key!r}")
            if not obj[key].isascii():
                try:
                    obj[key].encode("utf-8")
                except UnicodeEncodeError:  # "\ud800": JSON allows it, no text file can hold it
                    raise InvalidInput(f"{label}:{i}: field {key!r} holds a lone surrogate escape") from None
        n += 1
        yield obj
    if not n:
        raise InvalidInput(f"{label}: empty file (expected JSON lines with {', '.join(need)})")


def read_prompts(path: str | Path | Upload) -> list[str]:
    """Probe prompts: JSON lines with a "prompt" field, or plain text with one prompt per line."""
    if isinstance(path, Upload):
        label, text = path.label, str(path)
    else:
        p = existing_file(path)
        label = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise _not_text(p, e) from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise InvalidInput(f"{label}: empty probe set (expected one prompt per line or JSON lines with 'prompt')")
    if lines[0].lstrip().startswith("{"):
        return [r["prompt"] for r in read_jsonl(path, need=("prompt",))]
    return lines
