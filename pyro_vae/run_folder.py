"""One writer per run folder: a lock naming its owner, and an old run kept until a new one has
completed an epoch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .callbacks import Callback
from .run_dir import RunDir

__all__ = ["LOCK", "PREVIOUS", "CommitOnFirstEpoch", "RunFolder", "RunFolderBusy"]

#: The lock file inside a run folder: ``{"pid", "host"}`` of the process writing the run.
LOCK = ".lock"
#: Where ``--overwrite`` keeps the old run until the new one has completed an epoch.
PREVIOUS = ".previous"
#: The file whose presence means a run has completed an epoch.
_COMPLETED = RunDir.LAST


class RunFolderBusy(ValueError):
    """Another live process holds the run folder's lock."""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunFolder:
    """A run folder written by one process at a time.

    ``acquire`` takes ``RUN/.lock`` (created exclusively, holding the pid and host). A lock
    of a live process refuses with :class:`RunFolderBusy`; one left by a process of this host
    that has ended is taken over, with a note on stderr. ``set_aside`` moves an old run into
    ``RUN/.previous``; ``commit`` (after the new run's first epoch) deletes it, ``restore``
    (when the new run ends before completing an epoch) puts it back. A process killed in
    between leaves both; the next ``acquire`` resolves them: the new run wins once it holds
    ``last.pt``, else the old one comes back.

    Args:
        path: The run folder.
        outputs: The run's files and folders in a folder (default: every entry but the lock
            and the kept old run); only they are set aside, dropped or brought back.
    """

    def __init__(
        self, path: str | Path, outputs: Callable[[Path], list[Path]] | None = None
    ) -> None:
        self.path = Path(path)
        self._outputs = outputs
        self.lock_path = self.path / LOCK
        self.previous = self.path / PREVIOUS
        self.notes: list[str] = []
        self._held = False

    # ------------------------------------------------------------ the lock

    def owner(self) -> dict[str, Any] | None:
        """The lock's ``{"pid", "host"}``, ``{}`` for an unreadable lock, None without one."""
        try:
            text = self.lock_path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            owner = json.loads(text)
        except ValueError:
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> RunFolder:
        """Take the lock (creating the folder); RunFolderBusy while a live process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._clear_stale_lock()
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self._held = True
            self._resolve_interrupted_overwrite()
            return self
        raise RunFolderBusy(f"{self.path}: could not take {LOCK}; another process keeps taking it")

    def _clear_stale_lock(self) -> None:
        """Remove a lock whose process has ended; RunFolderBusy for a live or foreign one."""
        owner = self.owner()
        if owner is None:
            return  # released meanwhile
        pid, host = owner.get("pid"), owner.get("host")
        here = host == socket.gethostname()
        if isinstance(pid, int) and here and not _alive(pid):
            if self.owner() == owner:  # still the same stale lock
                self.lock_path.unlink(missing_ok=True)
                self._note(f"{self.lock_path} was left by process {pid}, which has ended; taken")
            return
        who = f"process {pid} on {host}" if isinstance(pid, int) else "an unknown process"
        raise RunFolderBusy(
            f"{self.path} is being written by {who} (lock {self.lock_path}); wait for it or "
            f"stop it, and delete the lock only if no process writes this run"
        )

    def release(self) -> None:
        """Give the lock back (only a lock this process holds)."""
        if self._held and (self.owner() or {}).get("pid") == os.getpid():
            self.lock_path.unlink(missing_ok=True)
        self._held = False

    def __enter__(self) -> RunFolder:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------ replacing a run

    def entries(self) -> list[Path]:
        """The run's files and folders (``outputs``), never the lock or the kept old run."""
        if not self.path.is_dir():
            return []
        found = self._outputs(self.path) if self._outputs else list(self.path.iterdir())
        return sorted(p for p in found if p.name not in (LOCK, PREVIOUS))

    def set_aside(self) -> None:
        """Move the run in the folder into ``.previous``, where it stays until commit/restore.

        ``last.pt`` moves first: a process killed midway leaves a folder without it, which
        the next ``acquire`` restores.
        """
        self.previous.mkdir()
        for entry in sorted(self.entries(), key=lambda p: p.name != _COMPLETED):
            entry.rename(self.previous / entry.name)

    def commit(self) -> None:
        """The new run has completed an epoch: delete the old one."""
        if self.previous.exists():
            shutil.rmtree(self.previous)

    def restore(self) -> bool:
        """Drop the new run's files and bring the old run back; whether there was one."""
        if not self.previous.is_dir():
            return False
        for entry in self.entries():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        for entry in sorted(self.previous.iterdir()):
            entry.rename(self.path / entry.name)
        self.previous.rmdir()
        return True

    def _resolve_interrupted_overwrite(self) -> None:
        """An overwrite whose process died: the new run stays if it completed an epoch."""
        if not self.previous.is_dir():
            return
        if (self.path / _COMPLETED).exists():
            self.commit()
        elif self.restore():
            self._note(
                f"{self.path}: an overwrite ended before its first epoch; the previous run "
                "was put back"
            )

    def _note(self, text: str) -> None:
        self.notes.append(text)
        print(f"pyro-vae: {text}", file=sys.stderr)


class CommitOnFirstEpoch(Callback):
    """Calls ``commit()`` once, when the first epoch has been recorded."""

    def __init__(self, commit: Any) -> None:  # noqa: ANN401
        self._commit, self._done = commit, False

    def on_epoch_end(self, epoch: int, row: dict[str, Any], vae: Any) -> None:  # noqa: ANN401
        if not self._done:
            self._done = True
            self._commit()
