"""The benchmark report's tables (benchmarks/report.py), from measurements made up here."""

from __future__ import annotations

from benchmarks.report import Measurement, markdown_tables, medians


def test_a_size_lists_only_the_backends_measured_at_it() -> None:
    runs = [
        Measurement(backend, size, op, repeat, seconds, rss, cpu)
        for backend, sizes, rss, cpu in (
            ("pulumid", (10, 3000), 80.0, 0.5),
            ("floor", (10, 3000), None, None),
            ("file", (10,), None, None),
        )
        for size in sizes
        for repeat, seconds in ((1, 1.0), (2, 3.0), (3, 2.0))
        for op in ("create", "destroy")
    ]
    tables = markdown_tables(medians(runs))
    small, large = tables.split("### 3000 resources")
    assert "| create | file | 2.00 | 1.00 | 1.00 | — | — |" in small
    assert "| **total** | pulumid | 4.00 | 1.00 | 1.00 | 80.0 | 1.00 |" in small
    assert "| file |" not in large
    assert "| create | floor | 2.00 |" in large
