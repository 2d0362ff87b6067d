"""Procedural scenes for the trained demo model: a few coloured shapes on a plain background.

Every scene holds 2 or 3 objects with distinct shapes: the *target* in one of four
colours, the others (distractors) gray, so each question has exactly one answer and one
target object:

* ``"What color is the <shape>?"`` -> the colour word (target: that shape);
* ``"Which shape is <color>?"`` -> the shape word (target: the object of that colour).

Why gray distractors: with every object coloured, answering needs *binding* (find the object
whose shape the question names, read its colour); the 2-layer demo model trained for 700-2100
steps on a 2-core CPU never learned it (held-out accuracy stayed at 0.3-0.44, what naming some
object's attribute gives). With gray distractors the answer still depends on one object only,
which the model must find among same-sized shapes: what the pointing game checks.
``colored_distractors=True`` draws the harder scenes (distinct colours for every object).

Binding scenes (``task="binding"``, ``make_binding_scene``): 3-5 objects, every one coloured,
with distinct colours and distinct shapes (five of each), so the question must be read to find
the object: ``"What color is the <shape>?"`` -> its colour, ``"What shape is the <color> object?"``
-> its shape. A saliency filter (the most colourful blob) or a map made before the question is
read hits the target only about as often as a randomly picked object.

Scenes are square (``112 x 112``, one slice) or wide / tall (``224 x 112`` / ``112 x 224``),
which the demo's processor (``scale_resolution=112``) cuts into a 2 x 1 / 1 x 2 grid plus
the overview, so the sliced path is exercised. Everything is drawn from a seeded
``random.Random``: same seed, same scene.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((112, 112), (112, 112), (224, 112), (112, 224))  # (width, height); square twice as likely
BACKGROUND = (235, 235, 235)
DISTRACTOR = (128, 128, 128)  # gray: not one of COLORS, so never an answer
OBJ_MIN, OBJ_MAX = 22, 36  # object side in pixels
QUESTION_COLOR = "What color is the {}?"
QUESTION_SHAPE = "Which shape is {}?"
# every word a question or answer uses (the word-level tokenizer's vocabulary is built from these)
WORDS = sorted({w for q in (QUESTION_COLOR, QUESTION_SHAPE) for w in q.replace("?", " ").split() if w != "{}"}
               | set(COLORS) | set(SHAPES))

# the binding task: five colours and five shapes, every object coloured
BINDING_COLORS = dict(COLORS, purple=(150, 40, 200))
BINDING_SHAPES = SHAPES + ("diamond", "cross")
BINDING_OBJECTS = (3, 4, 5)
BINDING_OBJ_MIN, BINDING_OBJ_MAX = 22, 32
BINDING_OUTLINE = 2  # px of black border on binding objects (see make_binding_scene)
OUTLINE = (20, 20, 20)
QUESTION_BIND_COLOR = "What color is the {}?"
QUESTION_BIND_SHAPE = "What shape is the {} object?"
BINDING_WORDS = sorted(set(WORDS) | {w for q in (QUESTION_BIND_COLOR, QUESTION_BIND_SHAPE)
                                     for w in q.replace("?", " ").split() if w != "{}"}
                       | set(BINDING_COLORS) | set(BINDING_SHAPES))
TASKS = ("single", "binding")

Box = Tuple[float, float, float, float]


@dataclass
class SceneObject:
    shape: str
    color: str
    box: Box  # (x0, y0, x1, y1) in pixels


@dataclass
class Scene:
    """One scene and one question about it."""

    image: Image.Image
    objects: List[SceneObject]
    question: str
    answer: str
    target: int  # index into objects

    @property
    def target_box(self) -> Box:
        return self.objects[self.target].box

    def box_share(self) -> float:
        """Area share of the target's box in the image (the pointing game's chance level)."""
        x0, y0, x1, y1 = self.target_box
        return (x1 - x0) * (y1 - y0) / float(self.image.size[0] * self.image.size[1])


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Box, rgb, outline: int = 0) -> None:
    """Fill ``shape`` in ``box`` with ``rgb``; ``outline`` > 0 adds a black border that many pixels wide."""
    x0, y0, x1, y1 = box
    line = {"outline": OUTLINE, "width": outline} if outline > 0 else {}
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb, **line)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb, **line)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2.0, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=rgb, **line)
    elif shape == "diamond":
        cx, cy = (x0 + x1 - 1) / 2.0, (y0 + y1 - 1) / 2.0
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=rgb, **line)
    elif shape == "cross":  # a plus sign, arms a third of the side thick, drawn as one outline
        xa, xb = x0 + (x1 - x0) / 3.0, x0 + 2 * (x1 - x0) / 3.0 - 1
        ya, yb = y0 + (y1 - y0) / 3.0, y0 + 2 * (y1 - y0) / 3.0 - 1
        r, b = x1 - 1, y1 - 1
        draw.polygon([(xa, y0), (xb, y0), (xb, ya), (r, ya), (r, yb), (xb, yb), (xb, b), (xa, b), (xa, yb),
                      (x0, yb), (x0, ya), (xa, ya)], fill=rgb, **line)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {BINDING_SHAPES}")


def _overlaps(a: Box, b: Box, gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def make_scene(rng: random.Random, size: Optional[Tuple[int, int]] = None, n_objects: Optional[int] = None,
               colored_distractors: bool = False) -> Scene:
    """A random scene and question from ``rng`` (a ``random.Random``); distractors gray unless
    ``colored_distractors``."""
    W, H = size if size is not None else rng.choice(SIZES)
    n = n_objects if n_objects is not None else rng.choice((2, 3))
    if not 1 <= n <= len(SHAPES):
        raise ValueError(f"n_objects must be 1..{len(SHAPES)}, got {n}")
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(sorted(COLORS), n)
    objects: List[SceneObject] = []
    for shape, color in zip(shapes, colors):
        for _ in range(200):
            s = rng.randint(OBJ_MIN, OBJ_MAX)
            x0, y0 = rng.randint(2, W - s - 2), rng.randint(2, H - s - 2)
            box = (float(x0), float(y0), float(x0 + s), float(y0 + s))
            if not any(_overlaps(box, o.box, 4) for o in objects):
                break
        else:  # cannot happen with these sizes; never return overlapping objects silently
            raise RuntimeError(f"could not place {n} non-overlapping objects on a {W} x {H} canvas")
        objects.append(SceneObject(shape, color, box))
    target = rng.randrange(n)
    if not colored_distractors:
        objects = [o if i == target else SceneObject(o.shape, "gray", o.box) for i, o in enumerate(objects)]
    image = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        _draw(draw, o.shape, o.box, COLORS.get(o.color, DISTRACTOR))
    if rng.random() < 0.5:
        question, answer = QUESTION_COLOR.format(objects[target].shape), objects[target].color
    else:
        question, answer = QUESTION_SHAPE.format(objects[target].color), objects[target].shape
    return Scene(image, objects, question, answer, target)


def _place(rng: random.Random, W: int, H: int, n: int, lo: int, hi: int) -> List[Box]:
    """``n`` non-overlapping square boxes (side ``lo..hi``, 4 px apart) on a ``W x H`` canvas."""
    for _ in range(100):  # a layout that jams is redrawn whole
        boxes: List[Box] = []
        for _ in range(n):
            for _ in range(100):
                s = rng.randint(lo, hi)
                x0, y0 = rng.randint(2, W - s - 2), rng.randint(2, H - s - 2)
                box = (float(x0), float(y0), float(x0 + s), float(y0 + s))
                if not any(_overlaps(box, b, 4) for b in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} non-overlapping objects on a {W} x {H} canvas")


def make_binding_scene(rng: random.Random, size: Optional[Tuple[int, int]] = None,
                       n_objects: Optional[int] = None, question: Optional[str] = None) -> Scene:
    """A binding scene from ``rng``: ``n_objects`` (default 3-5) objects, all coloured, distinct colours
    and shapes; ``question`` ``"color"`` / ``"shape"`` picks the question type (default: a coin flip)."""
    W, H = size if size is not None else rng.choice(SIZES)
    n = n_objects if n_objects is not None else rng.choice(BINDING_OBJECTS)
    if not 1 <= n <= len(BINDING_SHAPES):
        raise ValueError(f"n_objects must be 1..{len(BINDING_SHAPES)}, got {n}")
    if question not in (None, "color", "shape"):
        raise ValueError(f"question must be 'color', 'shape' or None, got {question!r}")
    shapes = rng.sample(BINDING_SHAPES, n)
    colors = rng.sample(sorted(BINDING_COLORS), n)
    boxes = _place(rng, W, H, n, BINDING_OBJ_MIN, BINDING_OBJ_MAX)
    objects = [SceneObject(sh, c, b) for sh, c, b in zip(shapes, colors, boxes)]
    target = rng.randrange(n)
    image = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        _draw(draw, o.shape, o.box, BINDING_COLORS[o.color], BINDING_OUTLINE)
    ask_color = rng.random() < 0.5 if question is None else question == "color"
    if ask_color:
        q, answer = QUESTION_BIND_COLOR.format(objects[target].shape), objects[target].color
    else:
        q, answer = QUESTION_BIND_SHAPE.format(objects[target].color), objects[target].shape
    return Scene(image, objects, q, answer, target)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def make_task_scene(rng: random.Random, task: str = "single", **kwargs) -> Scene:
    """A scene of ``task`` (``"single"``: ``make_scene``; ``"binding"``: ``make_binding_scene``)."""
    return (make_binding_scene if check_task(task) == "binding" else make_scene)(rng, **kwargs)


def task_words(task: str = "single") -> List[str]:
    """The words a task's questions and answers use (the word-level tokenizer's vocabulary)."""
    return BINDING_WORDS if check_task(task) == "binding" else WORDS


def scenes(seed: int, n: int, task: str = "single") -> List[Scene]:
    """``n`` scenes of ``task`` from one seed (the same list every time)."""
    rng = random.Random(seed)
    return [make_task_scene(rng, task) for _ in range(n)]


def default_scene(seed: int = 0, task: str = "single") -> Scene:
    """The main command's default scene: a wide (sliced) ``task`` scene from ``random.Random(seed)``
    (3 objects for ``"single"``, 4 for ``"binding"``)."""
    n = 4 if check_task(task) == "binding" else 3
    return make_task_scene(random.Random(seed), task, size=(224, 112), n_objects=n)


def default_example(seed: int = 0, task: str = "single"):
    """``(PIL image, question, answer, target_box)`` of ``default_scene(seed, task)``."""
    scene = default_scene(seed, task)
    return scene.image, scene.question, scene.answer, scene.target_box
