"""The demo models: vocabularies that match their tokenizers, readable generated tokens, and the
shipped trained model (small, loadable, answering and pointing, reproducible training)."""
import json
import os

import pytest
import torch

from minicpmv_attn import MiniCPMV
from minicpmv_attn.demo import (build_demo_checkpoint, default_demo_folder, load_trained_demo,
                                trained_demo_folder, trained_demo_task)
from minicpmv_attn.demo.pointing import map_kinds, play
from minicpmv_attn.demo.scenes import default_example, scenes
from minicpmv_attn.demo.train import build_processor, encode_batch, new_model, task_config, train_steps
from minicpmv_attn.processing_minicpmv import MiniCPMVProcessor

MAX_BYTES = 4_000_000  # issue 24's budget: at most 4 MB of fp16 weights
# Issue 24's targets on binding scenes the training never drew (every object coloured, so the question must
# be read to find the object): answer accuracy >= 0.90, and the best map kind's hit rate >= 0.80 and at least
# 0.30 above the best baseline (random object, model-free saliency, the model's own row before the question,
# centre prior), all on the same scenes. On these 40 scenes the shipped model answers 0.97; gradient
# relevancy hits 0.93, the best attention kind (rollout+siglip) 0.70, the best baseline 0.35.
ANSWER_ACCURACY = 0.90
BEST_MAP = 0.80
ATTENTION_OVER_BASELINE = 0.25  # the attention maps alone must follow the question too
OVER_BASELINE = 0.30


@pytest.fixture(scope="module")
def trained():
    return load_trained_demo()


@pytest.fixture(scope="module")
def random_demo():
    folder = build_demo_checkpoint(default_demo_folder())
    return MiniCPMV.from_pretrained(folder).eval(), MiniCPMVProcessor.from_pretrained(folder)


def _readable(text: str) -> bool:
    return bool(text) and "\ufffd" not in text and (text.isprintable() or text.isspace())


@pytest.mark.parametrize("which", ["random", "trained"])
def test_vocab_equals_tokenizer_and_every_token_decodes(which, request):
    model, processor = request.getfixturevalue("random_demo" if which == "random" else "trained")
    tok = processor.tokenizer
    assert model.config.vocab_size == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    bad = [i for i in range(model.config.vocab_size) if not _readable(tok.decode([i]))]
    assert bad == []
    # what generation actually emits (greedy, several tokens) decodes token by token
    image, question = (default_example()[:2] if which == "trained" else (default_example()[0], "Describe."))
    inputs = processor([tok.apply_chat_template([{"role": "user", "content": "(<image>./</image>)\n" + question}],
                                                tokenize=False, add_generation_prompt=True)], [[image]])
    with torch.no_grad():
        seqs = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                              tgt_sizes=inputs["tgt_sizes"], image_bound=inputs["image_bound"],
                              attention_mask=inputs["attention_mask"], tokenizer=tok, max_new_tokens=8,
                              do_sample=False, min_new_tokens=8 if which == "random" else 0)
    ids = seqs[0].tolist()
    assert ids and all(_readable(tok.decode([i])) for i in ids), [tok.decode([i]) for i in ids]


def test_shipped_files_are_small_and_fp16():
    from safetensors import safe_open

    folder = trained_demo_folder()
    weights = os.path.join(folder, "model.safetensors")
    assert os.path.getsize(weights) <= MAX_BYTES
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert total <= MAX_BYTES + 200_000
    with safe_open(weights, framework="pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert cfg["slice_config"]["scale_resolution"] == 112 and cfg["query_num"] == 16


def test_loads_through_auto_classes_and_answers_the_default_example():
    from transformers import AutoModel, AutoProcessor

    folder = trained_demo_folder()
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(model, MiniCPMV)
    assert trained_demo_task() == "binding"
    image, question, answer, box = default_example(0, "binding")
    got = model.chat(image, [{"role": "user", "content": question}], processor.tokenizer, processor=processor,
                     sampling=False, max_new_tokens=4)
    assert got == answer


def test_answers_and_points_on_unseen_binding_scenes(trained):
    """Answer accuracy and the pointing game on 40 binding scenes the training never drew (seed 123), with
    every built-in map kind (attention, token activation, gradient relevancy), against the baselines on
    the same scenes; the plain attention kinds must beat the baselines on their own as well."""
    model, processor = trained
    res = play(model, processor, seed=123, n=40, kinds=map_kinds(model.config.num_hidden_layers), task="binding")
    assert res.answer_accuracy >= ANSWER_ACCURACY, res.summary()
    name, best = res.best
    bname, base = res.best_baseline
    assert best >= BEST_MAP and best >= base + OVER_BASELINE, res.summary()
    attention = max(v for k, v in res.hits.items() if k in res.before)  # the row-based attention kinds
    assert attention >= base + ATTENTION_OVER_BASELINE, res.summary()
    # a map that ignores the question (the row before it) does not find the target
    assert res.baselines["before question"] <= res.baselines["random object"] + 0.2, res.summary()


def test_training_reproduces_the_logged_losses():
    """Five steps of the shipped run from its logged settings give the first five logged losses."""
    log = json.load(open(os.path.join(trained_demo_folder(), "train_log.json")))
    torch.manual_seed(12345)  # whatever the global state, train_steps' model and scenes come from the seed
    task = log.get("task", "single")
    model, processor = new_model(log["seed"], task_config(task, log.get("layers", 2))), build_processor(task)
    threads = torch.get_num_threads()
    torch.set_num_threads(log["threads"])  # the logged thread count (float sums differ across counts)
    try:
        losses = train_steps(model, processor, 5, log["batch"], log["lr"], log["warmup"], log["seed"],
                             total_steps=log.get("schedule_steps", log["steps"]), shape_share=log.get("shape_share"),
                             task=task, curriculum=log.get("curriculum", 0),
                             freeze_resampler_qk=log.get("freeze_resampler_qk", False),
                             freeze_resampler_keys=log.get("freeze_resampler_keys", False),
                             single_steps=log.get("single_steps", 0), vision_lr=log.get("vision_lr"))
    finally:
        torch.set_num_threads(threads)
    assert losses == pytest.approx(log["losses"][:5], rel=1e-3, abs=1e-4)
    tail = log["losses"][-200:]
    assert sum(tail) / len(tail) < 0.2 * log["losses"][0]  # and the run learned


def test_encode_batch_labels_only_the_answer():
    processor = build_processor()
    batch = scenes(5, 3)
    enc = encode_batch(processor, batch)
    tok = processor.tokenizer
    for i, s in enumerate(batch):
        lab = [t for t in enc["labels"][i].tolist() if t != -100]
        assert tok.decode(lab) == s.answer + "<|im_end|>"
    assert (enc["attention_mask"] == (enc["data"]["input_ids"] != 0)).all()


def test_train_scene_mix_and_schedule_checks():
    import random

    from minicpmv_attn.demo.scenes import SHAPES
    from minicpmv_attn.demo.train import train_demo, train_scene

    rng = random.Random(3)
    drawn = [train_scene(rng, 0.75) for _ in range(400)]
    share = sum(s.answer in SHAPES for s in drawn) / len(drawn)
    assert 0.68 <= share <= 0.82
    assert {len(s.objects) for s in drawn} == {1, 2, 3}
    rng = random.Random(3)
    assert sum(train_scene(rng, 0.25).answer in SHAPES for _ in range(400)) / 400 <= 0.32
    with pytest.raises(ValueError, match="schedule_steps >= steps"):
        train_demo("unused", steps=10, schedule_steps=5, progress=False)
    with pytest.raises(ValueError, match=r"shape_share must be in \(0, 1\)"):
        train_steps(new_model(0), build_processor(), 1, 2, 1e-3, 1, 0, shape_share=1.5)
