"""The binding task: scenes where the question must be read to find the object, the pointing game's
baselines, and the Token Activation Map kind."""
import random

import numpy as np
import pytest

from minicpmv_attn.demo.scenes import (BINDING_COLORS, BINDING_SHAPES, BINDING_WORDS, WORDS, default_example,
                                       make_binding_scene, make_task_scene, scenes, task_words)


def test_binding_scenes_colour_every_object_and_name_one():
    a, b = scenes(4, 60, "binding"), scenes(4, 60, "binding")
    assert [s.question for s in a] == [s.question for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    counts, kinds = set(), set()
    for s in a:
        counts.add(len(s.objects))
        shapes, colors = [o.shape for o in s.objects], [o.color for o in s.objects]
        assert len(set(shapes)) == len(shapes) and len(set(colors)) == len(colors)
        assert set(colors) <= set(BINDING_COLORS) and set(shapes) <= set(BINDING_SHAPES)
        t = s.objects[s.target]
        if s.answer == t.color:
            kinds.add("color")
            assert s.question == f"What color is the {t.shape}?"
        else:
            kinds.add("shape")
            assert (s.answer, s.question) == (t.shape, f"What shape is the {t.color} object?")
        # every object is drawn in its own colour where its box says (the box centre is inside every shape)
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert tuple(np.asarray(s.image)[int((y0 + y1) / 2), int((x0 + x1) / 2)]) == BINDING_COLORS[o.color]
        # the question's words are all in the task's vocabulary, and the answer is one word of it
        assert set(s.question.rstrip("?").split()) | {s.answer} <= set(BINDING_WORDS)
    assert counts == {3, 4, 5} and kinds == {"color", "shape"}
    assert set(WORDS) < set(task_words("binding")) and task_words("single") == WORDS
    assert make_binding_scene(random.Random(1), n_objects=2, question="shape").answer in BINDING_SHAPES
    with pytest.raises(ValueError, match="task must be one of"):
        make_task_scene(random.Random(0), "bind")
    with pytest.raises(ValueError, match="n_objects must be 1..5"):
        make_binding_scene(random.Random(0), n_objects=6)
    image, question, answer, box = default_example(0, "binding")
    assert image.size == (224, 112) and answer in set(BINDING_COLORS) | set(BINDING_SHAPES)


def test_single_task_scenes_did_not_change():
    """The single task's stream is the one the shipped model was trained and scored on."""
    s = scenes(3, 5)
    assert [x.question for x in s] == [x.question for x in scenes(3, 5, "single")]
    assert all(o.color == "gray" for x in s for i, o in enumerate(x.objects) if i != x.target)
