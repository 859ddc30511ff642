"""Benchmarks for pulumid.

- `python -m benchmarks.run`: the real `pulumi` CLI running the same YAML workload against
  pulumid, the CLI's own `file://` and `s3://` (MinIO) backends and a no-checkpoint floor;
  writes a CSV of every measurement, a Markdown table of medians and a PNG chart.
- `python -m benchmarks.micro`: server-side micro benchmarks that drive pulumid's HTTP API
  directly over loopback.

See docs/benchmarks.md.
"""
