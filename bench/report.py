"""bench/RESULTS.md, and the results.json beside it it is rendered from.

Each section of a run replaces that section in results.json; sections not run this time
(``--only``) keep their last results, each dated, with the machine and command it ran
on. Every row holds a figure, the baseline it is compared with (measured in the same
run as it), their ratio, the target and whether it is met.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    measure: str
    kinod: str
    baseline: str = "—"
    ratio: str = "—"
    target: str = "—"
    met: bool | None = None


@dataclass
class Section:
    key: str
    title: str
    about: str  # what is measured, and how
    rows: list[Row] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # more Markdown: raw figures, notes
    measured: str = ""  # when, on what, with which command: set by ``save``

    def add(self, *args, **kwargs) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        print(f"  {row.measure}: {row.kinod}; baseline {row.baseline}; ratio {row.ratio}; "
              f"target {row.target}{'' if row.met is None else ': ' + verdict(row.met)}",
              flush=True)
        return row


def verdict(met: bool | None) -> str:
    return "—" if met is None else "met" if met else "**not met**"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def save(sections: list[Section], out: Path, stamp: str, order: list[str]) -> None:
    """Merge this run's sections into ``out``'s JSON and render ``out``."""
    store_path = out.with_suffix(".json")
    store = {}
    if store_path.exists():
        try:
            store = json.loads(store_path.read_text())
        except ValueError:
            store = {}
    for section in sections:
        section.measured = stamp
        store[section.key] = asdict(section)
    store_path.write_text(json.dumps(store, indent=1, ensure_ascii=False) + "\n")
    known = [Section(**{**data, "rows": [Row(**row) for row in data["rows"]]})
             for key in order if (data := store.get(key))]
    out.write_text(render(known))


def render(sections: list[Section]) -> str:
    lines = ["# kinod benchmarks", "",
             "Written by `make bench` (`bench/run.py`). No-op jobs, so only kinod's own cost "
             "is measured; each figure is set beside a baseline measured in the same run. "
             "Shared machines are noisy: compare ratios, not seconds.", ""]
    stamps = sorted({s.measured for s in sections})
    lines += [f"Measured: {stamp}" + "  " for stamp in stamps] + [""]
    summary = [[s.title, r.measure, r.kinod, r.target, verdict(r.met)]
               for s in sections for r in s.rows if r.met is not None]
    met = sum(1 for s in sections for r in s.rows if r.met)
    lines += [f"## Targets: {met} of {len(summary)} met", ""]
    lines += table(["section", "measure", "kinod", "target", "met"], summary) + [""]
    for s in sections:
        lines += [f"## {s.title}", "", s.about, ""]
        if len(stamps) > 1:
            lines += [f"_Measured {s.measured}._", ""]
        lines += table(["measure", "kinod", "baseline", "ratio", "target", "met"],
                       [[r.measure, r.kinod, r.baseline, r.ratio, r.target, verdict(r.met)]
                        for r in s.rows])
        lines += [""] + s.extra + ([""] if s.extra else [])
    return "\n".join(lines).rstrip() + "\n"
