#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Client round trip over a unix socket: connect, negotiate, one query, close.

Also times fetching query-qmp-schema against reading it from the disk cache.
    python bench/qmp_round_trip.py [runs]
"""

from __future__ import annotations

import sys
import tempfile
import time

from common import ThrowawayQEMU, summary  # pylint: disable=wrong-import-order

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_schema import load_schema


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with ThrowawayQEMU() as qemu:
        round_trips, fetches, cached = [], [], []
        with tempfile.TemporaryDirectory() as cache_dir:
            for dummy in range(runs):
                start = time.perf_counter()
                with QMPClient(socket_path=qemu.socket, timeout=10) as client:
                    client.execute("query-status")
                round_trips.append(time.perf_counter() - start)
            with QMPClient(socket_path=qemu.socket, timeout=10) as client:
                version = client.version
                for dummy in range(max(5, runs // 20)):
                    start = time.perf_counter()
                    load_schema(client.execute, version, use_cache=False)
                    fetches.append(time.perf_counter() - start)
                    load_schema(client.execute, version, cache_dir=cache_dir)  # fills the cache
                    start = time.perf_counter()
                    dummy, fetched = load_schema(client.execute, version, cache_dir=cache_dir)
                    cached.append(time.perf_counter() - start)
                    assert not fetched
    for name, samples in (("connect + negotiate + query-status + close", round_trips),
                          ("query-qmp-schema fetched and parsed", fetches),
                          ("schema read from the disk cache", cached)):
        figures = summary(samples)
        print("%-45s median %7.2f ms   min %7.2f ms   p90 %7.2f ms   (n=%d)"
              % (name, figures["median_ms"], figures["min_ms"], figures["p90_ms"], figures["n"]))


if __name__ == "__main__":
    main()
