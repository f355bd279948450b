"""One line of figures per diagnosis report: CPM with its interval, candidates and findings per CT, nodules found.

What the demo's generalisation table and ``bench/bench_generalisation.py`` print for each test set.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ReportSummary:
    """The figures of one ``report.json`` (``cpm`` is None for a set without annotations)."""

    cpm: float | None
    ci_low: float | None
    ci_high: float | None
    candidates_per_ct: float
    findings_per_ct: float
    nodules_found: int
    nodules: int

    def cpm_text(self) -> str:
        """``0.812 (0.61-0.95)``, or ``-``."""
        if self.cpm is None:
            return "-"
        interval = f" ({self.ci_low:.2f}-{self.ci_high:.2f})" if self.ci_low is not None else ""
        return f"{self.cpm:.3f}{interval}"

    def found_text(self) -> str:
        """``7/9``, or ``-`` without annotations."""
        return f"{self.nodules_found}/{self.nodules}" if self.nodules else "-"


def summarise_report(report_path: Path, threshold: float = 0.5) -> ReportSummary:
    """The figures of the diagnosis report at ``report_path``; a finding is a candidate with nodule probability
    >= ``threshold``; a nodule counts as found when a finding hit it (the report's ``finding`` > 0)."""
    report = json.loads(Path(report_path).read_text())
    series = report["series"]
    candidates = [len(entry["candidates"]) for entry in series]
    findings = [sum(c["nodule_probability"] >= threshold for c in entry["candidates"]) for entry in series]
    nodules = [n for entry in series for n in (entry.get("nodules") or [])]
    froc = report.get("froc") or {}
    return ReportSummary(
        cpm=froc.get("cpm"), ci_low=froc.get("ci_low"), ci_high=froc.get("ci_high"),
        candidates_per_ct=float(np.mean(candidates)) if candidates else 0.0,
        findings_per_ct=float(np.mean(findings)) if findings else 0.0,
        nodules_found=sum(n["finding"] > 0 for n in nodules), nodules=len(nodules))


def summary_table(rows: Sequence[tuple[str, ReportSummary]], indent: str = "  ") -> list[str]:
    """Aligned text lines: a header, then ``name, CPM (95% CI), cand./CT, findings/CT, nodules found``."""
    lines = [f"{indent}{'set':<10} {'CPM (95% CI)':<20} {'cand./CT':>9} {'findings/CT':>12} {'nodules found':>14}"]
    for name, row in rows:
        lines.append(f"{indent}{name:<10} {row.cpm_text():<20} {row.candidates_per_ct:>9.0f} "
                     f"{row.findings_per_ct:>12.1f} {row.found_text():>14}")
    return lines
