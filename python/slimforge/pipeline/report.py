"""``report.md`` and ``report.html`` of a pipeline run, with PNG plots (matplotlib, the
``plots`` extra; without it the report says so and has no figures)."""

from __future__ import annotations

import html
import json
import platform
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "WATTS_PER_THREAD",
    "energy_estimate",
    "fmt_bytes",
    "html_table",
    "md_table",
    "versions",
    "write_page",
    "write_report",
]

#: The power assumed per busy thread for the energy estimate (no power meter is read).
WATTS_PER_THREAD = 10.0


def energy_estimate(seconds: float, threads: int) -> float:
    """Watt-hours: ``seconds x threads x WATTS_PER_THREAD / 3600``, an assumption of about
    10 W per busy laptop/desktop core, not a measurement."""
    return seconds * threads * WATTS_PER_THREAD / 3600.0


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _plots(root: Path, m: dict[str, dict[str, Any]]) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    out: dict[str, Path] = {}
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for stage, label in (("teacher", "teacher"), ("distill", "student (distillation loss)"),
                         ("prune", "pruned student recovery")):  # fmt: skip
        losses = m.get(stage, {}).get("metrics", {}).get("losses") or []
        if losses:
            # [step, loss] pairs (plain lists of losses from older run folders: by position)
            pts = [x if isinstance(x, list) else [i + 1, x] for i, x in enumerate(losses)]
            ax.plot([x[0] for x in pts], [x[1] for x in pts], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.set_title("Training losses")
    fig.tight_layout()
    out["losses"] = root / "losses.png"
    fig.savefig(out["losses"], dpi=110)
    plt.close(fig)
    rows = m.get("evaluate", {}).get("metrics", {}).get("rows", [])
    if rows:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for r in rows:
            ax.scatter(r["bytes"] / 1024, r["val_bpb"], s=40)
            ax.annotate(r["model"], (r["bytes"] / 1024, r["val_bpb"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("size on disk (KB, log scale)")
        ax.set_ylabel("validation bits per byte")
        ax.set_title("Size against quality (lower left is better)")
        fig.tight_layout()
        out["size_quality"] = root / "size_quality.png"
        fig.savefig(out["size_quality"], dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ax.barh([r["model"] for r in rows], [r["tokens_per_s"] for r in rows])
        ax.set_xlabel("generated tokens per second (batch 1, greedy)")
        ax.set_title("Generation speed on this CPU")
        fig.tight_layout()
        out["speed"] = root / "speed.png"
        fig.savefig(out["speed"], dpi=110)
        plt.close(fig)
    return out


def versions() -> dict[str, str]:
    import numpy as np
    import torch

    import slimforge

    return {"slimforge": slimforge.__version__, "python": sys.version.split()[0],
            "torch": torch.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "cpu threads": str(torch.get_num_threads())}  # fmt: skip


def _stage_table(m: dict[str, dict[str, Any]], threads: int) -> list[list[str]]:
    rows = [["stage", "wall time", "training compute", "energy (estimate)", "what it did"]]
    for name, man in m.items():
        if name == "report":
            continue
        met = man.get("metrics", {})
        sec = float(man.get("seconds", 0.0))
        flops = met.get("flops")
        try:
            text = _stage_summary(name, met)
        except (KeyError, TypeError):
            text = ""
        rows.append([
            name, f"{sec:.1f} s", f"{flops:.2e} FLOPs" if flops else "-",
            f"{energy_estimate(sec, threads) * 1000:.0f} mWh", text,
        ])  # fmt: skip
    return rows


def _stage_summary(name: str, met: dict[str, Any]) -> str:
    """One line on what a stage did, from its metrics."""
    if name == "dedup":
        return (f"{met['documents']:,} documents, {met['exact_duplicates']} exact + "
                f"{met['near_duplicates']} near duplicates removed")  # fmt: skip
    if name == "prepare":
        return f"{met['train_bytes']:,} training bytes, {met['val_bytes']:,} held out"
    if name == "teacher":
        return (f"{met['params']:,} parameters ({met['active_params']:,} active), "
                f"{met['steps']} steps, {met['val_bpb']:.3f} bits/byte")  # fmt: skip
    if name == "synth":
        return (f"{met['generated']} documents written, {met['kept']} kept "
                f"(near-duplicate rate {met['near_duplicate_rate']:.0%})")  # fmt: skip
    if name == "distill":
        return (f"{met['params']:,} parameters ({met['param_ratio']:.0%} of the teacher), "
                f"{met['val_bpb']:.3f} bits/byte")  # fmt: skip
    if name == "prune":
        return (f"{met['params_before']:,} -> {met['params_after']:,} parameters, "
                f"{met['bpb_before']:.3f} -> {met['bpb_recovered']:.3f} bits/byte")  # fmt: skip
    if name == "quantize":
        return f"INT8 {met['int8']['val_bpb']:.3f}, INT4 {met['int4']['val_bpb']:.3f} bits/byte"
    if name == "evaluate":
        return f"{len(met.get('rows', []))} models measured"
    return ""


def _model_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    if not rows:
        return []
    base = rows[0]
    out = [["model", "parameters", "active per token", "on disk", "teacher size / size",
            "val bits/byte", "vs teacher", "tokens/s", "speed vs teacher"]]  # fmt: skip
    for r in rows:
        out.append([
            r["model"], f"{r['params']:,}", f"{r['active_params']:,}", fmt_bytes(r["bytes"]),
            f"{base['bytes'] / r['bytes']:.1f}x", f"{r['val_bpb']:.4f}",
            f"{(r['val_bpb'] / base['val_bpb'] - 1) * 100:+.1f} %", f"{r['tokens_per_s']:.1f}",
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
        ])  # fmt: skip
    return out


def md_table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def html_table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(
    root: Path, manifests: dict[str, dict[str, Any]], config: dict[str, Any]
) -> dict[str, Path]:
    """Writes ``report.md``, ``report.html`` and the plots into the run folder ``root``."""
    ev = manifests.get("evaluate", {}).get("metrics", {})
    threads = int(ev.get("threads", 1))
    model_rows = _model_table(ev.get("rows", []))
    stage_rows = _stage_table(manifests, threads)
    plots = _plots(root, manifests)
    command = config.get("run", {}).get("command", "slimforge demo")
    vers = versions()
    summary = _summary(ev.get("rows", []))
    sections: list[tuple[str, str, str]] = []  # (title, markdown, html)
    sections.append(("What each stage bought", md_table(model_rows), html_table(model_rows)))
    sections.append(("Stages", md_table(stage_rows), html_table(stage_rows)))
    notes = (
        "Bits per byte are measured on held-out works no model trained on (and whose other "
        "editions were kept out of training too). Tokens per second: greedy generation of "
        f"{config.get('evaluate', {}).get('gen_tokens', 128)} tokens after a "
        f"{config.get('evaluate', {}).get('prompt_tokens', 32)}-token prompt, batch 1, best of "
        f"two, on {ev.get('gen_threads', threads)} thread(s). Training compute: 6 x active non-embedding parameters x "
        "tokens plus attention (forward passes of a teacher count 2 x). Energy: wall time x "
        f"threads x {WATTS_PER_THREAD:.0f} W, an assumption, not a measurement."
    )
    sections.append(("How these were measured", notes, f"<p>{html.escape(notes)}</p>"))
    syn = manifests.get("synth", {}).get("metrics", {})
    if syn:
        filt = ", ".join(f"{k} {v}" for k, v in syn.get("removed", {}).items())
        text = (f"{syn.get('generated')} generated, {syn.get('kept')} kept; removed by rule: "
                f"{filt}.")  # fmt: skip
        sections.append(("Synthetic data filter", text, f"<p>{html.escape(text)}</p>"))
    dd = manifests.get("dedup", {}).get("metrics", {})
    if dd.get("examples"):
        md = "\n".join(f"- removed: `{e['removed'][:100]!r}`" for e in dd["examples"])
        sections.append(("Dedup examples", md, "<ul>" + "".join(
            f"<li><code>{html.escape(e['removed'][:100])}</code></li>" for e in dd["examples"]) + "</ul>"))  # fmt: skip
    samples = ev.get("samples", {})
    if samples:
        prompt = ev.get("prompt", "")
        md = (
            f"Prompt: `{prompt!r}`; sampled at temperature 0.8, top-p 0.95, seed 0.\n\n"
            + "\n\n".join(
                f"**{k}**:\n\n```\n{v}\n```"
                for k, v in samples.items()
                if "teacher" in k or "INT4" in k
            )
        )
        hs = f"<p>Prompt: <code>{html.escape(prompt)}</code></p>" + "".join(
            f"<h3>{html.escape(k)}</h3><pre>{html.escape(v)}</pre>"
            for k, v in samples.items() if "teacher" in k or "INT4" in k
        )  # fmt: skip
        sections.append(("Samples", md, hs))
    repro = f"{command}\n\n" + "\n".join(f"{k}: {v}" for k, v in vers.items())
    sections.append(("Reproduce", f"```\n{repro}\n```", f"<pre>{html.escape(repro)}</pre>"))
    cfg_json = json.dumps({k: v for k, v in config.items() if k != "run"}, indent=1)
    sections.append(
        ("Configuration", f"```json\n{cfg_json}\n```", f"<pre>{html.escape(cfg_json)}</pre>")
    )

    return write_page(root, "slimforge pipeline report", summary, plots, sections)


def write_page(
    root: Path,
    title: str,
    summary: str,
    plots: dict[str, Path],
    sections: list[tuple[str, str, str]],
) -> dict[str, Path]:
    """Writes ``root/report.md`` and ``root/report.html``: ``title``, the one-line ``summary``,
    the ``plots`` (PNG files in ``root``) and ``sections`` as ``(title, markdown, html)``;
    returns their paths (the plots included), with ``summary`` under the key it is given."""
    from slimforge.io import atomic_path

    lines = [f"# {title}", "", summary, ""]
    for name, p in plots.items():
        lines.append(f"![{name}]({p.name})")
    if not plots:
        lines.append("(no plots: install the `plots` extra, matplotlib)")
    for head, text, _ in sections:
        lines += ["", f"## {head}", "", text]
    style = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
             "img{max-width:32em;margin:.5em}pre{background:#f4f4f4;padding:.8em;overflow:auto}")  # fmt: skip
    body = [f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p><div>"]
    body += [f'<img src="{p.name}" alt="{name}">' for name, p in plots.items()]
    body.append("</div>")
    body += [f"<h2>{html.escape(t)}</h2>{h}" for t, _, h in sections]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>")  # fmt: skip
    out = {"markdown": root / "report.md", "html": root / "report.html", **plots}
    with atomic_path(out["markdown"]) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with atomic_path(out["html"]) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


def _summary(rows: list[dict[str, Any]]) -> str:
    if len(rows) < 2:
        return "Fewer than two models were evaluated."
    t, f = rows[0], rows[-1]
    return (
        f"The final model ({f['model']}) is {t['bytes'] / f['bytes']:.1f}x smaller on disk than "
        f"the {t['model']}, generates {f['tokens_per_s'] / t['tokens_per_s']:.2f}x as many "
        f"tokens per second, and its validation bits per byte are "
        f"{(f['val_bpb'] / t['val_bpb'] - 1) * 100:+.1f} % from the teacher's "
        f"({f['val_bpb']:.3f} against {t['val_bpb']:.3f})."
    )
