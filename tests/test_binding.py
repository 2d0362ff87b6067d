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


def test_binding_objects_have_a_dark_outline_and_nothing_else_is_dark():
    """Binding objects are drawn with a black border (shape edges that do not depend on the fill colour);
    every outline pixel lies inside an object's box, and every object has one."""
    from minicpmv_attn.demo.scenes import BINDING_OUTLINE, OUTLINE

    assert BINDING_OUTLINE >= 1
    for s in scenes(9, 12, "binding"):
        px = np.asarray(s.image)
        dark = np.all(px == np.array(OUTLINE, dtype=px.dtype), axis=-1)
        inside_any = np.zeros_like(dark)
        for o in s.objects:
            x0, y0, x1, y1 = (int(v) for v in o.box)
            assert dark[y0:y1, x0:x1].sum() >= 2 * (x1 - x0), (o.shape, o.box)  # a border, not a speck
            inside_any[y0:y1, x0:x1] = True
        assert not (dark & ~inside_any).any()


def test_single_task_scenes_did_not_change():
    """The single task's stream is the one the shipped model was trained and scored on."""
    s = scenes(3, 5)
    assert [x.question for x in s] == [x.question for x in scenes(3, 5, "single")]
    assert all(o.color == "gray" for x in s for i, o in enumerate(x.objects) if i != x.target)


# ---------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------
from minicpmv_attn.demo import baselines as bl  # noqa: E402
from minicpmv_attn.demo.pointing import inside, peak  # noqa: E402


def _saliency_rate(task, seed=1, n=200):
    return np.mean([inside(peak(bl.saliency_map(s.image)), s.target_box) for s in scenes(seed, n, task)])


def test_saliency_alone_solves_the_single_task_but_not_binding():
    """The single task was trivial: a model-free colourfulness map finds its target; on binding scenes it
    does no better than a randomly picked object."""
    single = _saliency_rate("single")
    assert single >= 0.95, single
    binding = _saliency_rate("binding")
    random_object = np.mean([bl.random_object_rate(len(s.objects)) for s in scenes(1, 200, "binding")])
    assert binding <= random_object + 0.1, (binding, random_object)


def test_baseline_maps_and_rows():
    m = np.zeros((20, 30))
    m[5, 7] = 9.0  # one bright pixel: blurred, the peak stays on it
    assert peak(bl.box_blur(m, 2)) == (7.5, 5.5)
    assert bl.box_blur(np.ones((4, 5)), 3) == pytest.approx(np.ones((4, 5)))
    assert peak(bl.centre_map(30, 20)) == (15.0, 10.0)  # centroid of the four centre pixels
    assert bl.random_object_rate(4) == 0.25
    with pytest.raises(ValueError, match="at least one object"):
        bl.random_object_rate(0)
    toks = ["<|im_start|>", "user", "<image>", "x", "</image>", "<slice>", "x", "</slice>", "\n", "What", "</image>"]
    assert bl.before_question_row(toks, n_prompt=10) == 7  # the last end marker inside the prompt
    with pytest.raises(ValueError, match="no </image> or </slice>"):
        bl.before_question_row(["a", "b"], 2)
    with pytest.raises(ValueError, match="RGB"):
        bl.saliency_map(np.zeros((4, 4)))


# ---------------------------------------------------------------------------------------------
# Token Activation Map
# ---------------------------------------------------------------------------------------------
import torch  # noqa: E402

from minicpmv_attn.analysis import attention_map as am  # noqa: E402
from minicpmv_attn.analysis.token_activation import estimated_causal_map, rank_gaussian_filter  # noqa: E402


def test_rank_gaussian_filter_drops_a_spike_and_keeps_a_plateau():
    m = np.zeros((7, 7))
    m[3, 3] = 10.0  # an isolated spike: a rank extreme in every window
    assert rank_gaussian_filter(m).max() < 0.5
    p = np.zeros((7, 7))
    p[2:5, 2:5] = 1.0  # a plateau: its centre keeps its level
    out = rank_gaussian_filter(p)
    assert out[3, 3] == pytest.approx(1.0) and peak(out) == (3.5, 3.5)
    assert rank_gaussian_filter(m, size=1) == pytest.approx(m)
    with pytest.raises(ValueError, match="odd size"):
        rank_gaussian_filter(m, size=2)


def test_interference_removal_on_a_constructed_case():
    """Image tokens 0..5. The answer class is truly active on token 1 only; a context token whose own class
    lights token 4 strongly also drives the answer class there (interference), so the raw map peaks on the
    wrong token. Interference removal (estimated causal inference) brings the peak back to token 1."""
    V = 6
    own_ctx = np.zeros(V)
    own_ctx[4] = 5.0  # the context token's own map: token 4
    raw_answer = 0.8 * own_ctx / 5.0 * 1.5  # leak: 1.2 on token 4
    raw_answer[1] = 1.0  # the real evidence
    acts = np.zeros((2, V + 1))
    acts[0, :V], acts[1, :V] = raw_answer, own_ctx
    acts[0, V] = 3.0  # the answer class is active at the context position: its weight
    E, info = estimated_causal_map(acts, 1)
    assert np.argmax(info["raw"]) == 4 and np.argmax(E) == 1
    assert info["scale"] > 0 and info["weights"] == pytest.approx([1.0])
    # no context: the raw map, min-max normalised
    E0, _ = estimated_causal_map(acts[:1, :V], 0)
    assert E0 == pytest.approx(raw_answer / raw_answer.max())
    with pytest.raises(ValueError, match=r"\[1 \+ C, V \+ C\]"):
        estimated_causal_map(acts, 3)


def test_token_activation_through_the_lm_head_points_at_the_token_holding_the_class():
    """End to end on a constructed layout: hidden states built so that image token 2 carries the answer
    class's direction; ``token_activation`` must put its maximum there, and the kind is re-exported by
    attention_map."""
    from types import SimpleNamespace

    D, vocab = 8, 10
    lm = torch.eye(vocab, D)
    roles = ["special", "image", "image", "image", "image", "special", "text", "text", "text"]
    ids = [1, 0, 0, 0, 0, 2, 6, 7, 5]  # answer (last) = class 5; context texts 6 and 7
    hidden = torch.zeros(len(ids) - 1, D)
    hidden[3, 5] = 4.0  # image position 3 (image token index 2) carries class 5
    hidden[1, 6] = 1.0  # the context classes light other tokens a little
    hidden[4, 7] = 1.0
    layout = SimpleNamespace(n_prompt=len(ids) - 1, input_ids=ids, roles=roles)
    ta = am.token_activation(hidden, lm, layout, token=0)
    assert ta.position == 8 and ta.token_id == 5 and ta.image_positions == [1, 2, 3, 4]
    assert ta.context_positions == [6, 7] and int(np.argmax(ta.activation)) == 2
    assert am.TAM_KIND == "token activation" and callable(am.token_activation_map)
    with pytest.raises(ValueError, match="out of range"):
        am.token_activation(hidden, lm, layout, token=3)


def test_the_row_before_the_question_stays_near_random_object_level_on_binding():
    """A map made before the question is read cannot know the target: on binding scenes the best
    before-question kind stays within 0.2 (about three standard errors at n=60, and the best of the
    row-based kinds) of pointing at a random object; on the single task saliency alone hits the target."""
    from minicpmv_attn.demo import load_trained_demo
    from minicpmv_attn.demo.pointing import map_kinds, play

    model, processor = load_trained_demo()
    kinds = {k: v for k, v in map_kinds(model.config.num_hidden_layers).items()
             if getattr(v, "row_based", False)}
    res = play(model, processor, seed=12, n=60, kinds=kinds, task="binding")
    b = res.baselines
    assert set(res.before) == set(kinds) and b["before question"] == max(res.before.values())
    assert abs(b["before question"] - b["random object"]) <= 0.2, res.summary()
    assert b["centre"] <= 0.1 and b["saliency"] <= b["random object"] + 0.15, res.summary()
    single = play(model, processor, seed=12, n=10, kinds={"raw mean": kinds["raw mean"]}, task="single")
    assert single.baselines["saliency"] >= 0.95 and single.closing_line().startswith("pointing game: task single")


def test_binding_training_scenes_curriculum_and_frozen_resampler_attention():
    from minicpmv_attn.demo.train import build_processor, new_model, task_config, train_scene, train_steps

    rng = random.Random(2)
    drawn = [train_scene(rng, 0.5, "binding", 3) for _ in range(200)]
    assert {len(s.objects) for s in drawn} == {1, 2, 3}
    assert 0.4 <= np.mean([s.answer in BINDING_SHAPES for s in drawn]) <= 0.6
    cfg = task_config("binding", layers=1)
    assert cfg["vocab_size"] == 19 + 18 + len(set(BINDING_WORDS) - {"user", "assistant", "system"})
    processor = build_processor("binding")
    for freeze, keys in ((True, False), (False, False), (False, True)):
        model = new_model(0, cfg)
        d = model.resampler.attn.in_proj_weight.shape[1]
        q0, w0 = model.resampler.query.detach().clone(), model.resampler.attn.in_proj_weight.detach().clone()
        k0 = model.resampler.kv_proj.weight.detach().clone()
        train_steps(model, processor, 2, 2, 1e-3, 1, 0, task="binding", curriculum=10, freeze_resampler_qk=freeze,
                    freeze_resampler_keys=keys)
        w1 = model.resampler.attn.in_proj_weight.detach()
        assert torch.equal(model.resampler.query.detach(), q0) == (freeze or keys)
        assert torch.equal(w1[: 2 * d], w0[: 2 * d]) == (freeze or keys)
        assert torch.equal(model.resampler.kv_proj.weight.detach(), k0) == keys
        assert not torch.equal(w1[2 * d:], w0[2 * d:])  # the values always train
    with pytest.raises(ValueError, match="curriculum and single_steps must be >= 0"):
        train_steps(new_model(0, cfg), processor, 1, 1, 1e-3, 1, 0, task="binding", curriculum=-1)


def test_binding_schedule_one_object_phase_then_curriculum():
    from minicpmv_attn.demo.train import BINDING_TRAIN_MAX, max_objects_at

    caps = [max_objects_at(s, single_steps=10, curriculum=30) for s in range(50)]
    assert caps[:10] == [1] * 10 and caps[10] == 2 and caps[39] == BINDING_TRAIN_MAX - 1
    assert caps[40:] == [BINDING_TRAIN_MAX] * 10 and caps == sorted(caps)
    assert [max_objects_at(s) for s in range(3)] == [BINDING_TRAIN_MAX] * 3


def test_vision_lr_moves_only_the_siglip_tower_at_its_own_rate():
    from minicpmv_attn.demo.train import build_processor, new_model, task_config, train_steps

    cfg, processor = task_config("binding", layers=1), build_processor("binding")
    moved = {}
    for vision_lr in (None, 1e-12):
        model = new_model(0, cfg)
        v0, l0 = model.vpm.embeddings.patch_embedding.weight.detach().clone(), model.llm.lm_head.weight.detach().clone()
        train_steps(model, processor, 2, 2, 1e-3, 1, 0, task="binding", vision_lr=vision_lr)
        moved[vision_lr] = (float((model.vpm.embeddings.patch_embedding.weight.detach() - v0).abs().max()),
                            float((model.llm.lm_head.weight.detach() - l0).abs().max()))
    assert moved[None][0] > 1e-4 and moved[1e-12][0] < 1e-8  # the tower at its own rate
    assert moved[1e-12][1] > 1e-4  # the rest at lr
    with pytest.raises(ValueError, match="vision_lr must be > 0"):
        train_steps(new_model(0, cfg), processor, 1, 1, 1e-3, 1, 0, task="binding", vision_lr=0.0)


def test_resampler_probe_reads_colour_from_each_objects_own_token():
    """At init each resampler query reads its own region (about 8 patches), so an object's colour is
    decodable from the token that attends most to it; a probe on shuffled labels is not."""
    from minicpmv_attn.demo import diagnose
    from minicpmv_attn.demo.train import build_processor, new_model, task_config

    model, processor = new_model(0, task_config("binding", 1)).eval(), build_processor("binding")
    res = diagnose.resampler_probe(model, processor, n_scenes=64)
    assert res["objects"] == 256 and res["color"] >= res["chance color"] + 0.3, res
    x = np.random.default_rng(0).normal(size=(200, 8))
    assert diagnose._probe(x, np.arange(200) % 5, 5, 140) <= 0.45  # noise features: no better than guessing


def test_shape_probe_training_runs_and_reports(capsys):
    from minicpmv_attn.demo.diagnose import shape_probe_training
    from minicpmv_attn.scripts.diagnose_binding import main

    rows = shape_probe_training(5e-4, steps=2, batch=4, report_every=1)
    assert [r[0] for r in rows] == [0, 1, 2] and all(np.isfinite(r[1]) and 0 <= r[2] <= 1 for r in rows)
    assert rows[0][1] != rows[2][1]  # it trained
    assert main(["--lr-probe", "0"]) == 2 and "--lr-probe must be > 0" in capsys.readouterr().err
