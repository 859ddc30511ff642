"""Results of a benchmark run: the CSV of measurements, the Markdown table of medians, the
PNG chart, and the generated results section of docs/benchmarks.md."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, BenchmarkError

CSV_FIELDS = ("backend", "size", "operation", "repeat", "seconds", "peak_rss_mib", "cpu_seconds")
REFERENCE = "pulumid"
FLOOR = "floor"
DOCS_PAGE = REPO / "docs" / "benchmarks.md"
DOCS_CHART = REPO / "docs" / "benchmarks.png"
RESULTS_START = "<!-- benchmark-results:start -->"
RESULTS_END = "<!-- benchmark-results:end -->"


@dataclass(frozen=True)
class Measurement:
    backend: str
    size: int
    operation: str
    repeat: int
    seconds: float
    # The backend's server processes during the operation; None without a server of ours
    # (file, s3, floor) and in CSVs from before these were measured.
    peak_rss_mib: float | None = None
    cpu_seconds: float | None = None


# --------------------------------------------------------------------------------------------
# CSV


def write_csv(path: Path, measurements: Iterable[Measurement]) -> None:
    with path.open("w", newline="", encoding="utf-8") as sink:
        writer = csv.writer(sink)
        writer.writerow(CSV_FIELDS)
        for m in measurements:
            writer.writerow(
                [
                    m.backend,
                    m.size,
                    m.operation,
                    m.repeat,
                    f"{m.seconds:.4f}",
                    _optional(m.peak_rss_mib, 1),
                    _optional(m.cpu_seconds, 3),
                ]
            )


def _optional(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _optional_float(text: str | None) -> float | None:
    """An optional column: empty, or missing altogether in an older CSV, is None."""
    return float(text) if text else None


def read_csv(path: Path) -> list[Measurement]:
    if not path.is_file():
        raise BenchmarkError(f"no measurements at {path}")
    with path.open(newline="", encoding="utf-8") as source:
        return [
            Measurement(
                backend=row["backend"],
                size=int(row["size"]),
                operation=row["operation"],
                repeat=int(row["repeat"]),
                seconds=float(row["seconds"]),
                peak_rss_mib=_optional_float(row.get("peak_rss_mib")),
                cpu_seconds=_optional_float(row.get("cpu_seconds")),
            )
            for row in csv.DictReader(source)
        ]


# --------------------------------------------------------------------------------------------
# Medians


Key = tuple[str, int, str]


@dataclass(frozen=True)
class Medians:
    """Median seconds per (backend, size, operation), in the order things were first seen,
    and the medians of the server's peak RSS (MiB) and CPU seconds where measured."""

    values: Mapping[Key, float]
    counts: Mapping[Key, int]
    backends: Sequence[str]
    sizes: Sequence[int]
    operations: Sequence[str]
    peak_rss: Mapping[Key, float] = field(default_factory=dict)
    cpu: Mapping[Key, float] = field(default_factory=dict)

    def get(self, backend: str, size: int, operation: str) -> float | None:
        return self.values.get((backend, size, operation))

    def total(self, backend: str, size: int) -> float | None:
        """Sum of a backend's medians over all operations, if it has every one of them."""
        return _sum(self._all(self.values, backend, size))

    def peak_rss_mib(self, backend: str, size: int, operation: str) -> float | None:
        """The median peak RSS; for "total", the highest over the operations."""
        if operation == "total":
            parts = self._all(self.peak_rss, backend, size)
            return None if parts is None else max(parts, default=None)
        return self.peak_rss.get((backend, size, operation))

    def cpu_seconds(self, backend: str, size: int, operation: str) -> float | None:
        """The median CPU seconds; for "total", the sum over the operations."""
        if operation == "total":
            return _sum(self._all(self.cpu, backend, size))
        return self.cpu.get((backend, size, operation))

    def backends_at(self, size: int) -> list[str]:
        """The backends measured at SIZE (the CLI's own backends stop at --quadratic-max)."""
        return [
            b for b in self.backends if any((b, size, op) in self.values for op in self.operations)
        ]

    def _all(self, values: Mapping[Key, float], backend: str, size: int) -> list[float] | None:
        """The values of every operation, or None if one is missing."""
        parts = [values.get((backend, size, op)) for op in self.operations]
        return None if any(p is None for p in parts) else [p for p in parts if p is not None]


def _sum(parts: list[float] | None) -> float | None:
    return None if parts is None else sum(parts)


def _medians_of(samples: Mapping[Key, list[float]]) -> dict[Key, float]:
    return {key: statistics.median(values) for key, values in samples.items() if values}


def medians(measurements: Sequence[Measurement], backend_order: Sequence[str] = ()) -> Medians:
    samples: dict[Key, list[float]] = {}
    peaks: dict[Key, list[float]] = {}
    cpus: dict[Key, list[float]] = {}
    backends: list[str] = list(dict.fromkeys(backend_order))
    operations: list[str] = []
    sizes: list[int] = []
    for m in measurements:
        key = (m.backend, m.size, m.operation)
        samples.setdefault(key, []).append(m.seconds)
        if m.peak_rss_mib is not None:
            peaks.setdefault(key, []).append(m.peak_rss_mib)
        if m.cpu_seconds is not None:
            cpus.setdefault(key, []).append(m.cpu_seconds)
        if m.backend not in backends:
            backends.append(m.backend)
        if m.operation not in operations:
            operations.append(m.operation)
        if m.size not in sizes:
            sizes.append(m.size)
    present = {b for b, _, _ in samples}
    return Medians(
        values=_medians_of(samples),
        counts={key: len(values) for key, values in samples.items()},
        backends=[b for b in _reference_first(backends) if b in present],
        sizes=sorted(sizes),
        operations=operations,
        peak_rss=_medians_of(peaks),
        cpu=_medians_of(cpus),
    )


def _reference_first(backends: Sequence[str]) -> list[str]:
    """pulumid first, then the floor, then the rest in their given order."""
    head = [b for b in (REFERENCE, FLOOR) if b in backends]
    return head + [b for b in backends if b not in head]


# --------------------------------------------------------------------------------------------
# Markdown


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference <= 0:
        return "—"
    return f"{value / reference:.2f}"


def markdown_tables(result: Medians, heading_level: int = 3) -> str:
    """One table per size: every operation (and the total) for every backend, with the
    median in seconds, its ratio to pulumid's and to the floor's median, and the median peak
    RSS and CPU seconds of the backend's server during the operation."""
    hashes = "#" * heading_level
    out: list[str] = []
    for size in result.sizes:
        repeats = max((n for (_, s, _), n in result.counts.items() if s == size), default=0)
        out += [
            f"{hashes} {size} resources",
            "",
            f"Median wall-clock seconds of {repeats} run{'s' if repeats != 1 else ''}; "
            f"`vs {REFERENCE}` and `vs {FLOOR}` are the median divided by that backend's "
            "median (below 1 is faster). `Peak RSS` and `CPU` are the medians of the backend "
            "server's highest resident memory and of the user + system CPU seconds it used "
            "during the operation, summed over its processes (over all nodes for several); "
            "for the total, the highest peak and the sum of CPU. — where the backend has no "
            "server of ours (the CLI's own file and S3 backends and the floor).",
            "",
            f"| Operation | Backend | Median (s) | vs {REFERENCE} | vs {FLOOR} "
            "| Peak RSS (MiB) | CPU (s) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for operation in [*result.operations, "total"]:
            for backend in result.backends_at(size):
                if operation == "total":
                    value = result.total(backend, size)
                    ref = result.total(REFERENCE, size)
                    floor = result.total(FLOOR, size)
                else:
                    value = result.get(backend, size, operation)
                    ref = result.get(REFERENCE, size, operation)
                    floor = result.get(FLOOR, size, operation)
                label = f"**{operation}**" if operation == "total" else operation
                peak = result.peak_rss_mib(backend, size, operation)
                cpu = result.cpu_seconds(backend, size, operation)
                out.append(
                    f"| {label} | {backend} | {_seconds(value)} | "
                    f"{_ratio(value, ref)} | {_ratio(value, floor)} | "
                    f"{_mib(peak)} | {_seconds(cpu)} |"
                )
        out.append("")
    return "\n".join(out)


def machine_lines(meta: Mapping[str, Any]) -> list[str]:
    machine = meta.get("machine") or {}
    versions = meta.get("versions") or {}
    lines = [
        f"- Date: {meta.get('date', '?')}",
        f"- Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"{machine.get('memory', '?')} RAM, {machine.get('os', '?')}",
        f"- Versions: pulumid {versions.get('pulumid', '?')}, "
        f"pulumi CLI {versions.get('cli', '?')}, "
        f"pulumi-language-yaml {versions.get('yaml', '?')}, "
        f"Python {versions.get('python', '?')}"
        + (f", MinIO {versions['minio']}" if versions.get("minio") else "")
        + (f", PostgreSQL {versions['postgresql']}" if versions.get("postgresql") else "")
        + (f", HAProxy {versions['haproxy']}" if versions.get("haproxy") else ""),
        f"- Workload: {meta.get('workload', '?')}",
        f"- Command: `{meta.get('command', '?')}`",
    ]
    settings = meta.get("postgresql_settings") or []
    if settings:
        lines.append(f"- PostgreSQL settings: `{'`, `'.join(settings)}`")
    peers = meta.get("peers") or {}
    lines += [f"- Peer `{name}`: `{command}`" for name, command in peers.items()]
    return lines


def markdown_report(result: Medians, meta: Mapping[str, Any]) -> str:
    return "\n".join(
        ["# pulumid benchmark results", "", *machine_lines(meta), "", markdown_tables(result, 2)]
    )


# --------------------------------------------------------------------------------------------
# Chart


def write_chart(result: Medians, path: Path) -> None:
    """Grouped bars of the medians: one panel per size, operations on the x axis, one bar
    per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result.sizes)
    operations = list(result.operations)
    backends = list(result.backends)
    if not sizes or not operations or not backends:
        raise BenchmarkError("nothing to chart: no measurements")
    fig, axes = plt.subplots(
        len(sizes), 1, figsize=(max(8.0, 1.6 * len(operations)), 3.6 * len(sizes)), squeeze=False
    )
    width = 0.8 / len(backends)
    for row, size in enumerate(sizes):
        ax = axes[row][0]
        for i, backend in enumerate(backends):
            xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(operations))]
            ys = [result.get(backend, size, op) or 0.0 for op in operations]
            bars = ax.bar(xs, ys, width, label=backend)
            ax.bar_label(bars, labels=[_seconds(y) if y else "" for y in ys], fontsize=6)
        ax.set_xticks(range(len(operations)), operations)
        ax.set_ylabel("median seconds")
        ax.set_title(f"{size} resources (16 KB of state each)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(fontsize=8, ncols=min(len(backends), 5))
        ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Files of a run, and the docs


def write_meta(path: Path, meta: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_meta(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return value if isinstance(value, dict) else {}


def write_reports(
    out: Path, measurements: Sequence[Measurement], meta: Mapping[str, Any]
) -> tuple[Path, Path, Path]:
    """OUT/measurements.csv, OUT/results.md and OUT/benchmarks.png; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (
        out / "measurements.csv",
        out / "results.md",
        out / "benchmarks.png",
    )
    write_csv(csv_path, measurements)
    result = medians(measurements, meta.get("backends") or ())
    md_path.write_text(markdown_report(result, meta), encoding="utf-8")
    write_chart(result, png_path)
    return csv_path, md_path, png_path


def docs_section(result: Medians, meta: Mapping[str, Any]) -> str:
    return "\n".join(
        [
            RESULTS_START,
            "<!-- Generated by `python -m benchmarks.run --write-docs`; edits here are lost. -->",
            "",
            *machine_lines(meta),
            "",
            "![Median seconds per operation and backend](benchmarks.png)",
            "",
            markdown_tables(result, 3).rstrip(),
            RESULTS_END,
        ]
    )


def write_docs(out: Path, page: Path = DOCS_PAGE, chart: Path = DOCS_CHART) -> None:
    """Replace the generated results section of docs/benchmarks.md (between the markers) with
    the run in OUT, and copy its chart to docs/benchmarks.png."""
    measurements = read_csv(out / "measurements.csv")
    meta = read_meta(out / "meta.json")
    result = medians(measurements, meta.get("backends") or ())
    text = page.read_text(encoding="utf-8")
    start, end = text.find(RESULTS_START), text.find(RESULTS_END)
    if start < 0 or end < start:
        raise BenchmarkError(f"{page} has no {RESULTS_START} ... {RESULTS_END} section")
    new = text[:start] + docs_section(result, meta) + text[end + len(RESULTS_END) :]
    page.write_text(new, encoding="utf-8")
    png = out / "benchmarks.png"
    if not png.is_file():
        write_chart(result, png)
    shutil.copyfile(png, chart)
