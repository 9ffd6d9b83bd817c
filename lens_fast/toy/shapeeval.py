"""ShapeEval: a GenEval-style scorer for Lens world images, with no learned model.

Detection, in order:
  1. An image whose short side exceeds WORK_SIDE is box-downscaled to it, so scoring
     time does not grow with the canvas (a small object is still 24 px there).
  2. Background = median of a thin border frame. If under half of the frame lies within
     BG_TOL of it, there is no background to segment against (pure noise, say) and
     nothing is detected.
  3. Every pixel is fitted to each palette colour c on the segment bg -> c (an
     anti-aliased edge is a blend of the two): coverage `a` along it, distance off it.
     Foreground: a >= ALPHA_MIN and distance <= LINE_TOL, labelled by the nearest segment.
  4. 4-connected components (a vectorised union-find). A component whose core holds
     two colours in strength (touching objects) is split by label; one too elongated
     for a single shape whose fully covered pixels fall apart (same-colour neighbours
     joined by blended pixels) is split between those pieces. A region's colour is the
     palette colour nearest the median of its best-covered quarter. A region is
     dropped when smaller than MIN_AREA_FRAC of the short side squared or larger than
     MAX_AREA_FRAC of the canvas; when that median is over COLOR_TOL from every palette
     colour, or its core (that quarter and coverage >= CORE_ALPHA) strays off the blend
     line from the background to it; when under QUIET_RING of the pixels RING px outside
     it are background or its own faint edge (noise is not an object); or when no shape
     fits it.
  5. Class from coverage-weighted cumulants over the region and a RIM px rim, measured
     against a background plane fitted just outside (gradients), rim pixels under three
     times the local noise zeroed. Third and fourth cumulants are unchanged by a blur,
     and relative to area^1.5 and area^2 by scale, so the two features hold from 5 px
     shapes to soft, blurred ones: |skew| along x or y (an upright triangle, 0.021) and
     the diagonal minus axis fourth cumulant (a square: -1/240 vs -1/120; 0 for a
     circle). The nearest of the three prototypes within CLASS_TOL wins.
Measured on renders with +-25 colour jitter: every tag 1.0 from 24 px to 512 px short
side, and >= 0.99 after a Gaussian blur of 1 px or pixel noise of sigma 10. Upright
triangles and axis-aligned squares are assumed, as rendered.

Rules follow GenEval: each include entry needs at least `count` objects of its class
(and colour, when given); the counting tag needs the exact count (and GenEval's
"exclude": fail on `count` or more of that class); a position entry needs some pair of
matching objects whose centroid offset in pixels, each axis less POSITION_MARGIN times
the two boxes' summed extents, points within 60 degrees of the relation's direction.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .scene import BACKGROUNDS, PALETTE, TAGS

WORK_SIDE = 128
BG_TOL = 40.0
ALPHA_MIN = 0.45
ALPHA_MAX = 1.6
LINE_TOL = 70.0
CORE_ALPHA = 0.75
SPLIT_ALPHA = 0.9
SPLIT_ELONGATION = 2.0
COLOR_TOL = 90.0
MIN_AREA_FRAC = 0.006
MAX_AREA_FRAC = 0.25
RIM = 3
RING = 2
QUIET_RING = 0.6
CLASS_TOL = 1.0
POSITION_MARGIN = 0.1
EVEN_SPREAD = 4.0
_COLOR_NAMES = tuple(PALETTE)
_PALETTE = np.array([PALETTE[c] for c in _COLOR_NAMES], dtype=np.float32)
# Prototype features of the ideal shapes (analytic, checked on 2000 px renders):
# (|third cumulant| / area^1.5 along x or y, (diagonal - axis) fourth cumulant / area^2).
# Both are unchanged by a Gaussian blur of the shape, and by its scale.
_SKEW_UNIT = 0.0210      # upright triangle; 0 for circle and square
_SQUARE_UNIT = 0.00417   # square: axis -1/120, diagonal -1/240; circle -1/(16 pi^2) both
_PROTOTYPES = {"circle": (0.0, 0.0), "square": (0.0, 1.0), "triangle": (1.0, 0.03)}


# ---------------------------------------------------------------- segmentation
def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean image: (labels with -1 off the mask, count).
    Union-find in whole-array steps: hook every edge's larger root onto the smaller,
    then compress paths fully; repeat until no edge joins two roots."""
    h, w = mask.shape
    flat = mask.ravel()
    parent = np.arange(h * w)
    ids = parent.reshape(h, w)
    horiz = mask[:, :-1] & mask[:, 1:]
    vert = mask[:-1, :] & mask[1:, :]
    u = np.concatenate([ids[:, :-1][horiz], ids[:-1, :][vert]])
    v = np.concatenate([ids[:, 1:][horiz], ids[1:, :][vert]])
    parent = parent.copy()
    while u.size:
        pu, pv = parent[u], parent[v]
        live = pu != pv
        if not live.any():
            break
        u, v, pu, pv = u[live], v[live], pu[live], pv[live]
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    labels = np.full(h * w, -1, dtype=np.int64)
    roots, inverse = np.unique(parent[flat], return_inverse=True)
    labels[flat] = inverse
    return labels.reshape(h, w), len(roots)


def _groups(labels: np.ndarray, n: int):
    """Pixel coordinates (ys, xs) of each label 0..n-1."""
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], np.arange(n + 1))
    w = labels.shape[1]
    return [(order[starts[k]:starts[k + 1]] // w, order[starts[k]:starts[k + 1]] % w)
            for k in range(n)]


def estimate_background(arr: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(median RGB of a border frame, fraction of the frame within BG_TOL of it,
    median distance of the frame from it: the background's noise level)."""
    h, w, _ = arr.shape
    b = max(1, min(h, w) // 32)
    frame = np.concatenate([arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3),
                            arr[b:-b, :b].reshape(-1, 3), arr[b:-b, -b:].reshape(-1, 3)])
    bg = np.median(frame, axis=0)
    dist = np.linalg.norm(frame - bg, axis=1)
    return bg, float(np.mean(dist <= BG_TOL)), float(np.median(dist))


def _image_array(image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    w, h = image.size
    if min(w, h) < 8:
        raise ValueError(f"image {w}x{h} is too small to score; expected both sides >= 8")
    image = image.convert("RGB")
    if min(w, h) > WORK_SIDE:
        s = WORK_SIDE / min(w, h)
        image = image.resize((max(8, round(w * s)), max(8, round(h * s))), Image.BOX)
    return np.asarray(image, dtype=np.float32)


def _split_by_color(ys, xs, label, best_alpha, min_area):
    """One region per colour that the component's core holds in strength."""
    core_labels = label[ys, xs][best_alpha[ys, xs] >= CORE_ALPHA]
    counts = np.bincount(core_labels, minlength=len(_COLOR_NAMES))
    strong = np.flatnonzero(counts >= max(0.5 * min_area, 0.15 * max(core_labels.size, 1)))
    if strong.size <= 1:
        return [(ys, xs)]
    lab = label[ys, xs]
    y0, x0 = ys.min(), xs.min()
    out = []
    for c in strong:
        sub = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), dtype=bool)
        sub[ys[lab == c] - y0, xs[lab == c] - x0] = True
        sub_labels, m = connected_components(sub)
        out.extend((sy + y0, sx + x0) for sy, sx in _groups(sub_labels, m) if sy.size >= min_area)
    return out


def _split_by_core(ys, xs, best_alpha, min_area):
    """Separate same-colour objects joined by a faint bridge of blended pixels: when the
    region is too elongated for one shape (SPLIT_ELONGATION; 1.45 at most for ours)
    and its fully covered pixels (SPLIT_ALPHA) fall into several sizeable pieces, each
    piece grows back over the region and becomes a region of its own."""
    cov = np.cov(np.stack([ys, xs]).astype(float)) if ys.size > 2 else np.eye(2)
    lo, hi = np.linalg.eigvalsh(cov)
    if hi <= SPLIT_ELONGATION * max(lo, 1e-9):
        return [(ys, xs)]
    y0, x0 = ys.min(), xs.min()
    inside = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), dtype=bool)
    inside[ys - y0, xs - x0] = True
    core = np.zeros_like(inside)
    full = best_alpha[ys, xs] >= SPLIT_ALPHA
    core[ys[full] - y0, xs[full] - x0] = True
    pieces, m = connected_components(core)
    sizes = np.bincount(pieces[core], minlength=m)
    big = np.flatnonzero(sizes >= max(3.0, 0.25 * min_area))
    if big.size <= 1:
        return [(ys, xs)]
    owner = np.where(np.isin(pieces, big), pieces, -1)
    _grow(owner, inside.shape[0] + inside.shape[1], allowed=inside)
    out = []
    for k in big:
        py, px = np.nonzero(owner == k)
        if py.size >= min_area:
            out.append((py + y0, px + x0))
    return out


def _grow(owner: np.ndarray, steps: int, allowed: np.ndarray | None = None) -> None:
    """Grow every region, in place, into unowned 4-neighbours (within `allowed`) up to
    `steps` times, first come first served: each object's anti-aliased or blurred rim."""
    for _ in range(steps):
        cand = owner.copy()
        for src, dst in (((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                         ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
                         ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                         ((slice(None), slice(1, None)), (slice(None), slice(None, -1)))):
            take = (cand[dst] < 0) & (owner[src] >= 0)
            if allowed is not None:
                take &= allowed[dst]
            cand[dst][take] = owner[src][take]
        if np.array_equal(cand, owner):
            return
        owner[:] = cand


def detect_objects(image: Image.Image) -> tuple[list[dict], dict]:
    """Objects found in `image`: a list of {"class", "color", "centroid" (x, y as
    fractions of width and height), "bbox" (x0, y0, x1, y1, fractions), "centroid_px",
    "bbox_px" (the same in input pixels), "area" (fraction of the canvas, sub-pixel),
    "color_distance", "features"}, and an info dict ("background" RGB,
    "background_agreement", "dropped": why each rejected region is not an object)."""
    arr = _image_array(image)
    h, w, _ = arr.shape
    px = image.size[0] / w                               # working -> input pixels
    bg, agree, spread = estimate_background(arr)
    info = {"background": [round(float(v), 1) for v in bg],
            "background_agreement": round(agree, 3), "background_spread": round(spread, 2), "dropped": []}
    if agree < 0.5:
        info["dropped"].append(f"no uniform background: {agree:.2f} of the border "
                               f"lies within {BG_TOL:.0f} of its median (need >= 0.5)")
        return [], info
    x = arr - bg
    d = _PALETTE - bg
    dn2 = np.maximum((d * d).sum(1), 1.0)
    proj = x @ d.T                                       # (h, w, colours)
    alpha = proj / dn2                                   # coverage along bg -> colour
    off2 = np.maximum((x * x).sum(-1, keepdims=True) - proj * alpha, 0.0)
    valid = (alpha >= ALPHA_MIN) & (alpha <= ALPHA_MAX) & (off2 <= LINE_TOL ** 2)
    label = np.where(valid, off2, np.inf).argmin(-1)
    best_alpha = np.take_along_axis(alpha, label[..., None], -1)[..., 0]
    comps, n = connected_components(valid.any(-1))
    min_area = max(4.0, MIN_AREA_FRAC * min(h, w) ** 2)
    regions = []
    for ys, xs in _groups(comps, n):
        if ys.size >= min_area:
            for cy, cx in _split_by_color(ys, xs, label, best_alpha, min_area):
                regions.extend(_split_by_core(cy, cx, best_alpha, min_area))
    owner = np.full((h, w), -1, dtype=np.int64)
    for k, (ys, xs) in enumerate(regions):
        owner[ys, xs] = k
    _grow(owner, RIM)
    quiet = np.linalg.norm(x, axis=-1) <= max(BG_TOL, 2.0 * spread)
    objects = []
    for (ys, xs), (gy, gx) in zip(regions, _groups(owner, len(regions))):
        obj, why = _describe_region(ys, xs, gy, gx, arr, bg, best_alpha, quiet,
                                    min_area, MAX_AREA_FRAC * h * w)
        if obj is None:
            info["dropped"].append(f"region at x={xs.mean() / w:.2f}, y={ys.mean() / h:.2f}: {why}")
            continue
        cx, cy = obj.pop("_c")
        x0, y0, x1, y1 = obj.pop("_box")
        obj.update(centroid=(round(cx / w, 4), round(cy / h, 4)),
                   bbox=(round(x0 / w, 4), round(y0 / h, 4), round(x1 / w, 4), round(y1 / h, 4)),
                   centroid_px=(round(cx * px, 2), round(cy * px, 2)),
                   bbox_px=tuple(round(v * px, 2) for v in (x0, y0, x1, y1)),
                   area=round(obj.pop("_area") / (h * w), 5))
        objects.append(obj)
    return objects, info


def _shape_features(ys, xs, weight):
    """(triangle-ness, squareness) in prototype units, from weighted cumulants."""
    a = weight.sum()
    dy = ys - (weight * ys).sum() / a
    dx = xs - (weight * xs).sum() / a

    def m(p, q):
        return float((weight * dx ** p * dy ** q).sum() / a)

    m20, m02, m11 = m(2, 0), m(0, 2), m(1, 1)
    m40, m04, m22, m31, m13 = m(4, 0), m(0, 4), m(2, 2), m(3, 1), m(1, 3)
    k3 = max(abs(m(3, 0)), abs(m(0, 3))) / a ** 1.5
    axis = 0.5 * (m40 - 3 * m20 ** 2 + m04 - 3 * m02 ** 2)
    u2, v2 = 0.5 * (m20 + 2 * m11 + m02), 0.5 * (m20 - 2 * m11 + m02)
    u4 = 0.25 * (m40 + 4 * m31 + 6 * m22 + 4 * m13 + m04)
    v4 = 0.25 * (m40 - 4 * m31 + 6 * m22 - 4 * m13 + m04)
    diag = 0.5 * (u4 - 3 * u2 ** 2 + v4 - 3 * v2 ** 2)
    tr, det = m20 + m02, m20 * m02 - m11 ** 2
    disc = math.sqrt(max(tr * tr / 4 - det, 0.0))
    elong = (tr / 2 + disc) / (tr / 2 - disc) if tr / 2 - disc > 0 else math.inf
    return k3 / _SKEW_UNIT, (diag - axis) / (a * a) / _SQUARE_UNIT, elong


def _ring(ys, xs, shape, radius):
    """Pixels at 4-neighbour distance exactly `radius` from the region (inside the image)."""
    h, w = shape
    y0, x0 = ys.min() - radius, xs.min() - radius
    grid = np.zeros((ys.max() - y0 + radius + 1, xs.max() - x0 + radius + 1), dtype=bool)
    grid[ys - y0, xs - x0] = True
    inner = grid
    for _ in range(radius):
        inner, grid = grid, grid.copy()
        grid[1:] |= inner[:-1]
        grid[:-1] |= inner[1:]
        grid[:, 1:] |= inner[:, :-1]
        grid[:, :-1] |= inner[:, 1:]
    ry, rx = np.nonzero(grid & ~inner)
    ry, rx = ry + y0, rx + x0
    keep = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
    return ry[keep], rx[keep]


def _coverage(ys, xs, gy, gx, arr, bg, color, quiet):
    """Per-pixel coverage of the region's colour over (gy, gx), against a background
    plane fitted to the quiet pixels just beyond the rim (a gradient shifts it). Rim
    pixels below three times the background's noise (along the colour) count as 0."""
    by, bx = _ring(ys, xs, quiet.shape, RIM + 1)
    calm = quiet[by, bx]
    by, bx = by[calm], bx[calm]
    base = np.broadcast_to(bg, (gy.size, 3))
    noise = 0.0
    direction = color - bg
    if by.size >= 8:
        my, mx = by.mean(), bx.mean()
        design = np.stack([np.ones(by.size), bx - mx, by - my], axis=1)
        coef = np.linalg.lstsq(design, arr[by, bx], rcond=None)[0]

        def plane(yy, xx):
            return coef[0] + np.outer(xx - mx, coef[1]) + np.outer(yy - my, coef[2])

        base = plane(gy, gx)
        direction = color - plane(np.array([ys.mean()]), np.array([xs.mean()]))[0]
        resid = (arr[by, bx] - plane(by, bx)) @ direction / max(float(direction @ direction), 1.0)
        noise = 1.4826 * float(np.median(np.abs(resid)))
    weight = (arr[gy, gx] - base) @ direction / max(float(direction @ direction), 1.0)
    w = quiet.shape[1]
    rim = ~np.isin(gy * w + gx, ys * w + xs)
    weight[rim & (weight < max(0.08, 3.0 * noise))] = 0.0
    return np.clip(weight, 0.0, 1.0)


def _blend_fit(x: np.ndarray, direction: np.ndarray):
    """(coverage along `direction`, distance off that line) for pixels x minus bg."""
    a = x @ direction / max(float(direction @ direction), 1.0)
    return a, np.linalg.norm(x - a[:, None] * direction, axis=1)


def _describe_region(ys, xs, gy, gx, arr, bg, best_alpha, quiet, min_area, max_area):
    """(object dict, None), or (None, why the region is not an object). (ys, xs): the
    region's foreground pixels; (gy, gx): those plus the rim it grew into."""
    if ys.size > max_area:
        return None, f"{ys.size} px, over the {max_area:.0f} px an object may cover"
    cover = best_alpha[ys, xs]
    top = cover >= min(np.percentile(cover, 75), np.sort(cover)[-min(3, cover.size)])
    median = np.median(arr[ys[top], xs[top]], axis=0)
    dist = np.linalg.norm(_PALETTE - median, axis=1)
    ci = int(dist.argmin())
    if dist[ci] > COLOR_TOL:
        return None, (f"colour {np.round(median).astype(int).tolist()} is {dist[ci]:.0f} "
                      f"from the nearest palette colour (limit {COLOR_TOL:.0f})")
    # Uniform: the core pixels lie on the blend line between background and that colour.
    core = top | (cover >= CORE_ALPHA)
    _, off = _blend_fit(arr[ys[core], xs[core]] - bg, median - bg)
    uniform = float(np.mean(off <= 0.5 * COLOR_TOL))
    if uniform < 0.6:
        return None, f"colour not uniform: {uniform:.2f} of the core on its blend line (need 0.6)"
    ry, rx = _ring(ys, xs, quiet.shape, RING)
    if ry.size:
        # Background, or this object's own soft edge: a faint blend towards its colour.
        a, off = _blend_fit(arr[ry, rx] - bg, median - bg)
        calm = float(np.mean(quiet[ry, rx] | ((a < ALPHA_MIN) & (off <= LINE_TOL))))
        if calm < QUIET_RING:
            return None, f"not set on background: {calm:.2f} of its rim is background (need {QUIET_RING})"
    weight = _coverage(ys, xs, gy, gx, arr, bg, median, quiet)
    area = float(weight.sum())
    if area < min_area:
        return None, f"covers {area:.1f} px, under the minimum {min_area:.1f}"
    tri, sq, elong = _shape_features(gy + 0.5, gx + 0.5, weight)
    if elong > 4.0:
        return None, f"elongation {elong:.1f} is beyond any shape (limit 4)"
    fits = {c: math.hypot(tri - p[0], sq - p[1]) for c, p in _PROTOTYPES.items()}
    cls = min(fits, key=fits.get)
    if fits[cls] > CLASS_TOL:
        return None, (f"no shape fits: triangle/square features ({tri:.2f}, {sq:.2f}) are "
                      f"{fits[cls]:.2f} from the nearest ({cls}; limit {CLASS_TOL})")
    bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    return {
        "class": cls, "color": _COLOR_NAMES[ci], "color_distance": round(float(dist[ci]), 1),
        "features": {"triangle": round(float(tri), 3), "square": round(float(sq), 3),
                     "elongation": round(float(elong), 3),
                     "fill": round(float(ys.size / (bw * bh)), 3),
                     "class_distance": round(float(fits[cls]), 3)},
        "_c": (float((weight * (gx + 0.5)).sum() / area), float((weight * (gy + 0.5)).sum() / area)),
        "_box": (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
        "_area": area,
    }, None


# ---------------------------------------------------------------- rules
def relation_holds(a: dict, b: dict, relation: str) -> bool:
    """Whether detected object `a` is `relation` of `b` ("left of", "right of", "above",
    "below"): the centroid offset, each axis shrunk by POSITION_MARGIN times the two
    boxes' extents on that axis, must point within 60 degrees of the relation."""
    (ax, ay), (bx, by) = a["centroid_px"], b["centroid_px"]
    dx, dy = ax - bx, ay - by
    norm = math.hypot(dx, dy)
    if norm == 0:
        return False
    ext_x = (a["bbox_px"][2] - a["bbox_px"][0]) + (b["bbox_px"][2] - b["bbox_px"][0])
    ext_y = (a["bbox_px"][3] - a["bbox_px"][1]) + (b["bbox_px"][3] - b["bbox_px"][1])
    ex = math.copysign(max(abs(dx) - POSITION_MARGIN * ext_x, 0.0), dx)
    ey = math.copysign(max(abs(dy) - POSITION_MARGIN * ext_y, 0.0), dy)
    along = {"left of": -ex, "right of": ex, "above": -ey, "below": ey}
    if relation not in along:
        raise ValueError(f"relation={relation!r} is not valid; expected one of {list(along)}")
    return along[relation] > 0.5 * norm


def _relations_between(a: dict, b: dict) -> list[str]:
    return [r for r in ("left of", "right of", "above", "below") if relation_holds(a, b, r)]


def _name(req: dict, count: int | None = None) -> str:
    n = req.get("count", 1) if count is None else count
    color = f"{req['color']} " if req.get("color") else ""
    return f"{n} {color}{req['class']}{'' if n == 1 else 's'}"


def rubric_checks(objects: list[dict], meta: dict, background=None) -> list[tuple[str, bool, str | None]]:
    """Every requirement of GenEval-style metadata, in order: (item, satisfied, why not).
    Items: each include entry (at least `count` of its class and colour; exactly
    `count` for the counting tag), each exclude entry, each position, and the
    background when the metadata names one (``background``: the detected RGB)."""
    tag = meta.get("tag")
    include = meta.get("include")
    if not include:
        raise ValueError(f"metadata has no 'include' entries: {meta!r}")
    for req in include:
        if "class" not in req:
            raise ValueError(f"include entry without a 'class': {req!r}")
        if req.get("position") and not 0 <= int(req["position"][1]) < len(include):
            raise ValueError(f"position {req['position']!r} refers to include[{req['position'][1]}], "
                             f"but there are {len(include)} entries")
    items, matched = [], []
    for req in include:
        count = int(req.get("count", 1))
        same_class = [o for o in objects if o["class"] == req["class"]]
        found = [o for o in same_class if not req.get("color") or o["color"] == req["color"]]
        name, why = _name(req), None
        if len(found) < count:
            seen = sorted(o["color"] for o in same_class)
            extra = f" ({req['class']} colours seen: {', '.join(seen)})" if seen and req.get("color") else ""
            why = f"expected {_name(req)}, found {len(found)}{extra}"
        elif tag == "counting" and len(same_class) != count:
            name, why = f"exactly {name}", f"expected exactly {_name(req)}, found {len(same_class)}"
        items.append((name, why is None, why))
        matched.append(found)
    exact = {req["class"] for req in include} if tag == "counting" else set()
    for req in meta.get("exclude", []):
        if req["class"] in exact:  # implied by the exact count above (GenEval's counting exclude)
            continue
        n = sum(o["class"] == req["class"] for o in objects)
        ok = n < int(req["count"])
        items.append((f"fewer than {_name(req)}", ok, None if ok else f"expected fewer than {_name(req)}, found {n}"))
    for i, req in enumerate(include):
        if not req.get("position"):
            continue
        relation, j = req["position"]
        name = f"{include[i]['class']} {relation} {include[int(j)]['class']}"
        if any(relation_holds(a, b, relation) for a in matched[i] for b in matched[int(j)]):
            items.append((name, True, None))
            continue
        seen = sorted({r for a in matched[i] for b in matched[int(j)] for r in _relations_between(a, b)})
        items.append((name, False, f"expected the {include[i]['class']} {relation} the {include[int(j)]['class']}, "
                                   f"found {', '.join(seen) if seen else 'no clear relation'}"))
    if meta.get("background") is not None and background is not None:
        named = min(BACKGROUNDS, key=lambda k: float(np.linalg.norm(np.subtract(BACKGROUNDS[k], background))))
        ok = named == meta["background"]
        items.append((f"{meta['background']} background", ok,
                      None if ok else f"expected a {meta['background']} background, found {named}"))
    return items


def clean_image(info: dict) -> tuple[bool, str | None]:
    """The toy world's global rule: no rejected regions (smudges, broken or unknown shapes)
    and an even background (its border within EVEN_SPREAD of its median: a plain render is
    0, the "fine grain" texture 5); (holds, why not) from ``detect_objects``' info."""
    if info["dropped"]:
        return False, info["dropped"][0]
    if info.get("background_spread", 0.0) > EVEN_SPREAD:
        return False, f"uneven background: its border lies {info['background_spread']:.1f} from its median " \
                      f"(limit {EVEN_SPREAD})"
    return True, None


def _check(objects: list[dict], meta: dict, background=None) -> str | None:
    """None when the detections satisfy the metadata, else the first reason they fail."""
    return next((why for _, ok, why in rubric_checks(objects, meta, background) if not ok), None)


def score_image(image: Image.Image, metadata: dict) -> dict:
    """Judge one image against GenEval-style metadata: {"correct", "tag", "reason" (None
    when correct), "objects" (detections), "background", "dropped" (rejected regions)}."""
    if not isinstance(metadata, dict):
        raise TypeError(f"expected metadata as a dict, got {type(metadata).__name__}")
    objects, info = detect_objects(image)
    reason = _check(objects, metadata, info["background"])
    if reason is not None and not objects and info["dropped"]:
        reason += f"; {info['dropped'][0]}"
    return {"correct": reason is None, "tag": metadata.get("tag"), "reason": reason,
            "objects": objects, **info}


def score_set(images, metadatas) -> dict:
    """Accuracy per tag, "overall" = mean of the per-tag accuracies (over the tags
    present; over all six for a full set), "n" = images scored, "n_per_tag", and
    "results" (each image's score_image output)."""
    images, metadatas = list(images), list(metadatas)
    if len(images) != len(metadatas):
        raise ValueError(f"got {len(images)} images but {len(metadatas)} metadata entries")
    results = [score_image(im, md) for im, md in zip(images, metadatas)]
    tally: dict[str, list[bool]] = {}
    for r in results:
        tally.setdefault(r["tag"], []).append(r["correct"])
    order = [t for t in TAGS if t in tally] + sorted(t for t in tally if t not in TAGS)
    per_tag = {t: float(np.mean(tally[t])) for t in order}
    overall = float(np.mean(list(per_tag.values()))) if per_tag else float("nan")
    return {"per_tag": per_tag, "overall": overall, "n": len(results),
            "n_per_tag": {t: len(tally[t]) for t in order}, "results": results}
