"""A flow run that leases GPU 0 of a host and holds it until killed: `python tests/gpu_lease_holder.py HOST`.

Prints `holding the GPU: pid <pid> at <unix time>` once it holds the GPU. Used by test_gpu_lease_kill.py as a real process."""

import os
import sys
import time

from prefect import flow

from qlora_flow.gpu_runner import gpu_lease


@flow(name="gpu-lease-holder")
def hold_gpu(host: str) -> None:
    with gpu_lease(host, 1, 1):
        print(f"holding the GPU: pid {os.getpid()} at {time.time()}", flush=True)
        time.sleep(3600)


if __name__ == "__main__":
    hold_gpu(sys.argv[1])
