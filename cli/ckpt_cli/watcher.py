"""watchdog events on the checkpoint directory -> "something changed" callbacks.

Only events that can change what a snapshot contains count: created, modified,
deleted, moved, closed-after-write. Opened and closed-without-write events (our
own reads!) are ignored, and so are paths whose every component-to-be is a
temp name. The callback gets the event type and the paths relative to the
directory (the worker tells an appender's growth from activity, and a waited
file's close is its cue). If the directory itself is replaced, ensure()
re-arms the watch.
Imports: standard library, watchdog (lazily, at start()).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ckpt_cli.snapshotter import is_ignored

_RELEVANT = frozenset({"created", "modified", "deleted", "moved", "closed"})


class Watcher:
    def __init__(
        self,
        root: Path,
        on_change: Callable[[str, Sequence[str]], None],
        patterns: Iterable[str],
    ) -> None:
        self.root = root
        self.on_change = on_change
        self.patterns = tuple(patterns)
        self._observer: Any = None
        self._ino = 0

    def relevant(self, event_type: str, paths: Iterable[str]) -> bool:
        return bool(self.relevant_paths(event_type, paths))

    def relevant_paths(self, event_type: str, paths: Iterable[str]) -> list[str]:
        """The paths of an event that count, relative to the directory."""
        if event_type not in _RELEVANT:
            return []
        out = []
        for p in paths:
            if not p:
                continue
            rel = os.path.relpath(p, self.root)
            if rel == ".":
                continue
            if not any(is_ignored(part, self.patterns) for part in rel.split(os.sep)):
                out.append(rel)
        return out

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                paths = (os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "")))
                rels = watcher.relevant_paths(event.event_type, paths)
                if rels:
                    watcher.on_change(event.event_type, rels)

        self._ino = os.stat(self.root).st_ino
        observer = Observer()
        observer.daemon = True
        observer.schedule(Handler(), str(self.root), recursive=True)
        observer.start()
        self._observer = observer

    def ensure(self) -> None:
        """Re-arm if the directory itself was replaced (inotify watches follow the
        old inode): a child that does rmtree + mkdir keeps being watched."""
        try:
            ino = os.stat(self.root).st_ino
        except OSError:
            return
        if self._observer is not None and ino != self._ino:
            self.stop()
            self.start()
            self.on_change("", ())

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
