"""Check the result files a worker sends before any reaches the disk: each name a plain
relative path that stays inside the results directory, and a cap on count and bytes per task.
The creator checks them; the protocol caps the count per frame for the server too."""

from __future__ import annotations

__all__ = [
    "MAX_FILES_PER_TASK",
    "MAX_FILE_BYTES_PER_TASK",
    "MAX_FILE_NAME",
    "MAX_NAME_COMPONENT",
    "check_file_name",
    "check_files",
]

MAX_FILES_PER_TASK = 1000
MAX_FILE_BYTES_PER_TASK = 32 * 1024 * 1024  # total bytes of one task's files
MAX_FILE_NAME = 1024  # characters of a whole relative name
MAX_NAME_COMPONENT = 255  # characters of one path component


def _shown(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 100 else text[:97] + "..."


def _name_problem(name: object) -> str | None:
    """Why ``name`` is not an acceptable result file name, as a predicate ("is empty"), or None."""
    if not isinstance(name, str):
        return f"is not a string but {type(name).__name__}"
    if not name:
        return "is empty"
    if len(name) > MAX_FILE_NAME:
        return f"is longer than {MAX_FILE_NAME} characters"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "contains a control character"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    if len(name) >= 2 and name[1] == ":" and name[0].isascii() and name[0].isalpha():
        return "starts with a drive letter"
    for part in name.split("/"):
        if part == "..":
            return "escapes the results directory"
        if part == "":
            return "has an empty path component"
        if part == ".":
            return "has a '.' path component"
        if len(part) > MAX_NAME_COMPONENT:
            return f"has a path component longer than {MAX_NAME_COMPONENT} characters"
    return None


def check_file_name(name: object) -> str:
    """Validate a result file name sent by a worker and return it as a relative POSIX path.

    Raises ValueError with a short sentence for anything that is not a plain relative path of
    ordinary components (absolute, drive, ``..``, ``.``, empty components, backslash, control
    characters, too long).
    """
    problem = _name_problem(name)
    if problem is not None:
        raise ValueError(f"file name {_shown(name)} {problem}")
    assert isinstance(name, str)
    return name


def check_files(files: object) -> list[tuple[str, bytes]]:
    """Validate a worker's list of ``[name, data]`` result files; return ``[(name, data)]``.

    Raises ValueError naming the first problem, e.g. ``file 3: name '../x' escapes the results
    directory`` (files are counted from 0).
    """
    if not isinstance(files, list):
        raise ValueError(f"files is not a list but {type(files).__name__}")
    if len(files) > MAX_FILES_PER_TASK:
        raise ValueError(f"{len(files)} files, more than the {MAX_FILES_PER_TASK} a task may send")
    seen: set[str] = set()
    total = 0
    checked: list[tuple[str, bytes]] = []
    for index, entry in enumerate(files):
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise ValueError(f"file {index}: entry is not a [name, data] pair")
        name, data = entry
        if not isinstance(data, bytes):
            raise ValueError(f"file {index}: data is not bytes but {type(data).__name__}")
        problem = _name_problem(name)
        if problem is not None:
            raise ValueError(f"file {index}: name {_shown(name)} {problem}")
        assert isinstance(name, str)
        if name in seen:
            raise ValueError(f"file {index}: name {_shown(name)} appears twice")
        seen.add(name)
        total += len(data)
        if total > MAX_FILE_BYTES_PER_TASK:
            raise ValueError(
                f"file {index}: the files total more than {MAX_FILE_BYTES_PER_TASK} bytes"
            )
        checked.append((name, data))
    return checked
