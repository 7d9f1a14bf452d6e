"""watchdog events on the checkpoint directory -> "something changed" callbacks.

Only events that can change what a snapshot contains count: created, modified,
deleted, moved, closed-after-write. Opened and closed-without-write events (our
own reads!) are ignored, and so are paths whose every component-to-be is a
temp name, and a directory's "modified" (watchdog adds one for the parent
of every create, delete, move and close-after-write, which come with their
own events: without it, an appender that closes after each line is not
activity twice over). The callback gets the event type and the paths
relative to the directory (the worker tells an appender's growth from
activity, and a waited file's close is its cue); a kernel queue overflow
("events_lost") is a change of unknown paths. If the directory itself is
replaced, ensure() re-arms the watch.
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
        from watchdog import events
        from watchdog.observers import Observer

        watcher = self

        class Handler(events.FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.event_type == "events_lost":
                    watcher.on_change("", ())
                    return
                if event.is_directory and event.event_type == "modified":
                    return
                paths = (os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "")))
                rels = watcher.relevant_paths(event.event_type, paths)
                if rels:
                    watcher.on_change(event.event_type, rels)

        self._ino = os.stat(self.root).st_ino
        observer = Observer()
        observer.daemon = True
        wanted = [  # not opened / closed_no_write: ckpt's own reads make them
            events.FileCreatedEvent,
            events.DirCreatedEvent,
            events.FileModifiedEvent,
            events.FileDeletedEvent,
            events.DirDeletedEvent,
            events.FileMovedEvent,
            events.DirMovedEvent,
            events.FileClosedEvent,
            events.EventsLostEvent,
        ]
        observer.schedule(Handler(), str(self.root), recursive=True, event_filter=wanted)
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
