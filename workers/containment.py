"""Export files kept inside the directory an operator chose for them (``metering export --dir``, the worker's ``--out``).

The rule (docs/exports.md, "The export directory"): the file's path, and its manifest's, with every
symlink followed (a planted one included, dangling or not) and every ``..`` resolved, must lie strictly
inside the directory, itself resolved the same way (so the directory may be a symlink the operator made).
A symlink inside the directory that points to another place inside it is fine. Anything else is refused
with ``InvalidArgument`` naming the field before a byte is written.
"""

from __future__ import annotations

import os
from pathlib import Path

from workers.errors import InvalidArgument


def export_root(root: Path, field: str = "root") -> Path:
    """``root`` resolved (symlinks followed); ``InvalidArgument(field)`` unless it is an existing directory."""
    try:
        resolved = Path(root).resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # missing, unreadable, or a symlink loop
        raise InvalidArgument(field, f"the export directory {root} does not exist or cannot be resolved ({exc})") from None
    if not resolved.is_dir():
        raise InvalidArgument(field, f"the export directory {root} is not a directory")
    return resolved


def contained(path: Path, root: Path, field: str = "out", root_field: str = "root") -> Path:
    """``path`` as given, once it is known to resolve strictly inside ``root`` (see the module docstring).

    The path is checked, not rewritten: the file is still written at ``path`` (an atomic rename, which
    replaces a final symlink rather than writing through it), so a symlink inside the directory to a
    place inside it keeps working as before.
    """
    real_root = export_root(root, root_field)
    for candidate in (Path(path), Path(f"{path}.manifest.json")):
        try:
            real = candidate.resolve(strict=False)
        except (OSError, RuntimeError):  # a symlink loop: where it leads cannot be known, so it is not inside
            raise InvalidArgument(field, f"{candidate} cannot be resolved (a symlink loop?)") from None
        if real == real_root or not real.is_relative_to(real_root):
            where = "is" if os.path.normpath(os.path.abspath(candidate)) == str(real) else f"resolves to {real},"
            raise InvalidArgument(field, f"{candidate} {where} outside the export directory {real_root}")
    return Path(path)
