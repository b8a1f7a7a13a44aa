"""The soak in the suite (issue 17 item 4): 2 minutes of bulk TCP, request/response and lease churn
together (benchmarks/soak.py; the 10-minute run is ``python -m benchmarks --soak``). Afterwards RSS
grows by at most 4 MB after a 30 s warm-up, file descriptors, threads, asyncio tasks and etcd leases do
not move, the counters balance per direction, and the daemons logged no warning."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.soak import SoakSettings, build, flatness, run
from tests.conftest import require
from tests.lease.conftest import need_etcd
from udpflannel.lab.cluster import Cluster

pytestmark = [pytest.mark.netns, pytest.mark.etcd, pytest.mark.timeout(300)]


def test_two_minute_soak_leaves_nothing_growing_counters_balanced_and_no_warning(lab, tmp_path):
    need_etcd()
    require(shutil.which("iperf3") is not None, "needs iperf3 (./dev setup installs it)")
    settings = SoakSettings(seconds=120, warmup=30, sample_every=5)
    with Cluster(lab, tmp_path) as cluster:
        report = run(build(cluster, settings), progress=print)
    flat = flatness(report)
    for i in (1, 2):
        f = flat[f"node{i}"]
        print(f"node {i}: RSS {f['rss_kib']['first'] / 1024:.1f} -> {f['rss_kib']['last'] / 1024:.1f} MB "
              f"(max {f['rss_kib']['max'] / 1024:.1f}); fds {f['fds']['min']}-{f['fds']['max']}, threads "
              f"{f['threads']['min']}-{f['threads']['max']}, tasks {f['tasks']['min']}-{f['tasks']['max']}")
    print(f"bulk {report['bulk_gbps']} Gbit/s, churn {report['churn']}, etcd leases {flat['etcd_leases_range']}")
    assert report["checks"] == []
