"""Turn bench/results/latest.json into the Markdown table (also pasted in README) and a chart."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TARGETS = {"read_files": 1.0, "read_vault": 1.0, "rotate_ecdsa-p256": 0.7,
           "rotate_rsa-2048": 1.0, "ca_rotation": 1.5, "compile": 1.0}
README_BEGIN = "<!-- bench:begin (generated from bench/results/latest.json by bench/report.py) -->"
README_END = "<!-- bench:end -->"


def rows(doc: dict[str, Any]) -> list[list[str]]:
    """[measurement, pkisvc, peer, ratio, target] for every figure with a peer."""
    out: list[list[str]] = []
    read = doc.get("read", {})
    for side, label, target in (("pkisvc_files", "files backend", "read_files"),
                                ("pkisvc_vault", "vault backend", "read_vault"),
                                ("pkisvc_vault_kept_token", "vault backend, token kept in "
                                 "Vault", "read_vault")):
        if side not in read:
            continue
        for c in ("c1", "c8"):
            ours, peer = read[side][c], read["openbao_kv"][c]
            out.append([f"read GET /v1/certs/server ({label}, {c[1:]} conn) req/s",
                        f"{ours['rps']:.0f} (p99 {ours['p99_ms']:.2f} ms)",
                        f"{peer['rps']:.0f} (p99 {peer['p99_ms']:.2f} ms) OpenBao KV v2",
                        f"{read['ratios'][f'{side}_{c}']:.3f}",
                        f"≥ {TARGETS[target]:.1f}"])
    for kt, r in doc.get("rotate", {}).items():
        out.append([f"rotate server ({kt}) ms", f"{r['pkisvc_ms']:.2f}",
                    f"{r['openbao_pki_issue_ms']:.2f} OpenBao pki/issue", f"{r['ratio']:.3f}",
                    f"≤ {TARGETS['rotate_' + kt]:.1f}"])
    for kt, r in doc.get("ca_rotation", {}).items():
        if "floor_ms" in r:
            peer = (f"{r['floor_ms']:.2f} floor: raw cryptography {r['raw_crypto_ms']:.2f} + "
                    f"durable write {r['durable_write_ms']:.2f} + empty request "
                    f"{r['empty_request_ms']:.2f}")
        else:  # results written before the floor had three parts
            peer = f"{r['raw_crypto_ms']:.2f} raw cryptography"
        out.append([f"CA rotation ({kt}) ms", f"{r['pkisvc_ms']:.2f}", peer,
                    f"{r['ratio']:.3f}", f"≤ {TARGETS['ca_rotation']:.1f}"])
    mem = doc.get("memory")
    if mem:
        for side in ("pkisvc_files", "pkisvc_vault"):
            if side in mem:
                m = mem[side]
                out.append([f"RSS per gunicorn worker ({side.split('_')[1]} backend) MB",
                            " / ".join(f"{x:.1f}" for x in m["worker_rss_mb"]),
                            f"after {m['requests_served']} requests", "", "≤ 80"])
    pil = doc.get("pillar", {})
    if "module" in pil:
        r = pil["module"]
        out.append([f"pillar module's own cost per call ({r['minion_ids']} ids) ms p50 / p99",
                     f"{r['p50_ms']:.3f} / {r['p99_ms']:.3f}",
                     f"whole call {r['call_p50_ms']:.3f} / {r['call_p99_ms']:.3f}, of which "
                     f"the service (on the wire) {r['service_p50_ms']:.3f} / "
                     f"{r['service_p99_ms']:.3f}; service share {r['service_share']:.3f}",
                     "", "p99 ≤ 1 ms"])
    if "compile" in pil:
        r = pil["compile"]
        out.append([f"pillar compile_pillar() per minion ({r['minion_ids']} ids) ms",
                    f"{r['module_ms']:.2f} (pkisvc ext_pillar)",
                    f"{r['static_ms']:.2f} material pasted in static SLS",
                    f"{r['ratio']:.3f}", f"≤ {TARGETS['compile']:.1f}"])
    if "burst" in pil:
        r = pil["burst"]
        for n in sorted((k for k in r if k.isdigit()), key=int):
            b = r[n]
            out.append([f"pillar burst: {n} minions, {r['threads']} threads",
                        f"{b['errors']} errors, {b['total_s']:.3f} s total, "
                        f"{b['per_minion_ms']:.3f} ms/minion",
                        f"service p50 / p99 {b['service_p50_ms']:.2f} / "
                        f"{b['service_p99_ms']:.2f} ms", "",
                        "0 errors, p99 ≤ 20 ms"])
        for k, v in r.items():
            if k.startswith("growth_"):
                small, big = k.removeprefix("growth_").split("_to_")
                out.append([f"pillar burst: cost per minion, {big} ÷ {small} minions",
                            f"{v:.3f}", "", "", "≈ 1 (linear)"])
    if "hosts" in doc:
        h = doc["hosts"]
        out.append([f"host reports: {h['hosts']} hosts, {h['concurrency']} at a time",
                    f"{h['report_errors']} errors; report p50 / p99 {h['report_ms']['median']}"
                    f" / {h['report_ms']['p99']} ms", "", "", "0 errors"])
        for path, p in h["pages"].items():
            out.append([f"`{path}` with {h['hosts']} hosts, p99 ms",
                        f"{p['p99']} (p50 {p['median']}, {p['bytes']} bytes)", "", "",
                        "p99 ≤ 50 ms" if path == "/v1/hosts" else ""])
    lst = doc.get("listing")
    if lst:
        for side in ("files", "vault"):
            for path, label in (("/ui/minions", f"minions page, {lst['minions']} minions"),
                                ("/ui/minions?page=13", "minions page 13"),
                                ("/ui/minions?behind=1", "minions page, those behind"),
                                ("/v1/versions", f"GET /v1/versions, {lst['versions']} "
                                                 "versions"),
                                ("/v1/hosts", f"GET /v1/hosts, {lst['minions']} minions")):
                r = lst[side].get(path)
                if r is None:  # a run from before it was measured
                    continue
                out.append([f"{label} ({side} backend) ms p50 / p99",
                            f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}",
                            f"{r['requests']} sequential requests, {r['bytes']} bytes", "",
                            "p99 ≤ 50 ms"])
    return out


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    load = doc.get("load_average_before"), doc.get("load_average_after")
    head = (f"Run {doc['date']} on {m['cores']} cores ({m['cpu']}), Python {m['python']}, "
            f"{m.get('openbao', '').split(' (')[0]}, salt {m.get('salt', '')}; "
            f"medians of {doc['runs']} interleaved runs, {doc.get('seconds', '')} s in all; "
            f"load average before / after: {load[0]} / {load[1]} (other test suites share "
            "these cores). Rerun: `make bench`.\n\n")
    table = ["| measurement | pkisvc | peer | ratio | target |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows(doc)]
    return head + "\n".join(table) + "\n"


def readme_block(doc: dict[str, Any]) -> str:
    """The README's generated part: the table and the chart, between the markers."""
    return (f"{README_BEGIN}\n{markdown(doc)}\n![pkisvc ÷ peer, with targets]"
            f"(bench/results/latest.png)\n{README_END}")


def update_readme(doc: dict[str, Any], readme: Path) -> None:
    text = readme.read_text()
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + readme_block(doc) + text[end:])


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
    for i, r in enumerate(ratios):
        ax.annotate(f"{r:.2f}", (r, i), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_xscale("log")  # one ratio (ECDSA CA rotation vs bare crypto) is 30x the others
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("pkisvc ÷ peer, log scale (read: higher is better; latency: lower is better)")
    ax.set_title(f"pkisvc vs OpenBao and raw crypto — {doc['date']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    # python bench/report.py [RESULTS_DIR]: redraw latest.md, latest.png and README's table.
    results = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    d = json.loads((results / "latest.json").read_text())
    write_markdown(d, results / "latest.md")
    write_png(d, results / "latest.png")
    update_readme(d, Path(__file__).resolve().parent.parent / "README.md")
