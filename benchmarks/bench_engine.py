"""Engine speed, side by side in one process, on the same model and inputs.

Rows per case: (a) the batch-1 protocol of the RepLKNet / OpenERF scripts (one image per
forward + backward, per-image host transfer), reimplemented here; (b) a bare batched forward +
backward (the floor); (c) ``erf.effective_rf`` with its defaults; (d) the engine without the cone
crop, without BatchNorm folding (the plain path: the reference of every deviation), with
channels_last off, and in bf16; (e) the plain path in float64, whose deviation is float32's own
rounding in this network. Cases: torchvision
ResNet-50 (random weights, eval, ``layer4``) at 224^2 and 1024^2, a 20-layer 16-wide conv stack
with many weight draws (vmap vs loop), and ``pooling_net`` of every local pooling module.

    python benchmarks/bench_engine.py [--quick] [--out benchmarks/results]

Writes a markdown table to stdout and ``benchmarks/results/engine_<device>.md`` / ``.json``.
Seconds are the minimum over ``--repeats`` rounds in which the paths of a case take turns. Device: CUDA when available, else the CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import erf
import erf._maps as maps_mod
import erf._plan as plan_mod
from erf.nets import conv_stack, pooling_net
from erf.pooling._registry import REGISTRY


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_mib(dev: torch.device) -> float:
    """GPU: peak allocated since the last reset; CPU: the process's max RSS so far (cumulative)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], Any], dev: torch.device, repeats: int) -> tuple[float, Any, float]:
    best, out = float("inf"), None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        res = fn()
        sync(dev)
        if time.perf_counter() - t < best:  # keep the fastest run's result (its setup seconds)
            best, out = time.perf_counter() - t, res
    return best, out, peak_mib(dev)


def unit_of(out: torch.Tensor) -> torch.Tensor:
    return out[(slice(None), slice(None)) + tuple(s // 2 for s in out.shape[2:])].sum()


def batch1_protocol(features: nn.Module, x: torch.Tensor, dev: torch.device) -> np.ndarray:
    """RepLKNet/OpenERF: per image, forward, grad of the centre unit, |g| summed, added on the host."""
    acc = None
    for i in range(x.shape[0]):
        s = x[i: i + 1].to(dev).requires_grad_(True)
        g, = torch.autograd.grad(unit_of(features(s)), s)
        m = g.abs().sum(1)[0].cpu().numpy().astype(np.float64)
        acc = m if acc is None else acc + m
    return acc / x.shape[0]


def bare_batched(features: nn.Module, x: torch.Tensor, bs: int, dev: torch.device) -> torch.Tensor:
    """The floor: batched forward + autograd.grad w.r.t. the input only, maps summed on the device."""
    acc = None
    for i in range(0, x.shape[0], bs):
        s = x[i: i + bs].to(dev).requires_grad_(True)
        g, = torch.autograd.grad(unit_of(features(s)), s)
        m = g.abs().sum(1).sum(0)
        acc = m if acc is None else acc + m
    return acc


def setup_s(total: float, result: erf.ERFResult) -> float:
    """Seconds of a timed engine call spent before the first batch (TRF analysis, crop check, probes)."""
    return max(0.0, total - result.meta["seconds"])


def rel_dev(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def engine_run(model, shape, dev, **kw) -> erf.ERFResult:
    return erf.effective_rf(model, shape, device=dev, progress=False, **kw)


def interleaved(paths: list[tuple[str, Callable[[], Any]]], dev: torch.device, rounds: int
                ) -> dict[str, tuple[float, Any, float]]:
    """Best time, its result and peak memory of each path, the paths taking turns round by round,
    so that a shared machine's drifts (seen here: 1.5x within minutes) hit every path alike."""
    best: dict[str, tuple[float, Any, float]] = {}
    for _ in range(rounds):
        for name, fn in paths:
            t, out, mem = timed(fn, dev, 1)
            if name not in best or t < best[name][0]:
                best[name] = (t, out, max(mem, best.get(name, (0, 0, 0))[2]))
    return best


def resnet_case(size: int, n: int, n_b1: int, dev: torch.device, rounds: int, bf16: bool = True,
                f64: bool = False) -> list[dict]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    features = nn.Sequential(*list(model.children())[:-2]).to(dev).eval()  # up to layer4
    shape = (3, size, size)
    x = torch.randn((n,) + shape, generator=torch.Generator().manual_seed(1))
    # the plain path (no crop, no BatchNorm folding): the reference of every deviation; also warms up
    base = engine_run(model, shape, dev, layer="layer4", inputs=x, crop=False, fold_bn=False)
    bs = base.config["batch_size"]
    frozen = copy.deepcopy(features)
    for p in frozen.parameters():
        p.requires_grad_(False)

    def no_channels_last():
        saved = plan_mod.use_channels_last
        plan_mod.use_channels_last = lambda *args: False
        try:
            return engine_run(model, shape, dev, layer="layer4", inputs=x, crop=False, fold_bn=False)
        finally:
            plan_mod.use_channels_last = saved

    paths = [
        ("a", lambda: batch1_protocol(features, x[:n_b1], dev)),
        ("b", lambda: bare_batched(frozen, x, bs, dev)),
        ("c", lambda: engine_run(model, shape, dev, layer="layer4", inputs=x)),
        ("d-crop", lambda: engine_run(model, shape, dev, layer="layer4", inputs=x, crop=False)),
        ("d-plain", lambda: engine_run(model, shape, dev, layer="layer4", inputs=x, crop=False, fold_bn=False)),
        ("d-cl", no_channels_last),
    ]
    if bf16:  # on CPU bf16 autocast is a slow emulation (measured 0.28x of the batch-1 protocol): opt in
        paths.append(("d-bf16", lambda: engine_run(model, shape, dev, layer="layer4", inputs=x, dtype=torch.bfloat16)))
    got = interleaved(paths, dev, rounds)
    b1_ref = engine_run(model, shape, dev, layer="layer4", inputs=x[:n_b1], crop=False, fold_bn=False)
    t, ref_b1, mem = got["a"]
    rows = [dict(path="(a) batch-1 protocol", n=n_b1, s=t, mem=mem, dev=rel_dev(ref_b1, b1_ref.map))]
    t, _, mem = got["b"]
    rows.append(dict(path=f"(b) bare batched fwd+bwd (B={bs})", n=n, s=t, mem=mem))
    labels = {"d-crop": "(d) engine, crop=False", "d-plain": "(d) engine, crop=False, fold_bn=False (the plain path)",
              "d-cl": "(d) the plain path with channels_last off", "d-bf16": "(d) engine defaults, bf16 autocast"}
    for key, _ in paths[2:]:
        t, r, mem = got[key]
        if key == "c":
            crop = r.meta.get("crop")
            label = f"(c) engine defaults (B={r.config['batch_size']}, crop={'on ' + str(crop) if crop else 'off'})"
        else:
            label = labels[key]
        rows.append(dict(path=label, n=n, s=t, mem=mem, dev=rel_dev(r.map, base.map), setup=setup_s(t, r)))
    if f64:  # the float32 rounding of this network, the scale every deviation above is read against
        t, r, mem = timed(lambda: engine_run(model, shape, dev, layer="layer4", inputs=x, crop=False, fold_bn=False,
                                             dtype=torch.float64), dev, 1)
        rows.append(dict(path="(e) plain path in float64 (float32 rounding reference)", n=n, s=t, mem=mem,
                         dev=rel_dev(base.map, r.map)))
    return rows


def stack_case(draws: int, n: int, dev: torch.device, repeats: int) -> list[dict]:
    model = conv_stack(20, k=3, width=16, act="relu")
    shape = (16, 64, 64)
    kw = dict(draws=draws, n_inputs=n, init="normal")
    rows = []
    got = interleaved([("loop", lambda: engine_run(model, shape, dev, vmap_draws=False, **kw)),
                       ("vmap", lambda: engine_run(model, shape, dev, vmap_draws=True, **kw))], dev, repeats)
    t, loop, mem = got["loop"]
    rows.append(dict(path=f"engine, loop over {draws} draws", n=draws * n, s=t, mem=mem))
    t, vm, mem = got["vmap"]
    rows.append(dict(path=f"engine, vmap over draws (B={vm.config['batch_size']})", n=draws * n, s=t, mem=mem,
                     dev=rel_dev(vm.map, loop.map)))
    return rows


def pooling_case(n: int, dev: torch.device, repeats: int) -> list[dict]:
    rows = []
    shape = (3, 128, 128)
    x = torch.randn((n,) + shape, generator=torch.Generator().manual_seed(2))
    for name, e in sorted(REGISTRY.items()):
        if e.locality != "local" or e.head:
            continue
        torch.manual_seed(0)
        net = pooling_net(name).eval()
        res = engine_run(net, shape, dev, inputs=x)
        frozen = maps_mod.freeze
        net_d = net.to(dev)
        frozen(net_d)
        got = interleaved([("floor", lambda: bare_batched(net_d, x, n, dev)),
                           ("engine", lambda: engine_run(net, shape, dev, inputs=x))], dev, repeats)
        t_floor, t_eng, res, mem = got["floor"][0], got["engine"][0], got["engine"][1], got["engine"][2]
        rows.append(dict(path=f"{name}", n=n, s=t_eng, floor=t_floor, mem=mem, setup=setup_s(t_eng, res),
                         crop="on" if res.meta.get("crop") else "off",
                         channels_last="on" if res.meta.get("channels_last") else "off"))
    return rows


def table(title: str, rows: list[dict], ref: float | None) -> str:
    """Markdown rows; 'vs (a)' / 'vs (b)': images/s over the batch-1 protocol's / the floor's."""
    floor = next((r["n"] / r["s"] for r in rows if r["path"].startswith("(b)")), None)
    out = [f"### {title}", "", "| path | images | seconds | of which setup | images/s | vs (a) | vs (b) | "
           "max rel. dev. | peak MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ips = r["n"] / r["s"]
        ratio = f"{ips / ref:.2f}x" if ref else "-"
        vs_floor = f"{ips / floor:.2f}x" if floor and not r["path"].startswith(("(a)", "(b)")) else "-"
        dev = f"{r['dev']:.1e}" if r.get("dev") is not None else "-"
        setup = f"{r['setup']:.2f}" if r.get("setup") is not None else "-"
        out.append(f"| {r['path']} | {r['n']} | {r['s']:.3f} | {setup} | {ips:.1f} | {ratio} | {vs_floor} | {dev} | "
                   f"{r['mem']:.0f} |")
    return "\n".join(out)


def pooling_table(title: str, rows: list[dict]) -> str:
    """Markdown rows of the pooling case; 'steady' leaves out the engine's set-up."""
    lines = [f"### {title}", "",
             "| module | engine s | of which setup | floor s | engine / floor speed | steady state / floor | crop | "
             "channels_last | peak MiB |", "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        steady = r["floor"] / max(r["s"] - r["setup"], 1e-9)
        lines.append(f"| {r['path']} | {r['s']:.3f} | {r['setup']:.3f} | {r['floor']:.3f} | "
                     f"{r['floor'] / r['s']:.2f}x | {steady:.2f}x | {r['crop']} | {r.get('channels_last', '-')} | "
                     f"{r['mem']:.0f} |")
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    """The markdown report of every case in ``results`` (also those kept from an earlier run)."""
    md = [f"## Engine benchmark on {results['device']}", "",
          f"torch {results['torch']}, erf {results.get('erf', '?')}. Seconds: the best of the rounds in which the "
          "paths of a case take turns. 'max rel. dev.' = max |map - plain-path float32 map| / max (row (e): "
          "float32 vs float64). 'of which setup': seconds before the first batch (TRF analysis, crop check, "
          "probes). CPU peak memory is the process's max RSS so far (cumulative).", ""]
    for key, case in results["cases"].items():
        rows = case["rows"] if isinstance(case, dict) else case
        title = case.get("title", key) if isinstance(case, dict) else key
        if key == "pooling_net":
            md.append(pooling_table(title, rows) + "\n")
        else:
            md.append(table(title, rows, rows[0]["n"] / rows[0]["s"]) + "\n")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--repeats", type=int, default=2, help="rounds (ResNet-50 at 224: at least 3)")
    ap.add_argument("--quick", action="store_true", help="smallest sizes (a smoke run)")
    ap.add_argument("--cases", default="resnet224,resnet1024,stack,pooling",
                    help="a subset re-measures those cases and keeps the others of the saved report")
    ap.add_argument("--bf16-cpu", action="store_true", help="also time bf16 autocast on the CPU (slow there)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = dev.type == "cuda"
    cases = args.cases.split(",")
    name = device_name(dev)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"engine_{dev.type}{'_quick' if args.quick else ''}")
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "erf": erf.__version__, "cases": {}}
    try:
        with open(stem + ".json") as fh:
            saved = json.load(fh)
        if saved.get("device") == name and saved.get("torch") == torch.__version__:
            results["cases"] = saved.get("cases", {})
    except (OSError, ValueError):
        pass

    def emit(key: str, title: str, rows: list[dict]) -> None:
        results["cases"][key] = {"title": title, "rows": rows}
        text = pooling_table(title, rows) if key == "pooling_net" else table(title, rows, rows[0]["n"] / rows[0]["s"])
        print(text + "\n", flush=True)

    if "resnet224" in cases:
        n, n1 = (256, 64) if gpu else ((4, 2) if args.quick else (16, 8))
        rows = resnet_case(224, n, n1, dev, max(args.repeats, 3), bf16=gpu or args.bf16_cpu, f64=True)
        emit("resnet50_224", "ResNet-50, 224x224, layer4 centre unit", rows)
    if "resnet1024" in cases:
        n, n1 = (64, 16) if gpu else ((1, 1) if args.quick else (8, 1))  # 8: the crop's setup check pays off
        rows = resnet_case(1024, n, n1, dev, 1 if not gpu else args.repeats, bf16=gpu or args.bf16_cpu)
        emit("resnet50_1024", "ResNet-50, 1024x1024, layer4 centre unit", rows)
    if "stack" in cases:
        draws, n = (64, 16) if gpu else ((4, 4) if args.quick else (8, 8))
        rows = stack_case(draws, n, dev, args.repeats)
        emit("conv_stack", f"20-layer 16-wide conv stack, 64x64, {draws} draws x {n} inputs", rows)
    if "pooling" in cases:
        n = 64 if gpu else (4 if args.quick else 16)
        emit("pooling_net", f"pooling_net (3x128x128), {n} inputs: engine defaults vs the bare batched floor",
             pooling_case(n, dev, args.repeats))
    order = ["resnet50_224", "resnet50_1024", "conv_stack", "pooling_net"]
    results["cases"] = {k: results["cases"][k] for k in order if k in results["cases"]}
    with open(stem + ".md", "w") as fh:
        fh.write(render(results))
    with open(stem + ".json", "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"written: {stem}.md, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
