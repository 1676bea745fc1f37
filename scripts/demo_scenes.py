"""The demo model's world: scenes of coloured shapes, their captions, renderings and scores.

Training draws random scenes and renders them on the fly; evaluation draws scenes whose
attribute combination training never saw (``is_held_out``) and scores generated images
against them with plain pixel statistics, so no learned judge is involved.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (250, 140, 10),
    "yellow": (245, 220, 40),
    "green": (40, 175, 65),
    "blue": (40, 85, 230),
    "purple": (145, 55, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SIZES = ("small", "", "large")  # "" is the unnamed, medium size
POSITIONS = (
    "", "top left", "top right", "bottom left", "bottom right", "center", "top", "bottom", "left", "right"
)
# Shape side as a fraction of the image side, by size; several shapes are never large.
_SIDE_FRACTION = {"small": 0.2, "": 0.3, "large": 0.5}
# Where a named position puts a shape's centre, as fractions of the image side.
_POSITION_CENTRE = {
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75), "center": (0.5, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
    "left": (0.25, 0.5), "right": (0.75, 0.5),
}
_POSITION_PHRASE = {"center": "in the center", "left": "on the left", "right": "on the right"}

VOCABULARY = sorted(
    {"a", "at", "the", "in", "on", "background"}
    | set(COLOURS) | set(BACKGROUNDS) | set(COUNT_WORDS.values())
    | set(SHAPES) | {shape + "s" for shape in SHAPES}
    | {word for size in SIZES for word in size.split()}
    | {word for position in POSITIONS for word in position.split()}
)


# Words people use for what the demo draws, and the word of VOCABULARY each one means. The demo's
# tokenizer rewrites them (and drops any other word) before its text encoder sees the prompt.
SYNONYMS = {
    "big": "large", "huge": "large", "giant": "large", "enormous": "large",
    "little": "small", "tiny": "small", "mini": "small",
    "centre": "center", "middle": "center", "central": "center", "centered": "center", "centred": "center",
    "upper": "top", "lower": "bottom",
    "grey": "gray", "violet": "purple", "golden": "yellow", "gold": "yellow", "crimson": "red", "scarlet": "red",
    "navy": "blue",
    "dot": "circle", "dots": "circles", "disc": "circle", "discs": "circles", "disk": "circle", "disks": "circles",
    "ball": "circle", "balls": "circles", "box": "square", "boxes": "squares",
    "backdrop": "background", "an": "a", "single": "one", "1": "one", "2": "two", "3": "three",
}


# Words that say nothing about a picture the demo draws; people type them anyway.
FILLER_WORDS = (
    "picture", "of", "shiny", "bright", "simple", "cute", "nice", "please", "flat", "drawing", "image",
    "very", "with", "solid", "plain", "lovely", "pretty", "showing",
)


@dataclass(frozen=True)
class Scene:
    """What one picture shows: ``count`` shapes of one kind, colour and size on a plain background."""

    colour: str
    shape: str
    count: int
    size: str
    position: str
    background: str

    def caption(self, short_forms: np.random.Generator | None = None) -> str:
        """The scene in words. With ``short_forms`` the caption sometimes says "a" for one and
        leaves out a white background, as people do; without, it is the one canonical phrase."""
        shorten = short_forms is not None
        count = "a" if self.count == 1 and shorten and short_forms.random() < 0.5 else COUNT_WORDS[self.count]
        words = [count, self.size, self.colour, self.shape + ("s" if self.count > 1 else "")]
        if self.position:
            words.append(_POSITION_PHRASE.get(self.position, "at the " + self.position))
        if not (self.background == "white" and shorten and short_forms.random() < 0.3):
            words.append(f"on a {self.background} background")
        return " ".join(word for word in words if word)

    def everyday_caption(self, rng: np.random.Generator) -> str:
        """The scene as a newcomer might type it: the canonical caption with, half the time, a
        synonym (SYNONYMS) for each word that has one, one to three FILLER_WORDS at random places,
        a capital and punctuation."""
        words = []
        for word in self.caption().split():
            synonyms = [synonym for synonym, meaning in SYNONYMS.items() if meaning == word]
            words.append(str(rng.choice(synonyms)) if synonyms and rng.random() < 0.5 else word)
        for filler in rng.choice(FILLER_WORDS, size=int(rng.integers(1, 4)), replace=False):
            words.insert(int(rng.integers(0, len(words) + 1)), str(filler))
        return " ".join(words).capitalize() + str(rng.choice(["", ".", "!", ", please"]))

    def is_held_out(self) -> bool:
        """One attribute combination in ten is kept out of training, for evaluation only."""
        key = f"{self.colour}|{self.shape}|{self.count}|{self.size}|{self.position}|{self.background}"
        return zlib.crc32(key.encode()) % 10 == 0


def random_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.integers(1, 4))
    return Scene(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        count=count,
        size=str(rng.choice(SIZES if count == 1 else SIZES[:2])),
        position=str(rng.choice(POSITIONS)) if count == 1 else "",
        background=str(rng.choice(list(BACKGROUNDS))),
    )


def training_scene(rng: np.random.Generator) -> Scene:
    while (scene := random_scene(rng)).is_held_out():
        pass
    return scene


def held_out_scenes(number: int, seed: int = 1234) -> list[Scene]:
    """``number`` distinct scenes that training never shows, the same for a given seed."""
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    while len(scenes) < number:
        scene = random_scene(rng)
        if scene.is_held_out() and scene not in scenes:
            scenes.append(scene)
    return scenes


def render(scene: Scene, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Draw ``scene`` at ``size`` x ``size``; ``rng`` jitters where the shapes go."""
    scale = 2  # draw at twice the size and shrink, for anti-aliased edges
    canvas = size * scale
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    # Several shapes are drawn a little smaller, so that they fit side by side.
    side = _SIDE_FRACTION[scene.size] * canvas * rng.uniform(0.9, 1.1) * (0.8 if scene.count > 1 else 1.0)
    for x, y in _centres(scene, rng, side, canvas):
        box = (x - side / 2, y - side / 2, x + side / 2, y + side / 2)
        colour = COLOURS[scene.colour]
        if scene.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif scene.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    return image.resize((size, size), Image.Resampling.BOX)


def _centres(scene: Scene, rng: np.random.Generator, side: float, canvas: int) -> list[tuple[float, float]]:
    low, high = side / 2 + 1, canvas - side / 2 - 1
    if scene.position:
        fx, fy = _POSITION_CENTRE[scene.position]
        jitter = canvas * 0.05
        return [tuple(float(np.clip(f * canvas + rng.uniform(-jitter, jitter), low, high)) for f in (fx, fy))]
    for _ in range(100):  # rejection sampling of non-overlapping places, bounded
        centres: list[tuple[float, float]] = []
        for _ in range(20):
            x, y = rng.uniform(low, high, size=2)
            if all(max(abs(x - cx), abs(y - cy)) > side * 1.15 for cx, cy in centres):
                centres.append((float(x), float(y)))
                if len(centres) == scene.count:
                    return centres
    raise RuntimeError(f"no room for {scene.count} shapes of side {side:.0f}")


@dataclass(frozen=True)
class SceneScore:
    """What an image got right about a scene, read from its pixels."""

    background: str
    colour: str
    shape: str
    count: int

    def matches(self, scene: Scene) -> dict[str, bool]:
        return {
            "colour": self.colour == scene.colour,
            "shape": self.shape == scene.shape,
            "background": self.background == scene.background,
            "count": self.count == scene.count,
        }


def _nearest_named_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS) + list(BACKGROUNDS)
    table = np.array([*COLOURS.values(), *BACKGROUNDS.values()], dtype=np.float32)
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def score(image: Image.Image) -> SceneScore:
    """Read background, foreground colour, shape and count from an image's pixels.

    The background is the median of the border; the foreground is every pixel far from it.
    The shape comes from how much of its bounding box the largest blob fills: a square
    about all of it, a circle pi/4, a triangle half.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    foreground = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2)) > 80
    blobs = [blob for blob in _blobs(foreground) if len(blob[0]) >= 0.002 * height * width]
    if not blobs:
        return SceneScore(_nearest_named_colour(background_rgb), "none", "none", 0)
    colour = _nearest_named_colour(np.median(pixels[foreground], axis=0))
    rows, columns = max(blobs, key=lambda blob: len(blob[0]))
    fill = len(rows) / ((rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1))
    shape = "square" if fill > 0.88 else "circle" if fill > 0.63 else "triangle"
    return SceneScore(_nearest_named_colour(background_rgb), colour, shape, len(blobs))


def _blobs(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 4-connected components of ``mask``, each as (rows, columns) arrays."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    blobs = []
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label = len(blobs) + 1
        labels[start] = label
        stack, members = [start], []
        while stack:
            r, c = stack.pop()
            members.append((r, c))
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not labels[nr, nc]:
                    labels[nr, nc] = label
                    stack.append((nr, nc))
        rows, columns = np.array(members).T
        blobs.append((rows, columns))
    return blobs


def accuracy(images: list[Image.Image], scenes: list[Scene]) -> dict[str, float]:
    """The fraction of images that got each attribute of their scene right."""
    results = [score(image).matches(scene) for image, scene in zip(images, scenes, strict=True)]
    return {key: sum(result[key] for result in results) / len(results) for key in results[0]}
