"""Why a pruned network is not always faster: ONNX Runtime CPU latency of VGG-style nets whose
every conv width is scaled alike, against the unpruned net, timed side by side.

    .venv/bin/python benchmarks/width_staircase.py [--batch 32] [--threads 1] [--scales 0.7,0.5]

Widths off the runtime's blocked layouts (multiples of 8 on x86) can be slower than the full
width; that is the staircase a latency table (export/latency_table.py) measures and the
allocator follows. Also prints training throughput (images/s, torch, this machine's threads),
which is what sizes a CPU quickstart.
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

from pfp.models import VGG, VGG_SMALL_CFG, VGG_TINY_CFG

CFGS = {"vgg_small": VGG_SMALL_CFG, "vgg_tiny": VGG_TINY_CFG}


def scaled(cfg: list, r: float) -> list:
    return [v if v == "M" else max(1, round(int(v) * r)) for v in cfg]


def session(model: nn.Module, threads: int) -> ort.InferenceSession:
    buf = io.BytesIO()
    torch.onnx.export(model.eval(), torch.randn(1, 1, 28, 28), buf, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])


def p50_ms(sess: ort.InferenceSession, batch: int, seconds: float = 1.0) -> float:
    x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scales", default="0.7,0.5")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians of them are reported")
    args = ap.parse_args()
    torch.manual_seed(0)
    for name, cfg in CFGS.items():
        full = session(VGG(cfg, 10, 1, 28), args.threads)
        cells = []
        for r in (float(s) for s in args.scales.split(",")):
            widths = scaled(cfg, r)
            small = session(VGG(widths, 10, 1, 28), args.threads)
            a, b = zip(*[(p50_ms(full, args.batch), p50_ms(small, args.batch)) for _ in range(args.rounds)])
            cells.append(f"x{r:g} {'-'.join(str(v) for v in widths if v != 'M')}: {np.median(a) / np.median(b):.2f}x")
        model = VGG(cfg, 10, 1, 28)
        opt = torch.optim.SGD(model.parameters(), 0.05)
        x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
        steps, start = 5, None
        for i in range(steps + 2):  # two warm-up steps
            if i == 2:
                start = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        ips = steps * 128 / (time.perf_counter() - start)
        print(f"{name}: unpruned {np.median(a):.2f} ms at batch {args.batch}, {args.threads} thread(s); "
              + "; ".join(cells) + f"; training {ips:.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
