"""Graph breaks of a ResNet-18 training step under torch.compile, per bnctl preset (diagnostic, not a test).

A preset that breaks the graph runs partly eager under ``torch.compile``; this prints the number of
graphs and the reasons dynamo gives, for the torch version and device at hand.

    python benchmarks/explain_compile.py [--device cuda] [--amp] [--presets torch,running_update]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model  # noqa: E402

import bnctl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--presets", default="torch,running_update,frozen")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, amp={args.amp}")
    for preset in ["native", *args.presets.split(",")]:
        torch._dynamo.reset()
        model = bench_model.resnet18()
        if preset != "native":
            bnctl.apply(model, preset)
        model.to(device).train()
        x = torch.randn(4, 3, 64, 64, device=device)
        y = torch.randint(0, 10, (4,), device=device)

        def step(x, model=model, y=y):
            dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
            with torch.autocast(device.type, dtype=dtype, enabled=args.amp):
                return F.cross_entropy(model(x), y)

        explained = torch._dynamo.explain(step)(x)
        print(f"{preset:16s} graphs {explained.graph_count}, breaks {explained.graph_break_count}")
        seen = set()
        for b in explained.break_reasons:
            where = b.user_stack[-1] if b.user_stack else None
            key = (b.reason[:120], str(where))
            if key not in seen and len(seen) < 3:
                seen.add(key)
                print(f"    {b.reason[:400]}\n      at {where}")


if __name__ == "__main__":
    main()
