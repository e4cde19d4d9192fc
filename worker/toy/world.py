"""The toy world: prompts about one coloured shape on a plain background, a renderer, extractors.

A scene has one foreground shape. Every attribute a prompt can name is also measurable from
pixels, so tests and simulated annotators can judge generated images without a learned model:

- colour: hue of the foreground (backgrounds are neutral, so chroma separates foreground);
- shade: light (mixed with white), plain, dark (mixed with black);
- shape: the best-matching shape template of the same area and centroid;
- size: area fraction (each size class has the same area for every shape);
- position: centre of the robust bounding box, on a 3 × 3 grid;
- background: luminance of the border.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Base colours, chosen so their hues are ≥ 45° apart: hue alone names the colour after blur.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (230, 210, 20),
    "green": (30, 170, 40),
    "cyan": (20, 190, 200),
    "blue": (30, 60, 220),
    "purple": (150, 40, 200),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

SHADES: tuple[str, ...] = ("light", "plain", "dark")
# Fraction of white (light) or black (dark) mixed into the base colour; hue is unchanged.
SHADE_MIX = 0.5

SIZES: tuple[str, ...] = ("small", "medium", "large")
# Foreground area as a fraction of the image; equal across shapes so area alone gives the size.
SIZE_AREA: dict[str, float] = {"small": 0.045, "medium": 0.10, "large": 0.18}
# Distance of an off-centre position from the image centre (fraction of the side); large shapes
# sit closer to the centre so they stay inside the frame.
SIZE_OFFSET: dict[str, float] = {"small": 0.27, "medium": 0.22, "large": 0.16}

HORIZONTAL: tuple[str, ...] = ("left", "center", "right")
VERTICAL: tuple[str, ...] = ("top", "middle", "bottom")

BACKGROUNDS: dict[str, int] = {"white": 240, "gray": 128, "black": 20}

DEFAULT_SIZE = 32

# Vertical offset of the triangle's centroid below its bounding-box centre, over its height.
_TRIANGLE_ASYMMETRY = 1.0 / 6.0


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt asks for; None means the prompt leaves the attribute open."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    shade: str | None = None
    horizontal: str | None = None
    vertical: str | None = None
    background: str | None = None

    def specified(self) -> dict[str, str]:
        """The attributes the prompt names."""
        return {k: v for k, v in asdict(self).items() if v is not None}


ATTRIBUTES: tuple[str, ...] = tuple(f.name for f in fields(SceneSpec))


@dataclass(frozen=True)
class Scene:
    """A fully resolved scene with the continuous values the renderer draws."""

    spec: SceneSpec  # every attribute set
    rgb: tuple[float, float, float]  # foreground colour after shade and jitter, 0–255
    background_level: float  # grey level of the background, 0–255
    area: float  # foreground area fraction
    cx: float  # bounding-box centre, fraction of the width
    cy: float  # bounding-box centre, fraction of the height


# ---------------------------------------------------------------------------------------------
# Grammar
# ---------------------------------------------------------------------------------------------


def _position_phrase(horizontal: str | None, vertical: str | None) -> str | None:
    if horizontal is None and vertical is None:
        return None
    if horizontal == "center" and vertical == "middle":
        return "in the center"
    if vertical is None or vertical == "middle":
        if horizontal == "center":
            return "in the center"
        return f"on the {horizontal}"
    if horizontal is None or horizontal == "center":
        return f"at the {vertical}"
    return f"at the {vertical} {horizontal}"


def format_prompt(spec: SceneSpec) -> str:
    """Prompt text for a spec: "a small dark blue square on the left on a black background"."""
    words: list[str] = []
    for attr in (spec.size, spec.shade if spec.shade != "plain" else None, spec.colour):
        if attr is not None:
            words.append(attr)
    words.append(spec.shape or "shape")
    article = "an" if words[0][0] in "aeiou" else "a"
    text = " ".join([article, *words])
    position = _position_phrase(spec.horizontal, spec.vertical)
    if position is not None:
        text += " " + position
    if spec.background is not None:
        text += f" on a {spec.background} background"
    return text


_SYNONYMS = {"grey": "gray", "centre": "center", "violet": "purple", "plus": "cross"}


def parse_prompt(text: str) -> SceneSpec:
    """Attributes named by a prompt of the toy grammar; unknown words are ignored."""
    words = [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]
    found: dict[str, str] = {}
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if word in BACKGROUNDS and nxt == "background":
            found["background"] = word
        elif word in SHAPES:
            found["shape"] = word
        elif word in PALETTE:
            found["colour"] = word
        elif word in SIZES:
            found["size"] = word
        elif word in ("light", "dark"):
            found["shade"] = word
        elif word in ("left", "right"):
            found["horizontal"] = word
        elif word in ("top", "bottom"):
            found["vertical"] = word
        elif word in ("center", "middle"):
            # "in the center" alone means the centre of the image; "top center" only horizontal.
            found.setdefault("horizontal", "center")
            if not any(w in ("top", "bottom") for w in words):
                found.setdefault("vertical", "middle")
    if found.get("shade") is None and "colour" in found:
        found["shade"] = "plain"
    return SceneSpec(**found)


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order."""
    words = ["a", "an", "on", "the", "in", "at", "background", "shape"]
    words += list(SIZES) + ["light", "dark"] + list(COLOURS) + list(SHAPES)
    words += ["left", "right", "top", "bottom", "center"] + list(BACKGROUNDS)
    return list(dict.fromkeys(words))


# Chance that a sampled prompt names each attribute: shape and colour almost always, so most
# prompts are judgeable on the two attributes the quality tests check.
_MENTION_PROB: dict[str, float] = {
    "shape": 0.95,
    "colour": 0.95,
    "size": 0.6,
    "shade": 0.4,
    "position": 0.5,
    "background": 0.4,
}


def sample_spec(rng: np.random.Generator, mention: dict[str, float] | None = None) -> SceneSpec:
    """A random prompt spec; `mention` overrides the chance of naming each attribute."""
    prob = {**_MENTION_PROB, **(mention or {})}

    def pick(key: str, options: tuple[str, ...]) -> str | None:
        named = rng.random() < prob[key]
        value = str(options[rng.integers(len(options))])
        return value if named else None

    shape = pick("shape", SHAPES)
    colour = pick("colour", COLOURS)
    size = pick("size", SIZES)
    shade = pick("shade", ("light", "dark"))
    if colour is None:
        shade = None  # "a light shape" is not in the grammar
    elif shade is None:
        shade = "plain"
    horizontal = vertical = None
    if rng.random() < prob["position"]:
        horizontal = str(HORIZONTAL[rng.integers(3)])
        vertical = str(VERTICAL[rng.integers(3)])
        # Round-trip through the phrase so the spec equals what parsing the prompt gives.
        phrase = _position_phrase(horizontal, vertical)
        parsed = parse_prompt(f"a shape {phrase}")
        horizontal, vertical = parsed.horizontal, parsed.vertical
    background = pick("background", tuple(BACKGROUNDS))
    return SceneSpec(shape, colour, size, shade, horizontal, vertical, background)


def sample_prompts(n: int, seed: int = 0, mention: dict[str, float] | None = None) -> list[str]:
    """`n` prompts of the grammar, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [format_prompt(sample_spec(rng, mention)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------------------------


def resolve(spec: SceneSpec, rng: np.random.Generator) -> Scene:
    """Fill the open attributes at random and draw the jittered continuous values."""

    def choose(value: str | None, options: tuple[str, ...]) -> str:
        return value if value is not None else str(options[rng.integers(len(options))])

    # The draws keep this order (the random stream decides every scene of a seed).
    shape = choose(spec.shape, SHAPES)
    colour, size = choose(spec.colour, COLOURS), choose(spec.size, SIZES)
    shade = choose(spec.shade, SHADES)
    horizontal, vertical = choose(spec.horizontal, HORIZONTAL), choose(spec.vertical, VERTICAL)
    background = choose(spec.background, tuple(BACKGROUNDS))
    full = SceneSpec(
        shape=shape,
        colour=colour,
        size=size,
        shade=shade,
        horizontal=horizontal,
        vertical=vertical,
        background=background,
    )
    base = np.asarray(PALETTE[colour], dtype=np.float64) + rng.uniform(-12, 12, 3)
    base = np.clip(base, 0, 255)
    if full.shade == "light":
        base = base + SHADE_MIX * (255.0 - base)
    elif full.shade == "dark":
        base = base * (1.0 - SHADE_MIX)
    area = SIZE_AREA[size] * rng.uniform(0.88, 1.12)
    offset = SIZE_OFFSET[size]
    cx = 0.5 + offset * (HORIZONTAL.index(horizontal) - 1) + rng.uniform(-0.025, 0.025)
    cy = 0.5 + offset * (VERTICAL.index(vertical) - 1) + rng.uniform(-0.025, 0.025)
    bg = BACKGROUNDS[background] + rng.uniform(-10, 10)
    rgb = (float(base[0]), float(base[1]), float(base[2]))
    return Scene(spec=full, rgb=rgb, background_level=bg, area=area, cx=cx, cy=cy)


def shape_coverage(shape: str, area: float, cx: float, cy: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape with its bounding box centred at (cx, cy).

    Sizes are areas (fractions of the image), so each shape's extent follows from its formula.
    """
    ss = 4  # supersampling factor per axis
    coords = (np.arange(size * ss) + 0.5) / (size * ss)
    u = coords[None, :] - cx  # (1, S): horizontal offset, fraction of the side
    v = coords[:, None] - cy  # (S, 1): vertical offset, positive downwards
    if shape == "circle":
        r = math.sqrt(area / math.pi)
        inside = u**2 + v**2 <= r**2
    elif shape == "square":
        half = math.sqrt(area) / 2
        inside = (np.abs(u) <= half) & (np.abs(v) <= half)
    elif shape == "triangle":
        side = math.sqrt(4 * area / math.sqrt(3))
        height = side * math.sqrt(3) / 2
        # Apex up: the half-width grows linearly from 0 at the apex to side/2 at the base.
        depth = (v + height / 2) / height  # 0 at the apex, 1 at the base
        inside = (depth >= 0) & (depth <= 1) & (np.abs(u) <= depth * side / 2)
    elif shape == "cross":
        span = math.sqrt(9 * area / 5)  # arms one third of the span wide: area = 5/9 · span²
        half, arm = span / 2, span / 6
        inside = ((np.abs(u) <= arm) & (np.abs(v) <= half)) | (
            (np.abs(v) <= arm) & (np.abs(u) <= half)
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")
    inside = np.broadcast_to(inside, (size * ss, size * ss)).astype(np.float64)
    # (S·ss, S·ss) -> (S, ss, S, ss) -> mean over the supersamples -> (S, S)
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3))


def render_scene(scene: Scene, size: int = DEFAULT_SIZE) -> np.ndarray:
    """RGB uint8 image (size, size, 3) of a resolved scene."""
    cover = shape_coverage(scene.spec.shape or "", scene.area, scene.cx, scene.cy, size)
    fg = np.asarray(scene.rgb, dtype=np.float64)  # (3,)
    bg = np.full(3, scene.background_level)  # (3,)
    img = cover[..., None] * fg + (1.0 - cover[..., None]) * bg  # (S, S, 3)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(
    spec: SceneSpec | str,
    rng: np.random.Generator | int | None = None,
    size: int = DEFAULT_SIZE,
) -> np.ndarray:
    """RGB uint8 image (size, size, 3) for a spec or prompt; `rng` fills what it leaves open."""
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return render_scene(resolve(spec, rng), size)


def render_batch(prompts: list[str], seed: int = 0, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Images (N, size, size, 3) uint8 for prompts, one seeded generator for the batch."""
    rng = np.random.default_rng(seed)
    return np.stack([render(p, rng, size) for p in prompts])


# ---------------------------------------------------------------------------------------------
# Extractors
# ---------------------------------------------------------------------------------------------

_MIN_CHROMA = 25.0  # below this nothing counts as foreground (noise on a neutral background)


def _chroma(image: np.ndarray) -> np.ndarray:
    img = image.astype(np.float64)
    return img.max(axis=-1) - img.min(axis=-1)  # (H, W)


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of the foreground shape: the largest blob of coloured pixels.

    Backgrounds are neutral, so chroma separates the shape; the threshold is half the shape's
    own chroma so blurred edges split evenly and the mask keeps the drawn area.
    """
    chroma = _chroma(image)
    peak = float(np.percentile(chroma, 99.5))
    if peak < 2 * _MIN_CHROMA:
        return np.zeros(chroma.shape, dtype=bool)
    mask = chroma >= max(_MIN_CHROMA, 0.5 * peak)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    return mask


def _core_pixels(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Foreground pixels (N, 3) away from the blurred edge: the more saturated half."""
    pixels = image[mask].astype(np.float64)
    chroma = pixels.max(axis=1) - pixels.min(axis=1)
    return pixels[chroma >= np.median(chroma)]


def _hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of colours (..., 3), via the opponent-colour plane."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    alpha = r - 0.5 * (g + b)
    beta = math.sqrt(3) / 2 * (g - b)
    return np.degrees(np.arctan2(beta, alpha)) % 360.0


PALETTE_HUES: dict[str, float] = {
    name: float(_hue_degrees(np.asarray(rgb, float))) for name, rgb in PALETTE.items()
}


def hue_distance(a: float, b: float) -> float:
    """Angular distance in degrees (0–180) between two hues."""
    return abs((a - b + 180.0) % 360.0 - 180.0)


def extract_hue(image: np.ndarray) -> float | None:
    """Hue in degrees of the foreground's core, or None without a foreground."""
    mask = foreground_mask(image)
    if not mask.any():
        return None
    core = _core_pixels(image, mask)
    # Average in the opponent plane (a chroma-weighted circular mean), then take the hue.
    return float(_hue_degrees(core.mean(axis=0)))


def extract_colour(image: np.ndarray) -> str | None:
    """Palette colour nearest in hue to the foreground, or None without a foreground."""
    hue = extract_hue(image)
    if hue is None:
        return None
    dist = {c: hue_distance(hue, h) for c, h in PALETTE_HUES.items()}
    return min(dist, key=dist.__getitem__)


def extract_shade(image: np.ndarray) -> str | None:
    """light / plain / dark from the brightest and dimmest channel of the foreground core."""
    mask = foreground_mask(image)
    if not mask.any():
        return None
    mean = _core_pixels(image, mask).mean(axis=0)
    # Plain palette colours have max ≥ 158 and min ≤ 72; mixing with black halves the max (≤ 121),
    # mixing with white lifts the min above 127.
    if mean.max() < 140:
        return "dark"
    if mean.min() > 90:
        return "light"
    return "plain"


def extract_area_fraction(image: np.ndarray) -> float:
    """Foreground area as a fraction of the image."""
    mask = foreground_mask(image)
    return float(mask.mean())


def extract_size(image: np.ndarray) -> str | None:
    """Size class nearest (in log area) to the foreground area."""
    area = extract_area_fraction(image)
    if area <= 0:
        return None
    return min(SIZES, key=lambda s: abs(math.log(area / SIZE_AREA[s])))


def extract_centroid(image: np.ndarray) -> tuple[float, float] | None:
    """Centre of mass (x, y) of the foreground, as fractions of width and height."""
    mask = foreground_mask(image)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (float(xs.mean() + 0.5) / w, float(ys.mean() + 0.5) / h)


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) in pixel units, edges inclusive of the border pixels."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


# Half-width of the middle cell of the position grid (fraction of the side): large shapes sit
# 0.16 from the centre, so the split lies halfway between that and the centre.
POSITION_SPLIT = 0.08
# Centre of each grid cell along its axis (fraction of the side): the middle of
# [0, 0.5 − split], [0.5 − split, 0.5 + split] and [0.5 + split, 1].
CELL_CENTRES: tuple[float, float, float] = (
    (0.5 - POSITION_SPLIT) / 2,
    0.5,
    (1.5 + POSITION_SPLIT) / 2,
)


def extract_box_centre(image: np.ndarray) -> tuple[float, float] | None:
    """Centre (x, y) of the foreground's bounding box, as fractions of width and height."""
    mask = foreground_mask(image)
    if not mask.any():
        return None
    x0, y0, x1, y1 = _box(mask)
    h, w = mask.shape
    return (x0 + x1) / 2 / w, (y0 + y1) / 2 / h


def position_cell(c: float, names: tuple[str, ...]) -> str:
    """The grid cell name (from HORIZONTAL or VERTICAL) of a coordinate along that axis."""
    return (
        names[0] if c < 0.5 - POSITION_SPLIT else names[2] if c > 0.5 + POSITION_SPLIT else names[1]
    )


def extract_position(image: np.ndarray) -> tuple[str, str] | None:
    """(horizontal, vertical) grid cell of the foreground's bounding-box centre."""
    centre = extract_box_centre(image)
    if centre is None:
        return None
    return position_cell(centre[0], HORIZONTAL), position_cell(centre[1], VERTICAL)


def foreground_alpha(image: np.ndarray) -> np.ndarray:
    """Soft coverage (H, W) in [0, 1] of the foreground: chroma over the shape's own chroma."""
    mask = foreground_mask(image)
    if not mask.any():
        return np.zeros(mask.shape)
    chroma = _chroma(image)
    full = float(np.median(chroma[mask][chroma[mask] >= np.median(chroma[mask])]))
    alpha = np.clip(chroma / full, 0.0, 1.0)
    # Keep the blurred rim of the shape, drop coloured specks elsewhere.
    near = ndimage.binary_dilation(mask, iterations=2)
    return alpha * near


def shape_scores(image: np.ndarray) -> dict[str, float]:
    """Mean absolute difference between the soft foreground and each shape's template.

    Each template has the foreground's area and centroid, so the shape is the only difference;
    this stays reliable on blurred, noisy, small shapes where bounding-box fill ratios do not.
    """
    alpha = foreground_alpha(image)  # (H, W)
    h, w = alpha.shape
    area = float(alpha.sum()) / (h * w)
    if area <= 0:
        return {}
    ys, xs = np.mgrid[0:h, 0:w]
    cx = float((alpha * (xs + 0.5)).sum() / alpha.sum()) / w
    cy = float((alpha * (ys + 0.5)).sum() / alpha.sum()) / h
    scores: dict[str, float] = {}
    for shape in SHAPES:
        box_cy = cy
        if shape == "triangle":
            height = math.sqrt(4 * area / math.sqrt(3)) * math.sqrt(3) / 2
            box_cy = cy - _TRIANGLE_ASYMMETRY * height  # centroid lies below the box centre
        template = shape_coverage(shape, area, cx, box_cy, h)
        scores[shape] = float(np.abs(alpha - template).mean())
    return scores


def extract_shape(image: np.ndarray) -> str | None:
    """The shape whose template best matches the foreground, or None without a foreground."""
    scores = shape_scores(image)
    if not scores:
        return None
    return min(scores, key=scores.__getitem__)


def extract_background(image: np.ndarray) -> str:
    """Background name nearest to the median grey level of the image border."""
    img = image.astype(np.float64).mean(axis=-1)  # (H, W) grey level
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    level = float(np.median(border))
    return min(BACKGROUNDS, key=lambda b: abs(BACKGROUNDS[b] - level))


def describe(image: np.ndarray) -> SceneSpec:
    """Every attribute read back from the pixels (None where there is no foreground)."""
    position = extract_position(image)
    return SceneSpec(
        shape=extract_shape(image),
        colour=extract_colour(image),
        size=extract_size(image),
        shade=extract_shade(image),
        horizontal=position[0] if position else None,
        vertical=position[1] if position else None,
        background=extract_background(image),
    )


def attribute_matches(spec: SceneSpec | str, image: np.ndarray) -> dict[str, bool]:
    """For each attribute the prompt names, whether the image shows it."""
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    seen = describe(image)
    return {k: getattr(seen, k) == v for k, v in spec.specified().items()}


def prompt_alignment(spec: SceneSpec | str, image: np.ndarray) -> float:
    """Fraction of the prompt's named attributes the image shows (1.0 when it names none)."""
    matches = attribute_matches(spec, image)
    return sum(matches.values()) / len(matches) if matches else 1.0


def degrade(
    image: np.ndarray, rng: np.random.Generator, blur: float = 0.7, noise: float = 8.0
) -> np.ndarray:
    """The image blurred and noised like a small diffusion model's output (for robustness tests)."""
    img = image.astype(np.float64)
    img = ndimage.gaussian_filter(img, sigma=(blur, blur, 0))
    img = img + rng.normal(0.0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "CELL_CENTRES",
    "COLOURS",
    "DEFAULT_SIZE",
    "HORIZONTAL",
    "PALETTE",
    "PALETTE_HUES",
    "POSITION_SPLIT",
    "SHADES",
    "SHAPES",
    "SIZES",
    "Scene",
    "SceneSpec",
    "VERTICAL",
    "attribute_matches",
    "degrade",
    "describe",
    "extract_area_fraction",
    "extract_background",
    "extract_box_centre",
    "extract_centroid",
    "extract_colour",
    "extract_hue",
    "extract_position",
    "extract_shade",
    "extract_shape",
    "extract_size",
    "foreground_mask",
    "format_prompt",
    "hue_distance",
    "parse_prompt",
    "position_cell",
    "prompt_alignment",
    "render",
    "render_batch",
    "render_scene",
    "resolve",
    "sample_prompts",
    "sample_spec",
    "shape_coverage",
    "foreground_alpha",
    "shape_scores",
    "vocabulary",
]
