"""The pointing game: peak/inside rules, scenes, pluggable map kinds, and the command."""
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minicpmv_attn.demo import load_trained_demo
from minicpmv_attn.demo.pointing import inside, peak, play
from minicpmv_attn.demo.scenes import COLORS, SHAPES, default_example, make_scene, scenes

REPO = Path(__file__).resolve().parents[1]


def test_peak_is_the_centroid_of_the_maximum():
    m = np.zeros((10, 20))
    m[2:4, 6:10] = 1.0  # a flat maximal patch: its centre
    assert peak(m) == (8.0, 3.0)  # pixels x 6..9, y 2..3: the box [6, 10) x [2, 4)
    m[9, 19] = 2.0
    assert peak(m) == (19.5, 9.5)
    with pytest.raises(ValueError, match="NaN"):
        peak(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        peak(np.zeros(5))
    assert inside((5.0, 5.0), (5, 5, 6, 6)) and not inside((4.9, 5.0), (5, 5, 6, 6))


def test_scenes_are_seeded_and_each_answer_names_one_object():
    a, b = scenes(3, 30), scenes(3, 30)
    assert [s.question for s in a] == [s.question for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    sizes = set()
    for s in a:
        sizes.add(s.image.size)
        shapes = [o.shape for o in s.objects]
        assert len(set(shapes)) == len(shapes)
        t = s.objects[s.target]
        assert t.color in COLORS and all(o.color == "gray" for i, o in enumerate(s.objects) if i != s.target)
        assert (s.answer, s.question) in ((t.color, f"What color is the {t.shape}?"),
                                          (t.shape, f"Which shape is {t.color}?"))
        # the target is drawn where its box says: its colour fills the box's centre
        x0, y0, x1, y1 = t.box
        assert tuple(np.asarray(s.image)[int((y0 + y1) / 2), int((x0 + x1) / 2)]) == COLORS[t.color]
        assert 0 < s.box_share() < 0.2
    assert {(112, 112), (224, 112), (112, 224)} <= sizes
    hard = make_scene(random.Random(0), n_objects=3, colored_distractors=True)
    assert len({o.color for o in hard.objects}) == 3 and set(o.color for o in hard.objects) <= set(COLORS)
    assert set(SHAPES) == {"circle", "square", "triangle"}


def test_default_example_is_a_sliced_scene():
    image, question, answer, box = default_example()
    assert image.size == (224, 112) and question.endswith("?") and answer
    assert (image, question, answer, box)[1:] == default_example(0)[1:]
    _, processor = trained()
    assert processor.image_processor.get_slice_layout(image.size).grid == (2, 1)


_CACHE = {}


def trained():
    if "m" not in _CACHE:
        _CACHE["m"] = load_trained_demo()
    return _CACHE["m"]


def test_pluggable_kinds_score_exactly():
    """An oracle map (the target box lit) always hits; a map lit outside every object never does."""
    model, processor = trained()

    def oracle(ctx):
        W, H = ctx.scene.image.size
        m = np.zeros((H, W))
        x0, y0, x1, y1 = (int(v) for v in ctx.scene.target_box)
        m[y0:y1, x0:x1] = 1.0
        return m

    def corner(ctx):  # objects keep 2 px from the border: the corner pixel is background
        W, H = ctx.scene.image.size
        m = np.zeros((H, W))
        m[0, 0] = 1.0
        return m

    res = play(model, processor, seed=7, n=4, kinds={"oracle": oracle, "corner": corner})
    assert res.hits == {"oracle": 1.0, "corner": 0.0}
    rng = random.Random(7)
    assert res.chance == pytest.approx(np.mean([make_scene(rng).box_share() for _ in range(4)]))
    last = res.summary().splitlines()[-1]
    assert last.startswith("pointing game: task single, answer accuracy ") and "best map oracle 1.00;" in last
    assert "before question n/a" in last and res.baselines["saliency"] == 1.0  # one coloured object: trivial
    assert res.baselines["random object"] == pytest.approx(np.mean([1 / len(make_scene(r).objects)
                                                                    for r in [random.Random(7)] for _ in range(4)]))
    with pytest.raises(ValueError, match="shape"):
        play(model, processor, seed=7, n=1, kinds={"bad": lambda ctx: np.zeros((3, 3))})
    with pytest.raises(ValueError, match="n must be"):
        play(model, processor, n=0)


def test_command_reports_and_refuses_bad_input():
    script = str(REPO / "scripts" / "pointing_game.py")
    ok = subprocess.run([sys.executable, script, "--n", "3", "--seed", "5", "--no-relevancy"], capture_output=True, text=True,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr
    last = ok.stdout.strip().splitlines()[-1]
    assert last.startswith("pointing game: task binding, answer accuracy ") and "; best map " in last
    assert "baselines: random object " in last and ", saliency " in last and ", before question " in last
    assert ", centre " in last and last.endswith("(n=3, seed=5)")
    bad = subprocess.run([sys.executable, script, "--n", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--n must be" in bad.stderr
