"""Run the ckpt command line with timestamps around the calls that make up a
`ckpt run`'s start, without changing ckpt: the split of case 10.

    PYTHON bench/_phases.py OUT.json [ckpt arguments...]

It imports ckpt_cli.main as the console script does (the time that took is
recorded), imports the modules `ckpt run` imports lazily, wraps each function
of CALLS (every reference to it in ckpt_cli's modules, or the method on its
class) so that each call appends [label, start, end] (epoch seconds) to a
list, runs main() and writes the list to OUT.json when the process exits. A
name that no longer exists is reported in OUT.json ("missing"), not fatal:
the split then has one row fewer. The wrappers cost a few microseconds per
call; the functions wrapped are called a handful of times per run.
"""

import time

T0 = time.time()

import atexit  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

#: label -> "module:qualified name", in the order of a `ckpt run`.
CALLS = {
    "open the remote": "ckpt_cli.backends:open_backend",
    "read ckpt.json": "ckpt_cli.repository:Repository.open",
    "take the lease": "ckpt_cli.lease:Lease.acquire",
    "read the run history": "ckpt_cli.history:load_runs",
    "bring --dir to the snapshot": "ckpt_cli.restore:prepare_rank_dir",
    "list snapshots": "ckpt_cli.repository:Repository.snapshots",
    "read the manifest": "ckpt_cli.repository:Repository.load",
    "transfer": "ckpt_cli.restore:materialise",
    "swap in": "ckpt_cli.restore:swap_in",
    "start the run history": "ckpt_cli.history:RunHistory.start",
    "start the child": "ckpt_cli.run.child:Child.__init__",
    "final flush": "ckpt_cli.run.flush:FinalFlush.run",
    "close the run history": "ckpt_cli.history:RunHistory.close",
    "release the lease": "ckpt_cli.lease:Lease.release",
}
#: What `ckpt run` imports after ckpt_cli.main (lazily, in the command).
LAZY = ("ckpt_cli.run.supervisor", "ckpt_cli.restore", "ckpt_cli.history", "ckpt_cli.lease")

calls: list[list[Any]] = []
record: dict[str, Any] = {"t0": T0, "calls": calls, "missing": []}


def _wrap(label: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            calls.append([label, start, time.time()])

    return timed


def _patch(label: str, spec: str) -> bool:
    module_name, _, qual = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    *owners, name = qual.split(".")
    owner: Any = module
    for part in owners:
        owner = getattr(owner, part, None)
        if owner is None:
            return False
    if owners:  # a method: wrap it on its class, keeping classmethods what they are
        raw = owner.__dict__.get(name)
        if raw is None:
            return False
        if isinstance(raw, classmethod):
            setattr(owner, name, classmethod(_wrap(label, raw.__func__)))
        elif isinstance(raw, staticmethod):
            setattr(owner, name, staticmethod(_wrap(label, raw.__func__)))
        else:
            setattr(owner, name, _wrap(label, raw))
        return True
    original = getattr(module, name, None)
    if original is None:
        return False
    timed = _wrap(label, original)
    for mod in list(sys.modules.values()):  # every `from X import name` of it
        ours = getattr(mod, "__name__", "").startswith(("ckpt_cli", "ckpt."))
        if ours and getattr(mod, name, None) is original:
            setattr(mod, name, timed)
    return True


def _write() -> None:
    record["t_end"] = time.time()
    with open(record["out"], "w") as f:
        json.dump(record, f)


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    record["out"] = out
    import ckpt_cli.main as cli

    record["t_main_imported"] = time.time()
    for name in LAZY:
        importlib.import_module(name)
    record["t_lazy_imported"] = time.time()
    for label, spec in CALLS.items():
        if not _patch(label, spec):
            record["missing"].append(spec)
    atexit.register(_write)
    sys.argv = ["ckpt", *argv]
    sys.exit(cli.main())


if __name__ == "__main__":
    main()
