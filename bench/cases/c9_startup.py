"""Case 9: start-up. `ckpt --help` and a `ckpt run` of `true` against
`python -c pass` on the same interpreter, and which modules `--help` imports."""

import dataclasses

from _common import Bench, Case, Proc, Table, median, rmtree, timing_table

NUMBER = 9
TITLE = "Start-up"

HELP_LIMIT = 0.25
#: Modules `ckpt --help` must not import (storage libraries, the watcher, the
#: rich parts only some commands use); a submodule counts as its package.
LAZY = (
    "s3fs", "gcsfs", "adlfs", "sshfs", "botocore", "aiobotocore", "watchdog", "rich.table",
    "rich.progress",
)  # fmt: skip


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c9")
    commands = {
        "python -c pass": lambda: [b.python, "-c", "pass"],
        "ckpt --help": lambda: [b.ckpt, "--help"],
        "ckpt run ... -- true": lambda: b.ckpt_run(out / "dir", out / "remote", command=["true"]),
    }
    series: dict[str, list[Proc]] = {name: [] for name in commands}
    for _ in range(a.startup_runs):
        for name, argv in commands.items():
            rmtree(out / "dir")
            rmtree(out / "remote")
            series[name].append(b.run(argv()))

    imports = _imports(b)
    forbidden = sorted(m for m in imports if any(m == x or m.startswith(x + ".") for x in LAZY))
    root = max(imports.values(), key=lambda n: n.cumulative)
    heavy = sorted(root.children, key=lambda n: -n.cumulative)[:10]
    heavy_self = sorted(imports.values(), key=lambda n: -n.self_us)[:10]
    help_s = median(p.seconds for p in series["ckpt --help"])
    base = median(p.seconds for p in series["python -c pass"])
    run_s = median(p.seconds for p in series["ckpt run ... -- true"])

    case.conditions = (
        "Nothing is written but `ckpt run`'s empty local repository (no fsync). The "
        "interpreter, ckpt's modules and the tools are in the page cache: the suite ran them "
        "before (the first of the runs counts too)."
    )
    case.method = [
        f"Each command runs {a.startup_runs} times, interleaved; medians of whole processes. "
        f"`python -c pass` runs on the interpreter of the ckpt script ({b.python}). `ckpt run` "
        "gets a fresh --dir and a fresh local remote every time. Imports: `python -X "
        "importtime CKPT --help` (the console script itself, on its interpreter), "
        f"{len(imports)} modules; the check fails if any of {', '.join(LAZY)} (or a "
        "submodule) is among them.",
    ]
    case.tables = [
        timing_table(series, title="Wall time of each whole process"),
        Table(
            ["measure", "s", "minus python -c pass"],
            [
                ["ckpt --help", f"{help_s:.3f}", f"{help_s - base:.3f}"],
                ["ckpt run ... -- true", f"{run_s:.3f}", f"{run_s - base:.3f}"],
            ],
        ),
        Table(
            ["import", "cumulative ms", "self ms", "mostly through"],
            [[n.name, _ms(n.cumulative), _ms(n.self_us), _chain(n)] for n in heavy],
            f"The heaviest imports of {root.name} ({_ms(root.cumulative)} ms in all), "
            "each with its heaviest chain of nested imports",
        ),
        Table(
            ["module", "self ms"],
            [[n.name, _ms(n.self_us)] for n in heavy_self],
            "Modules with the largest own import time",
        ),
    ]
    case.notes.append(
        "Modules that should stay lazy but were imported by `ckpt --help`: "
        + (", ".join(forbidden) if forbidden else "none")
        + f". Sum of all import times (self): {_ms(sum(n.self_us for n in imports.values()))} ms."
    )
    case.target(
        "ckpt --help", help_s, "<", HELP_LIMIT, "s", "median wall time of the whole process"
    )
    case.target(
        "modules that should be lazy, imported by ckpt --help",
        len(forbidden),
        "==",
        0,
        "",
        f"count of imported modules among {', '.join(LAZY)} (and their submodules)",
    )
    return case


@dataclasses.dataclass
class Import:
    name: str
    self_us: int
    cumulative: int
    children: list["Import"] = dataclasses.field(default_factory=list)


def _ms(us: int) -> str:
    return f"{us / 1000:.1f}"


def _chain(node: Import) -> str:
    """The path down through the heaviest child, while it carries most of the time."""
    parts = []
    while node.children:
        child = max(node.children, key=lambda n: n.cumulative)
        if child.cumulative < node.cumulative / 2:
            break
        parts.append(f"{child.name} {_ms(child.cumulative)}")
        node = child
    return " > ".join(parts)


def _imports(b: Bench) -> dict[str, Import]:
    """Every module `ckpt --help` imports, from -X importtime, as a tree: the
    output lists a module after the ones it imported, indented one level more."""
    proc = b.run([b.python, "-X", "importtime", b.ckpt, "--help"])
    found: dict[str, Import] = {}
    pending: list[tuple[int, Import]] = []  # (depth, node) not yet given a parent
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, cumulative, name = line[len("import time:") :].split("|", 2)
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        node = Import(name.strip(), int(self_us), int(cumulative))
        while pending and pending[-1][0] > depth:
            node.children.insert(0, pending.pop()[1])
        pending.append((depth, node))
        found[node.name] = node
    return found
