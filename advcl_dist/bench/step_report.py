"""The derived numbers and the table of `tools/bench.py step` (bench/step.py measures them)."""
from __future__ import annotations


def derived(runs: dict, peak: float | None) -> dict:
    ok = {mode: r for mode, r in runs.items() if "error" not in r}
    ref, sup = ok.get("reference"), ok.get("supervised")
    return {"speedup_vs_reference": {m: r["images_per_s"] / ref["images_per_s"] for m, r in ok.items()} if ref else {},
            # (images/s × FLOPs/image) ratio = ratio of achieved FLOP rates
            "advcl_efficiency": {m: r["tflops"] / sup["tflops"] for m, r in ok.items()
                                 if sup and m not in ("reference", "supervised")},
            "matmul_peak_tflops": peak,
            "fraction_of_matmul_peak": {m: r["tflops"] / peak for m, r in ok.items()} if peak else {}}


def table(report: dict) -> str:
    speedup = report["derived"]["speedup_vs_reference"]
    lines = ["| mode | images/s | ms/step | GFLOPs/image | TFLOP/s | peak GiB | × reference |", "|" + "---|" * 7]
    for mode, r in report["modes"].items():
        if "error" in r:
            lines.append(f"| {mode} | failed: {' '.join(r['error'].split())[:80]} | | | | | |")
            continue
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        times = f"{speedup[mode]:.2f}×" if mode in speedup else "–"
        lines.append(f"| {mode} | {r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | {r['flops_per_image'] / 1e9:.3f} "
                     f"| {r['tflops']:.3f} | {peak} | {times} |")
    d = report["derived"]
    eff = ", ".join(f"{m} {x:.2f}" for m, x in d["advcl_efficiency"].items()) or "– (needs the supervised mode)"
    lines.append(f"\nAdvCL efficiency (achieved FLOP rate ÷ the supervised step's): {eff}")
    syncs = {mode: len(r["host_syncs"]) for mode, r in report["modes"].items() if "host_syncs" in r}
    lines.append("host-synchronising ops per step: " + ", ".join(f"{m} {n}" for m, n in syncs.items()))
    if "supervised" in report["modes"]:
        lines.append(f"supervised yardstick runs in {report['modes']['supervised'].get('precision', '?')}")
    if report["device"].startswith("cuda"):
        tf32 = report["tf32"]
        lines.append(f"fp32 modes on CUDA: TF32 convolutions {tf32['conv']}, TF32 matmuls {tf32['matmul']}")
    if d["matmul_peak_tflops"]:
        fractions = ", ".join(f"{m} {x:.1%}" for m, x in d["fraction_of_matmul_peak"].items())
        lines.append(f"bf16 matmul peak (8192³): {d['matmul_peak_tflops']:.1f} TFLOP/s; achieved fraction: {fractions}")
    else:
        lines.append("bf16 matmul peak: not measured (CPU)")
    return "\n".join(lines)
