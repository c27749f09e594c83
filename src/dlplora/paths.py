"""Where dlp-lora keeps its cache (models, BIG-bench files)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$DLP_LORA_CACHE`, default `~/.cache/dlp-lora`. Created on first use."""
    root = Path(os.environ.get("DLP_LORA_CACHE") or Path.home() / ".cache" / "dlp-lora").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def extra_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The directory of the non-BIG-bench tasks: the argument, else `$DLP_LORA_EXTRA_DATA`, else None."""
    value = explicit if explicit else os.environ.get("DLP_LORA_EXTRA_DATA")
    return Path(value).expanduser() if value else None


def read_json(path: Path, hint: str = ""):
    """Parse a JSON file; a corrupt one raises DLPLoRAError naming the file (and `hint`, the fix)."""
    import json

    from .errors import DLPLoRAError

    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise DLPLoRAError(f"{path} is corrupt: {exc}" + (f"; {hint}" if hint else "")) from exc


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- files under a confining root, no symlink race
def open_under(root_fd: int, root: Path, path: Path, directory: bool = False) -> int:
    """A file descriptor of `path` (inside the resolved `root`, whose descriptor is `root_fd`), opened one component
    at a time from `root_fd`, each with O_NOFOLLOW: a component swapped for a symbolic link after the path was
    checked fails (ELOOP / ENOTDIR) instead of leading outside `root`. The caller closes it."""
    fd = os.dup(root_fd)
    try:
        parts = Path(path).relative_to(root).parts
        for i, part in enumerate(parts):
            flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if directory or i < len(parts) - 1 else 0)
            nxt = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _under(root: Path, path: Path) -> Path:
    from .errors import DLPLoRAError

    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise DLPLoRAError(f"{path} leads outside {root} (a symbolic link); refused")
    return real


def read_under(root: str | os.PathLike, path: str | os.PathLike) -> bytes:
    """The bytes of the regular file `path` inside `root`, read through :func:`open_under` (no symlink race)."""
    import stat

    from .errors import DLPLoRAError

    root = Path(os.path.realpath(root))
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = open_under(root_fd, root, _under(root, Path(path)))
    except (OSError, ValueError) as exc:
        raise DLPLoRAError(f"{path} cannot be opened inside {root} without following a symbolic link: {exc}") from None
    finally:
        os.close(root_fd)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise DLPLoRAError(f"{path} is not a regular file")
        return fh.read()


def copy_tree_under(root: str | os.PathLike, src: str | os.PathLike, dst: str | os.PathLike,
                    max_files: int = 1000) -> None:
    """Copy the directory `src` (inside `root`) to `dst`, every file and directory opened through
    :func:`open_under` from a descriptor of the resolved `root`: what is copied is what lies under `root` when it is
    read, whatever is swapped for a symbolic link in between. A symbolic link to a file inside `root` is copied as
    that file (resolved, then opened without following links); one to a directory, or out of `root`, is refused."""
    import stat

    from .errors import DLPLoRAError

    root = Path(os.path.realpath(root))
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    count = [0]

    def copy_file(fd: int, target: Path) -> None:
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise DLPLoRAError(f"{target.name} is not a regular file; refused")
            with open(target, "xb") as out:
                while chunk := fh.read(1 << 20):
                    out.write(chunk)

    def copy_dir(path: Path, target: Path) -> None:
        fd = open_under(root_fd, root, path, directory=True)
        try:
            with os.scandir(fd) as it:
                entries = [(e.name, e.is_symlink(), e.is_dir(follow_symlinks=False)) for e in it]
        finally:
            os.close(fd)
        target.mkdir(parents=True)
        for name, link, is_dir in entries:
            count[0] += 1
            if count[0] > max_files:
                raise DLPLoRAError(f"{src} holds over {max_files} files; it is not an adapter directory")
            if is_dir:
                copy_dir(path / name, target / name)
            else:
                where = _under(root, path / name) if link else path / name
                copy_file(open_under(root_fd, root, where), target / name)

    try:
        copy_dir(Path(src), Path(dst))
    except (OSError, ValueError) as exc:
        raise DLPLoRAError(f"{src} cannot be copied from inside {root} without following a symbolic link: "
                           f"{exc}") from None
    finally:
        os.close(root_fd)
