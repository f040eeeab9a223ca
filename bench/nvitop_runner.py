"""Runs nvitop-exporter (unchanged) with timing around its own collection loop; started as a subprocess.

nvitop-exporter 1.7.2 collects on a timer in its main thread (`PrometheusExporter.collect`: update_host, then
update_device for each device, then sleep) and renders on scrape. To measure CPU per collection exactly, this
wrapper replaces only that loop: it calls the exporter's own update_host/update_device `iterations` times back to
back, recording the thread CPU time of each, writes the samples to $BENCH_NVITOP_OUT, then idles, so that scrapes
measured afterwards see a full registry and no concurrent collection.

    LD_LIBRARY_PATH=<fake nvml dir> FAKE_NVML_SCENARIO=... BENCH_NVITOP_OUT=out.json \
        python -m bench.nvitop_runner --port 9500 --bind-address 127.0.0.1
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    from nvitop_exporter import cli
    from nvitop_exporter.exporter import PrometheusExporter

    out = os.environ["BENCH_NVITOP_OUT"]
    iterations = int(os.environ.get("BENCH_NVITOP_ITERATIONS", "20"))
    warmup = int(os.environ.get("BENCH_NVITOP_WARMUP", "3"))

    def collect(self) -> None:
        total, gpu_only = [], []
        for i in range(warmup + iterations):
            t0 = time.thread_time()
            self.update_host()
            t1 = time.thread_time()
            for device in self.devices:
                self.update_device(device)
            t2 = time.thread_time()
            if i >= warmup:
                total.append(t2 - t0)
                gpu_only.append(t2 - t1)
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"total": total, "devices": gpu_only, "pid": os.getpid()}, f)
        os.replace(tmp, out)
        while True:
            time.sleep(3600)

    PrometheusExporter.collect = collect
    sys.argv = ["nvitop-exporter", *sys.argv[1:]]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
