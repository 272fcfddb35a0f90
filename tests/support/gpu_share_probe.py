"""One role's process on a shared GPU: cap torch to the role's share, then try to exceed it.

Run by the ``gpu`` tests in tests/test_placement.py, two at once (ensemble and
learner on one GPU). Prints one JSON line: the cap, whether an allocation just
under the share succeeded, and whether one past it was refused.
"""

from __future__ import annotations

import json
import sys
import time


def main(role: str, hold_s: float) -> int:
    import torch

    from cluster.resources import limit_torch_gpu_memory

    limits = limit_torch_gpu_memory(role, "gpu", device=0)
    total = torch.cuda.get_device_properties(0).total_memory
    share_bytes = int(limits.torch_fraction * total)
    under = torch.empty(int(share_bytes * 0.8), dtype=torch.uint8, device="cuda:0")
    under.fill_(1)
    refused = False
    try:
        over = torch.empty(int(share_bytes * 0.4), dtype=torch.uint8, device="cuda:0")  # 0.8 + 0.4 > 1
        over.fill_(1)
    except torch.cuda.OutOfMemoryError:
        refused = True
    time.sleep(hold_s)  # hold the memory while the other role does the same
    print(json.dumps({"role": role, "fraction": limits.torch_fraction, "under_ok": True, "over_refused": refused,
                      "max_allocated": torch.cuda.max_memory_allocated(0), "share_bytes": share_bytes}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 2.0))
