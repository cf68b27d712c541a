"""The one summary file of ``benchmarks/gpu_check.sh``: headline figures first, then each
step's own table, from the JSON and logs the steps left in the work folder.

    python benchmarks/gpu_summary.py WORK_DIR OUT_FILE
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_throughput import sdpa_backend  # noqa: E402


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def tables(log: Path) -> list[str]:
    """The markdown table(s) and result lines a benchmark printed (its last screenful)."""
    if not log.is_file():
        return [f"({log.name}: no log)"]
    lines = log.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| ")), None)
    if start is None:
        return ["```", *lines[-15:], "```"]
    return [line for line in lines[start:] if not line.startswith("wrote ")]


def throughput_lines(name: str, d: dict) -> list[str]:
    m = d["meta"]
    out = [
        f"- `{name}` ({m['preset']}, {m['device_name']}, torch {m['torch']}): measured "
        f"{m['measured_peak_kind']} peak {m['measured_peak_flops'] / 1e12:.3g} TFLOP/s, spec "
        f"{(m['spec_peak_flops'] or 0) / 1e12:.3g} TFLOP/s ({m['spec_source']})"
    ]
    for r in d["results"]:
        out.append(
            f"  - {r['model']}, batch {r['batch']}, decoder {r['decoder_heads']} x "
            f"{r['decoder_head_dim']}{', compiled' if r.get('compiled') else ''}: "
            f"{r['steps_per_s']:.3g} steps/s, {r['volumes_per_s']:.3g} volumes/s, "
            f"util {pct(r['util_vs_measured_peak'])} of measured / {pct(r['util_vs_spec'])} of "
            f"spec, peak {(r.get('peak_mem_bytes') or 0) / 2**30:.1f} GiB, attention "
            f"{sdpa_backend(r['attention_ops'])}"
        )
    fed = d.get("fed")
    if fed:
        out.append(
            f"  - fed (api.pretrain, {fed['fed_workers']} workers, augment {fed['fed_augment']}): "
            f"{fed['fed_steps_per_s']:.3g} steps/s = {fed['fed_over_synthetic']:.2f} x synthetic"
        )
    return out


def pretrain_lines(work: Path) -> list[str]:
    out = []
    for run in sorted(work.glob("run_*")):
        tag = run.name[4:]
        rows = []
        metrics = run / "metrics.csv"
        if metrics.is_file():
            with metrics.open() as f:
                rows = list(csv.DictReader(f))
        vps = [float(r["volumes_per_s"]) for r in rows if r.get("volumes_per_s")]
        steady = vps[2:] or vps
        util, mem = [], []
        smi = work / f"smi_{tag}.csv"
        if smi.is_file():
            for line in smi.read_text().splitlines():
                parts = [p.strip() for p in line.split(",")]
                try:
                    util.append(float(parts[1]))
                    mem.append(float(parts[2]))
                except (IndexError, ValueError):
                    pass
        busy = util[len(util) // 4 :] or util  # past the start-up (cache filling)
        out.append(
            f"- `maesil pretrain` {tag}: {len(rows)} log rows, last step "
            f"{rows[-1]['step'] if rows else '?'}; volumes/s median "
            f"{statistics.median(steady) if steady else float('nan'):.1f} "
            f"(max {max(vps) if vps else float('nan'):.1f}); GPU utilisation (nvidia-smi) mean "
            f"{statistics.mean(busy) if busy else float('nan'):.0f}% over the last 3/4 of the "
            f"run; memory used max {max(mem) if mem else float('nan'):.0f} MiB"
        )
    return out


def main(argv: list[str]) -> int:
    work, out_file = Path(argv[0]), Path(argv[1])
    env = load(work / "env.json") or {}
    lines = ["# napari-maesil GPU check", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    status = work / "status.txt"
    if status.is_file():
        lines += ["", "## Steps", "", "```", status.read_text().rstrip(), "```"]
    lines += ["", "## Headline", ""]
    for name in ("bench_base", "sweep_base", "bench_mim", "compile_base"):
        d = load(work / f"{name}.json")
        if d:
            lines += throughput_lines(name, d)
    lines += pretrain_lines(work)
    seg = load(work / "segment.json")
    if seg:
        for r in seg["results"]:
            lines.append(
                f"- full CT {r['command']} ({seg['meta'].get('ct_shape')}), windows per pass "
                f"{r['sw_batch_size'] or 'default'}, overlap {r['overlap'] or 'default'}, "
                f"precision {r['precision'] or 'default'}: {r['wall_s']} s, peak RSS "
                f"{r['peak_rss_gb']} GB, exits {r['exits']}"
            )
    for step, log in (
        ("Throughput, base, ours vs MONAI (+ fed step)", "bench_base.log"),
        ("Utilisation vs batch and decoder head width, base", "sweep_base.log"),
        ("Attention kernels at the decoder's and encoder's shapes", "attention.log"),
        ("Throughput, mim-med3d, ours vs MONAI", "bench_mim.log"),
        ("torch.compile, base", "compile_base.log"),
        ("Whole-CT segmentation", "segment.log"),
    ):
        lines += ["", f"## {step}", ""] + tables(work / log)
    out_file.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
