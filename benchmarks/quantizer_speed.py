"""Gaussian SQ quantizer: forward+backward time and peak memory, ours vs a direct broadcast implementation.

The direct implementation computes the same loss the way sony/sqvae's speech SQEmbedding does, with the
precision-weighted distance materialised as a (positions x D x K) tensor; ours (`sqaudio.quantizers`) expands
it into one matrix product. Both run the full training-mode quantizer (Gumbel sample, both loss terms).

Memory method (CPU): every measurement runs in a fresh Python process started with
MALLOC_MMAP_THRESHOLD_=131072, so glibc serves every block over 128 KiB with its own mmap and unmaps it on
free (resident memory then follows the live tensors instead of the heap's high-water mark). After one
warm-up step the kernel's peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs, one
forward+backward runs, and the number is the peak resident memory that step added on top of the inputs and
the model. (On CUDA: torch.cuda.max_memory_allocated above the allocation before the step.)
Time is measured in a second fresh process with the default allocator (so memory reuse is as in real use):
median of --repeats steps after one warm-up step (default 20 below 10k positions, else 3).

A direct run above --direct-max-positions would need tens of GB (256 x 500 x 64 x 512 floats = 16.8 GB per
tensor), so the direct side is then measured at two smaller batches with the same length and extrapolated
on the straight line through them (marked '~'); its time and memory are linear in the number of positions.

    python benchmarks/quantizer_speed.py                      # K=512, d_b=64, 52x16 and 256x500, variants I, IV
    python benchmarks/quantizer_speed.py --device cuda --direct-max-positions 200000
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

K, DIM = 512, 64


def direct_loss(z, var_logits, codebook, s, tau):
    """The reference-style quantizer loss with a broadcast (N, D, K) distance. z: (B, D, T)."""
    import torch

    x = z.transpose(1, 2)                                          # (B, T, D)
    log_var = s.view(1, 1, 1) if var_logits is None else var_logits.transpose(1, 2) + s
    flat_x = x.reshape(-1, DIM).unsqueeze(2)                       # (N, D, 1)
    flat_p = torch.exp(-log_var.reshape(-1, log_var.shape[-1])).unsqueeze(2)
    distances = 0.5 * torch.sum(flat_p * (codebook.t().unsqueeze(0) - flat_x) ** 2, dim=1)  # (N, K)
    logits = -distances
    eps = torch.finfo(logits.dtype).eps
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(eps, 1 - eps)))
    z_q = (torch.softmax((logits + gumbel) / tau, -1) @ codebook).view_as(x)
    logits = logits.view(x.shape[0], x.shape[1], K)
    p, log_p = torch.softmax(logits, -1), torch.log_softmax(logits, -1)
    precision = torch.exp(-log_var)
    return torch.mean(0.5 * torch.sum(precision * (x - z_q) ** 2, dim=(1, 2)) + torch.sum(p * log_p, dim=(1, 2)))


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process: spec = impl, variant, batch, length, repeats, device, threads."""
    import torch

    from sqaudio.config import QuantizerConfig
    from sqaudio.models.sqvae import build_quantizer

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    q = build_quantizer(QuantizerConfig(kind="gaussian", variant=spec["variant"], codebook_size=K, dim=DIM))
    q = q.to(device).train()
    z = torch.randn(spec["batch"], DIM, spec["length"], device=device, requires_grad=True)
    v = None
    if q.n_var_channels:
        v = (0.1 * torch.randn(spec["batch"], q.n_var_channels, spec["length"], device=device)).requires_grad_()

    def step():
        if spec["impl"] == "ours":
            loss = sum(q(z, v, temperature=0.5).losses.values())
        else:
            loss = direct_loss(z, v, q.codebook, q.log_var_scalar, 0.5)
        loss.backward()
        z.grad = None
        q.zero_grad(set_to_none=True)
        if v is not None:
            v.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()                                                         # warm-up: one-off allocations
    if spec["measure"] == "memory":
        return {"peak_mb": _measure_peak(step, device) / 2**20}
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times)}


def _measure_peak(step, device) -> int:
    """Bytes of peak memory one step adds (CPU: VmHWM reset via clear_refs; CUDA: allocator peak)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device) - before
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")                  # reset the peak RSS to the current RSS
    step()
    return (_status_kb("VmHWM") - before) * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def run(spec: dict) -> dict:
    """Time and peak memory of one configuration, each from its own fresh process."""
    result = {}
    for measure in ("memory", "time"):
        env = dict(os.environ)
        if measure == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"               # see the memory method above
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**spec, "measure": measure})],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"worker failed for {spec}:\n{out.stderr}")
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return result


def measure_direct(spec: dict, max_positions: int) -> tuple[dict, bool]:
    """Direct side, extrapolated linearly from two smaller batches when the full one exceeds max_positions."""
    positions = spec["batch"] * spec["length"]
    if positions <= max_positions:
        return run(spec), False
    b2 = max(2, max_positions // spec["length"])
    b1 = max(1, b2 // 2)
    small = {b: run({**spec, "batch": b}) for b in (b1, b2)}
    out = {}
    for key in ("time_s", "peak_mb"):
        slope = (small[b2][key] - small[b1][key]) / (b2 - b1)
        out[key] = small[b2][key] + slope * (spec["batch"] - b2)
    return out, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="52x16,256x500", help="BATCHxLENGTH latent sizes, comma separated")
    parser.add_argument("--variants", default="1,4")
    parser.add_argument("--repeats", type=int, default=0, help="timed steps (0: 20 below 10k positions, else 3)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--direct-max-positions", type=int, default=2000,
                        help="largest direct run measured as is; bigger ones are extrapolated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Gaussian SQ forward+backward, K={K}, d_b={DIM}, {args.device}, {args.threads} thread(s)")
    for col in ("size", "variant", "ours ms", "direct ms", "speedup", "ours MB", "direct MB", "memory ratio"):
        table.add_column(col, justify="right")
    for size in args.sizes.split(","):
        batch, length = (int(x) for x in size.lower().split("x"))
        for variant in (int(v) for v in args.variants.split(",")):
            repeats = args.repeats or (20 if batch * length < 10_000 else 3)
            spec = dict(variant=variant, batch=batch, length=length, repeats=repeats,
                        device=args.device, threads=args.threads)
            ours = run({**spec, "impl": "ours"})
            direct, extrapolated = measure_direct({**spec, "impl": "direct"}, args.direct_max_positions)
            mark = "~" if extrapolated else ""
            table.add_row(size, "I II III IV".split()[variant - 1],
                          f"{1e3 * ours['time_s']:.1f}", f"{mark}{1e3 * direct['time_s']:.1f}",
                          f"{mark}{direct['time_s'] / ours['time_s']:.1f}x",
                          f"{ours['peak_mb']:.1f}", f"{mark}{direct['peak_mb']:.1f}",
                          f"{mark}{direct['peak_mb'] / max(ours['peak_mb'], 1e-3):.1f}x")
    Console(width=120).print(table)
    print("~ = direct side extrapolated linearly from two smaller batches of the same length (see --help)")


if __name__ == "__main__":
    main()
