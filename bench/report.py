"""Turn bench/results/latest.json into the Markdown table (also pasted in README) and a chart."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TARGETS = {"read_files": 1.0, "read_vault": 0.8, "rotate_ecdsa-p256": 1.0,
           "rotate_rsa-2048": 1.1, "ca_rotation": 1.2}


def rows(doc: dict[str, Any]) -> list[list[str]]:
    """[measurement, pkisvc, peer, ratio, target] for every figure with a peer."""
    out: list[list[str]] = []
    read = doc.get("read", {})
    for side, label, target in (("pkisvc_files", "files", "read_files"),
                                ("pkisvc_vault", "vault", "read_vault")):
        if side not in read:
            continue
        for c in ("c1", "c8"):
            ours, peer = read[side][c], read["openbao_kv"][c]
            out.append([f"read GET /v1/certs/server ({label} backend, {c[1:]} conn) req/s",
                        f"{ours['rps']:.0f} (p99 {ours['p99_ms']:.2f} ms)",
                        f"{peer['rps']:.0f} (p99 {peer['p99_ms']:.2f} ms) OpenBao KV v2",
                        f"{read['ratios'][f'{side}_{c}']:.3f}",
                        f"≥ {TARGETS[target]:.1f}"])
    for kt, r in doc.get("rotate", {}).items():
        out.append([f"rotate server ({kt}) ms", f"{r['pkisvc_ms']:.2f}",
                    f"{r['openbao_pki_issue_ms']:.2f} OpenBao pki/issue", f"{r['ratio']:.3f}",
                    f"≤ {TARGETS['rotate_' + kt]:.1f}"])
    for kt, r in doc.get("ca_rotation", {}).items():
        out.append([f"CA rotation ({kt}) ms", f"{r['pkisvc_ms']:.2f}",
                    f"{r['raw_crypto_ms']:.2f} raw cryptography", f"{r['ratio']:.3f}",
                    f"≤ {TARGETS['ca_rotation']:.1f}"])
    mem = doc.get("memory")
    if mem:
        out.append(["RSS per gunicorn worker MB", f"{mem['max_worker_rss_mb']:.1f}", "", "",
                    "≤ 80"])
    for name, r in doc.get("pillar", {}).items():
        if isinstance(r, dict) and "p99_ms" in r:
            out.append([f"pillar {name} ms (p50 / p99)", f"{r['p50_ms']:.3f} / {r['p99_ms']:.3f}",
                        str(r.get("peer", "")), str(r.get("ratio", "")), str(r.get("target", ""))])
    return out


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    head = (f"Run {doc['date']} on {m['cores']} cores ({m['cpu']}), Python {m['python']}, "
            f"{m.get('openbao', '')}; medians of {doc['runs']} interleaved runs. "
            "Rerun: `make bench`.\n\n")
    table = ["| measurement | pkisvc | peer | ratio | target |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows(doc)]
    return head + "\n".join(table) + "\n"


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    path.write_text(markdown(doc))


def write_png(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ratios, targets = [], [], []
    for r in rows(doc):
        if r[3]:
            labels.append(r[0].replace(" req/s", "").replace(" ms", ""))
            ratios.append(float(r[3]))
            targets.append(float(r[4].split()[-1]))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.2))
    y = range(len(labels))
    ax.barh(list(y), ratios, color="#4c78a8")
    ax.scatter(targets, list(y), color="#e45756", marker="|", s=400, label="target")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("pkisvc ÷ peer (read: higher is better; latency: lower is better)")
    ax.set_title(f"pkisvc vs OpenBao and raw crypto — {doc['date']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    results = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    d = json.loads((results / "latest.json").read_text())
    write_markdown(d, results / "latest.md")
    write_png(d, results / "latest.png")
