"""Throughput of one pulumid node against several behind HAProxy, with the real CLI.

    python -m benchmarks.cluster [--nodes 1,3] [--stacks 20] [--items 200] [--delay-ms 0]
                                 [--cli 3.259.0] [--out DIR]

Starts one durable PostgreSQL (benchmarks.common.postgres_server) and one MinIO, then for each
node count N: a fresh database and S3 prefix, N `twistd pulumid` nodes on them and, when
N > 1, HAProxy in front (round robin per request; tests/cluster/harness.py). K CLIs (K =
--stacks, each with its own PULUMI_HOME) log in and `stack init` (untimed), then run
`pulumi up` of a YAML program of --items chained test resources on K different stacks at
once; the wall time from the first start to the last exit is measured, and every stack's
export is checked for exactly its items. Prints a table with updates per minute and the
ratio against the first node count. Needs the artifacts of the end-to-end tests (the CLI,
the YAML host, the test provider, MinIO), PostgreSQL and HAProxy (scripts/install-*.sh).

Everything runs on this machine: the CLIs compete with the nodes for its cores, so the ratio
says how far more nodes help when the backend, not the CLIs, is the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from benchmarks.common import (
    MINIO_PASSWORD,
    MINIO_USER,
    BenchmarkError,
    PostgresError,
    build_minio,
    build_provider,
    free_port,
    minio_server,
    positive_ints,
    postgres_server,
    yaml_host_dir,
)
from tests.cluster.harness import Cluster, cluster_cli, cluster_project
from tests.e2e.helpers import Background, PulumiCLI, resources
from tests.e2e.programs import ITEM_TYPE
from tests.minio import BUCKET, s3_url

UP = ("up", "--yes", "--skip-preview")


@dataclass(frozen=True)
class Result:
    nodes: int
    stacks: int
    items: int
    seconds: float

    @property
    def per_minute(self) -> float:
        return self.stacks * 60.0 / self.seconds


def _aws_environment() -> None:
    """MinIO's credentials for boto3's default chain in this process and the nodes (Daemon
    passes AWS_* on), and nothing from this machine's own AWS setup."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(
        AWS_ACCESS_KEY_ID=MINIO_USER,
        AWS_SECRET_ACCESS_KEY=MINIO_PASSWORD,
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )


def _item_count(cli: PulumiCLI, directory: Path, stack: str) -> Counter[str]:
    exported = json.loads(
        cli.run("stack", "export", "--stack", f"acme/{stack}", cwd=directory).stdout
    )
    return Counter(
        str(r["urn"]).rsplit("::", 1)[-1] for r in resources(exported) if r["type"] == ITEM_TYPE
    )


def run_one(
    nodes: int,
    args: argparse.Namespace,
    workdir: Path,
    database: str,
    blob_store: str,
    provider_dir: Path,
    yaml_dir: Path,
) -> Result:
    cluster = Cluster(workdir / "cluster", database, blob_store, size=nodes).start()
    try:
        spaces: list[tuple[PulumiCLI, Path, str]] = []
        for i in range(args.stacks):
            stack = f"s{i:02d}"
            cli = cluster_cli(args.cli, cluster, workdir / f"cli{i}", yaml_dir, provider_dir)
            directory = cluster_project(
                cli,
                cluster,
                workdir / f"project{i}",
                provider_dir,
                items=args.items,
                delay_ms=args.delay_ms,
            )
            spaces.append((cli, directory, stack))
        with ThreadPoolExecutor(4) as pool:
            for future in [
                pool.submit(cli.run, "stack", "init", f"acme/{stack}", cwd=directory)
                for cli, directory, stack in spaces
            ]:
                future.result()

        started = time.monotonic()
        runs: list[Background] = [cli.popen(*UP, cwd=directory) for cli, directory, _ in spaces]
        try:
            codes = [run.wait(timeout=args.timeout) for run in runs]
        finally:
            for run in runs:
                run.kill()
        seconds = time.monotonic() - started

        failed = [
            f"{stack}: exit {code}\n{run.output()[-2000:]}"
            for (_cli, _dir, stack), run, code in zip(spaces, runs, codes, strict=True)
            if code != 0
        ]
        if failed:
            raise BenchmarkError(
                f"{len(failed)} updates failed with {nodes} node(s):\n" + failed[0]
            )
        expected = Counter(f"item{i}" for i in range(args.items))
        for cli, directory, stack in spaces:
            if _item_count(cli, directory, stack) != expected:
                raise BenchmarkError(f"{stack} does not hold exactly its {args.items} items")
        if cluster.proxy is not None:
            per_node = Counter(e.node for e in cluster.proxy.log_entries())
            print(f"  requests per node (HAProxy): {dict(sorted(per_node.items()))}", flush=True)
        return Result(nodes, args.stacks, args.items, seconds)
    finally:
        cluster.stop()


def table(results: list[Result]) -> str:
    base = results[0]
    lines = [
        f"{base.stacks} concurrent `pulumi up` of {base.items} resources, each on its own stack",
        "",
        "| nodes | wall time (s) | updates/min | vs 1st row |",
        "|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = r.per_minute / base.per_minute
        lines.append(f"| {r.nodes} | {r.seconds:.1f} | {r.per_minute:.1f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=positive_ints, default=[1, 3], help="default 1,3")
    parser.add_argument("--stacks", type=int, default=20, help="concurrent updates (K)")
    parser.add_argument("--items", type=int, default=200, help="resources per program")
    parser.add_argument("--delay-ms", type=int, default=0, help="sleep in each Create")
    parser.add_argument("--cli", default="3.259.0", help="the CLI version (built)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per CLI")
    parser.add_argument("--out", type=Path, help="keep the logs here (default: a temp dir)")
    args = parser.parse_args(argv)

    root = args.out or Path(tempfile.mkdtemp(prefix="pulumid-cluster-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    try:
        provider_dir, yaml_dir, minio = build_provider(), yaml_host_dir(), build_minio()
        _aws_environment()
        pg = postgres_server()
        pg.start()
        port = free_port()
        s3 = minio_server(
            minio, root, data=root / "minio-data", port=port, console_port=free_port()
        )
        try:
            s3.start()
            endpoint = f"http://127.0.0.1:{port}"
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            client.close()
            for nodes in args.nodes:
                print(f"== {nodes} node(s): {args.stacks} updates of {args.items}", flush=True)
                result = run_one(
                    nodes,
                    args,
                    root / f"nodes{nodes}",
                    pg.create_database("bench"),
                    s3_url(endpoint, f"bench-{uuid.uuid4().hex[:12]}"),
                    provider_dir,
                    yaml_dir,
                )
                print(f"  {result.seconds:.1f}s, {result.per_minute:.1f} updates/min", flush=True)
                results.append(result)
        finally:
            s3.stop()
            pg.stop()
    except (BenchmarkError, PostgresError, pytest.fail.Exception) as error:
        print(f"benchmark failed: {error}\n(logs under {root})", file=sys.stderr)
        return 1
    print()
    print(table(results))
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
