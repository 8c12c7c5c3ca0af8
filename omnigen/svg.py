"""A hand-written SVG picture of a Plan: the device mesh by node, which dims each block group uses, and the predicted
step-time and memory breakdowns. Plain string building, fixed float formatting: the same Plan gives the same bytes.

Rank layout follows the generated script: the dense mesh is (dp_replicate, dp_shard, sp), row-major, so an SP group is
`sp` consecutive ranks and an FSDP shard group (dp_shard x sp) is a consecutive block per replica; the expert mesh
(dp_replicate, ep_fsdp, ep) regroups that block so that an EP group is `ep` consecutive ranks.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from . import emit
from .errors import OmnigenError
from .plan import MESH_DIMS, Plan

WIDTH = 960
MARGIN = 20
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
MONO_CHAR = 0.6          # monospace advance per font-size unit: used to size table columns
INK, MUTED, GRID = "#222", "#777", "#ccc"

# Step-time terms that add up to the predicted step, in drawing order; comm_s is the total of which only
# exposed_comm_s is on the critical path, so it is reported beside the bar, not stacked.
TIME_ORDER = ("compute_s", "recompute_s", "host_s", "exposed_comm_s", "optimizer_s")
NOT_STACKED = ("comm_s",)
MEMORY_ORDER = ("parameters", "gradients", "optimizer", "activations", "transient", "overhead")
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
           "#bab0ac")
BAND = {"FSDP": ("#c9d7ea", "#a9bedc"), "SP": ("#f6d2a8", "#eab47a"), "EP": ("#c6e3c1", "#9ccf94")}


# --- primitives ----------------------------------------------------------------------------------------------

def _num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def text(x: float, y: float, s: str, size: float = 11, anchor: str = "start", fill: str = INK, bold: bool = False,
         mono: bool = False) -> str:
    weight = ' font-weight="bold"' if bold else ""
    return (f'<text x="{_num(x)}" y="{_num(y)}" font-size="{_num(size)}" text-anchor="{anchor}" fill="{fill}" '
            f'font-family={quoteattr(MONO if mono else FONT)}{weight}>{escape(s)}</text>')


def rect(x: float, y: float, w: float, h: float, fill: str, stroke: str = "none", title: str | None = None) -> str:
    body = f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(w)}" height="{_num(h)}" fill="{fill}" stroke="{stroke}"'
    return f"{body}><title>{escape(title)}</title></rect>" if title else body + "/>"


def line(x1: float, y1: float, x2: float, y2: float, stroke: str, dash: bool = False) -> str:
    extra = ' stroke-dasharray="4 3"' if dash else ""
    return f'<line x1="{_num(x1)}" y1="{_num(y1)}" x2="{_num(x2)}" y2="{_num(y2)}" stroke="{stroke}"{extra}/>'


def fits(s: str, width: float, size: float) -> bool:
    return len(s) * MONO_CHAR * size <= width


def seconds(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v * 1e6:.3g} us" if v < 1e-3 else f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.4g} s"


def nbytes(v: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{int(v)} B"


def shard_hue(i: int, n: int) -> str:
    """A light colour per shard position: ranks of different replicas holding the same shard share it."""
    r, g, b = colorsys.hls_to_rgb(i / max(n, 1), 0.85, 0.55)  # hex, not hsl(): every renderer reads it
    return "#" + "".join(f"{round(255 * c):02x}" for c in (r, g, b))


# --- (a) the mesh ---------------------------------------------------------------------------------------------

def rank_coords(mesh: dict[str, int], rank: int) -> dict[str, int]:
    """Coordinates of one rank in the dense mesh and in the expert mesh."""
    sp, shard, ep = mesh["sp"], mesh["dp_shard"], mesh["ep"]
    inner = rank % (shard * sp)  # position inside the FSDP shard group
    return {"dp_replicate": rank // (shard * sp), "dp_shard": inner // sp, "sp": rank % sp,
            "ep": inner % ep, "ep_fsdp": inner // ep, "shard_position": inner}


def coord_lines(mesh: dict[str, int], c: dict[str, int]) -> list[str]:
    """Compact labels under the rank number: only dims larger than 1, and none when a single dim is (its coordinate
    is the rank itself)."""
    if sum(mesh[d] > 1 for d in MESH_DIMS) < 2:
        return []
    dense = " ".join(f"{tag}{c[d]}" for d, tag in (("dp_replicate", "rep"), ("dp_shard", "sh")) if mesh[d] > 1)
    split = " ".join(f"{tag}{c[d]}" for d, tag in (("sp", "sp"), ("ep", "ep")) if mesh[d] > 1)
    return [s for s in (dense, split) if s]


def rank_groups(mesh: dict[str, int]) -> list[tuple[str, int]]:
    """(kind, size) of the contiguous rank groups worth a band: FSDP shard group, SP group, EP group."""
    kinds = [("FSDP", mesh["dp_shard"] * mesh["sp"]), ("SP", mesh["sp"]), ("EP", mesh["ep"])]
    return [(k, n) for k, n in kinds if n > 1]


def mesh_section(plan: Plan, y: float) -> tuple[list[str], float]:
    mesh, nodes, ppn = plan.mesh, plan.cluster["nodes"], plan.cluster["procs_per_node"]
    dims = " x ".join(f"{d}={mesh[d]}" for d in MESH_DIMS)
    ep = plan.expert_parallel
    carve = f"   (ep carved out of dp_shard x sp: ep_fsdp={ep['ep_fsdp']} x ep={ep['degree']})" if ep else ""
    out = [text(MARGIN, y, "Device mesh", 14, bold=True),
           text(MARGIN, y + 18, f"{plan.world_size} ranks = {nodes} node(s) x {ppn}; {dims}{carve}", 11)]
    y += 34
    label_w, gap = 64, 6
    box_w = min(96.0, (WIDTH - 2 * MARGIN - label_w - (ppn - 1) * gap) / ppn)
    labelled = box_w >= 40 and bool(coord_lines(mesh, rank_coords(mesh, 0)))
    box_h = 44 if labelled else 24
    bands = rank_groups(mesh)
    row_h = box_h + 14 * len(bands) + 12
    for node in range(nodes):
        top = y + node * row_h
        out.append(text(MARGIN, top + box_h / 2 + 4, f"node {node}", 11, fill=MUTED))
        for local in range(ppn):
            out += rank_box(plan, node * ppn + local, MARGIN + label_w + local * (box_w + gap), top, box_w, box_h)
        for i, (kind, size) in enumerate(bands):
            out += band_row(kind, size, node * ppn, ppn, MARGIN + label_w, top + box_h + 3 + 14 * i, box_w, gap)
    legend = mesh_legend(plan, bands, labelled, y + nodes * row_h + 4)
    return out + legend, y + nodes * row_h + 12 * len(legend) + 16


def rank_box(plan: Plan, rank: int, x: float, y: float, w: float, h: float) -> list[str]:
    mesh = plan.mesh
    c = rank_coords(mesh, rank)
    fill = shard_hue(c["shard_position"], mesh["dp_shard"] * mesh["sp"]) if mesh["dp_replicate"] > 1 else "#f4f4f4"
    title = f"rank {rank}: " + ", ".join(f"{d} {c[d]}" for d in ("dp_replicate", "dp_shard", "sp")) \
        + (f", ep {c['ep']} (ep_fsdp {c['ep_fsdp']})" if mesh["ep"] > 1 else "")
    out = [rect(x, y, w, h, fill, "#888", title)]
    size = min(13.0, w / 3)
    if size >= 5:
        out.append(text(x + w / 2, y + size + 2, str(rank), size, "middle", bold=True))
    coords = coord_lines(mesh, c)
    sub = min(8.5, w / (MONO_CHAR * max(map(len, coords), default=1) + 1))
    if h > 30 and sub >= 5:
        out += [text(x + w / 2, y + size + 4 + (i + 1) * (sub + 2), s, sub, "middle", MUTED, mono=True)
                for i, s in enumerate(coords)]
    return out


def band_row(kind: str, size: int, first: int, ppn: int, x0: float, y: float, box_w: float, gap: float) -> list[str]:
    """One bar per group under this node's ranks (a group spanning nodes shows a piece on each); adjacent groups
    alternate shades so their boundary is visible."""
    out = []
    for local in range(ppn):
        rank = first + local
        if local and rank % size:
            continue  # drawn with the group's first rank on this node
        group, span = rank // size, min(size - rank % size, ppn - local)
        x, w = x0 + local * (box_w + gap), span * box_w + (span - 1) * gap
        full = f"{kind} {group}: ranks {group * size}-{group * size + size - 1}"
        out.append(rect(x, y, w, 11, BAND[kind][group % 2], title=full))
        label = next((s for s in (full, f"{kind} {group}", str(group)) if fits(s, w - 4, 8)), None)
        if label:
            out.append(text(x + w / 2, y + 8.5, label, 8, "middle", mono=True))
    return out


def mesh_legend(plan: Plan, bands: list[tuple[str, int]], labelled: bool, y: float) -> list[str]:
    meaning = {"FSDP": "FSDP shard group (dp_shard x sp)", "SP": "Ulysses SP group", "EP": "EP group (splits experts)"}
    parts = [f"{k} = {meaning[k]}, {n} ranks" for k, n in bands] or ["single rank: no groups"]
    lines = ["bands: " + "; ".join(parts)]
    if labelled:
        lines.append("box labels: rank, then rep = dp_replicate, sh = dp_shard, sp = sp, ep = ep coordinate "
                     "(dims > 1 only)")
    if plan.mesh["dp_replicate"] > 1:
        lines.append("same fill colour = same shard position: HSDP replicas all-reduce across dp_replicate")
    return [text(MARGIN, y + 12 * i, s, 9.5, fill=MUTED) for i, s in enumerate(lines)]


# --- (b) groups x dims -----------------------------------------------------------------------------------------

def dim_cell(dim: str, mesh: dict[str, int], shard_dims: list[str] | tuple[str, ...], replicate: bool,
             sequence_parallel: str, ep: int) -> str:
    """What one group does along one mesh dim ('' when the dim has size 1)."""
    if mesh[dim] == 1:
        return ""
    fsdp = "dp_shard_sp" in shard_dims or "dp_shard" in shard_dims
    if dim == "dp_replicate":
        return "all-reduce" if replicate else ("HSDP replica" if dim in shard_dims else "-")
    if dim == "dp_shard":
        return "all-reduce" if replicate else ("FSDP shard" if fsdp else "-")
    if dim == "sp":
        parts = (["FSDP shard"] if "dp_shard_sp" in shard_dims else []) + \
            {"ulysses": ["Ulysses"], "replicated": ["whole seq"]}.get(sequence_parallel, [])
        return " + ".join(parts) or ("all-reduce" if replicate else "-")
    return f"experts /{ep}" if ep > 1 else "-"  # dense weights ignore ep: they stay on the FSDP mesh


def table_rows(plan: Plan) -> list[list[str]]:
    rows = []
    for g in plan.groups:
        dims = [dim_cell(d, plan.mesh, g.shard_dims, g.replicate, g.sequence_parallel, g.ep) for d in MESH_DIMS]
        rows.append([g.name, g.role, f"{g.count} x {g.layer_class}", *dims, g.activation_checkpointing,
                     "yes" if g.reshard_after_forward else "no", "yes" if g.frozen else "no"])
    dims = [dim_cell(d, plan.mesh, plan.root["shard_dims"], False, "none", 1) for d in MESH_DIMS]
    rows.append(["(root)", "embeddings, norms, heads", "1 unit", *dims, "none",
                 "yes" if plan.root["reshard_after_forward"] else "no", "no"])
    return rows


def groups_section(plan: Plan, y: float) -> tuple[list[str], float, float]:
    head = ["group", "role", "layers", *(f"{d}={plan.mesh[d]}" for d in MESH_DIMS), "AC", "reshard", "frozen"]
    rows = table_rows(plan)
    size, row_h, pad = 10.0, 18, 8
    widths = [max(len(r[i]) for r in [head, *rows]) * MONO_CHAR * size + 2 * pad for i in range(len(head))]
    out = [text(MARGIN, y, "Block groups x mesh dims", 14, bold=True)]
    y += 10
    xs = [MARGIN + sum(widths[:i]) for i in range(len(widths))]
    for r, cells in enumerate([head, *rows]):
        top = y + r * row_h
        for i, cell in enumerate(cells):
            used = 3 <= i < 3 + len(MESH_DIMS) and cell not in ("", "-") and r > 0
            fill = "#eeeeee" if r == 0 else ("#dbe8d5" if used else "#ffffff")
            out.append(rect(xs[i], top, widths[i], row_h, fill, GRID))
            out.append(text(xs[i] + pad, top + 13, cell if cell else "·", size, mono=True,
                            fill=INK if cell else MUTED, bold=r == 0))
    y += (len(rows) + 1) * row_h + 14
    out.append(text(MARGIN, y, "green = the group uses this dim; · = dim of size 1; whole seq = every SP rank runs "
                               "the group on its whole input; reshard = reshard_after_forward; AC = activation "
                               "checkpointing", 9.5, fill=MUTED))
    return out, y + 22, MARGIN + sum(widths)


# --- (c) predicted breakdowns ---------------------------------------------------------------------------------

def ordered(values: dict[str, float], order: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    """Known keys in their fixed order, then any other keys alphabetically (new cost terms show up too)."""
    rest = sorted(k for k in values if k not in order and k not in skip)
    return [(k, float(values[k])) for k in (*order, *rest) if k in values and k not in skip]


def time_terms(breakdown: dict[str, float]) -> list[tuple[str, float]]:
    return ordered({k: v for k, v in breakdown.items() if k.endswith("_s")}, TIME_ORDER, NOT_STACKED)


def stacked_bar(title: str, total_label: str, parts: list[tuple[str, float]], fmt, y: float,
                capacity: float | None = None) -> tuple[list[str], float]:
    """A horizontal stacked bar, a legend row per part (value and share), and an optional capacity line."""
    x0, bar_w, bar_h = MARGIN + 140, WIDTH - 2 * MARGIN - 140 - 90, 22
    total = sum(v for _, v in parts)
    # Keep the capacity on the axis only when it is comparable; a far larger one would flatten every part.
    on_axis = capacity is not None and capacity <= 3 * max(total, 1e-30)
    scale = max(total, capacity if on_axis else 0.0) or 1.0
    out = [text(MARGIN, y + 15, title, 11, bold=True), text(x0 + bar_w + 6, y + 15, total_label, 10)]
    x = x0
    for i, (name, v) in enumerate(parts):
        w = bar_w * v / scale
        if w >= 0.05:
            out.append(rect(x, y, w, bar_h, PALETTE[i % len(PALETTE)], "#fff", f"{name}: {fmt(v)}"))
        if fits(name, w - 4, 9):
            out.append(text(x + w / 2, y + 15, name, 9, "middle", "#fff", mono=True))
        x += w
    out.append(rect(x0, y, bar_w * total / scale, bar_h, "none", "#555"))
    if capacity is not None:
        out += capacity_mark(capacity, scale, on_axis, x0, bar_w, y, bar_h, fmt)
    y += bar_h + 14
    for i, (name, v) in enumerate(parts):
        col, row = i % 3, i // 3
        lx, ly = x0 + col * (bar_w / 3), y + row * 15
        share = "" if not total else f" ({v / total:.0%})" if v == 0 or v / total >= 0.005 else " (<1%)"
        out += [rect(lx, ly - 9, 10, 10, PALETTE[i % len(PALETTE)]), text(lx + 14, ly, f"{name} {fmt(v)}{share}", 10)]
    return out, y + 15 * ((len(parts) + 2) // 3) + 8


def capacity_mark(capacity: float, scale: float, on_axis: bool, x0: float, bar_w: float, y: float, bar_h: float,
                  fmt) -> list[str]:
    if on_axis:
        cx = x0 + bar_w * capacity / scale
        return [line(cx, y - 6, cx, y + bar_h + 4, "#c00", dash=True),
                text(cx, y - 8, f"device capacity {fmt(capacity)}", 9, "end", "#c00")]
    return [text(x0 + bar_w, y - 4, f"device capacity {fmt(capacity)} (off this axis)", 9, "end", "#c00")]


def breakdown_section(plan: Plan, capacity: int | None, y: float) -> tuple[list[str], float]:
    p = plan.predicted
    out = [text(MARGIN, y, "Predicted cost per step (one device)", 14, bold=True),
           text(MARGIN, y + 17, f"step {seconds(p['step_time_s'])}, {p['tokens_per_s_per_device']:.4g} "
                                f"tokens/s/device, MFU {p['mfu']:.1%}, hardware {plan.cluster['hardware']}", 11)]
    y += 40
    breakdown = p.get("breakdown", {})
    bar, y = stacked_bar("step time", seconds(p["step_time_s"]), time_terms(breakdown), seconds, y)
    out += bar
    hidden = [f"{k} {seconds(breakdown[k])}" for k in NOT_STACKED if k in breakdown]
    if hidden:
        out.append(text(MARGIN + 140, y, "not stacked: " + ", ".join(hidden)
                        + " (all communication; only exposed_comm_s is on the critical path)", 9.5, fill=MUTED))
        y += 22
    memory = ordered(p.get("memory", {}), MEMORY_ORDER)
    bar, y = stacked_bar("peak memory", nbytes(p["peak_memory_bytes"]), memory, nbytes, y + 10, capacity)
    return out + bar, y


# --- the document ---------------------------------------------------------------------------------------------

def render_svg(plan: Plan, memory_capacity_bytes: int | None = None) -> str:
    """The whole picture as one SVG document (str)."""
    y = MARGIN + 16
    body = [text(MARGIN, y, plan.name, 16, bold=True),
            text(MARGIN, y + 18, f"{plan.model_class}, {plan.total_params:,} parameters; {plan.world_size} ranks "
                                 f"({plan.cluster['device']}); omnigen {plan.omnigen_version}", 11, fill=MUTED)]
    y += 46
    sections, y = mesh_section(plan, y)
    body += sections
    table, y, table_right = groups_section(plan, y + 10)
    body += table
    bars, y = breakdown_section(plan, memory_capacity_bytes, y + 6)
    body += bars
    width, height = max(WIDTH, round(table_right + MARGIN)), round(y + MARGIN)
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">')
    return "\n".join([head, f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>', *body,
                      "</svg>"]) + "\n"


def write_svg(path: str | Path, svg: str) -> None:
    """Write through a temporary sibling and rename (emit.write): a reader never sees half a file."""
    path = Path(path)
    try:
        emit.write({path.name: svg}, path.parent)
    except emit.WriteError as e:
        raise OmnigenError(f"--svg {path}: cannot write there: {e.reason}") from None
