"""The demo models: vocabularies that match their tokenizers, readable generated tokens, and the
shipped trained model (small, loadable, answering and pointing, reproducible training)."""
import json
import os

import pytest
import torch

from minicpmv_attn import MiniCPMV
from minicpmv_attn.demo import (build_demo_checkpoint, default_demo_folder, load_trained_demo,
                                trained_demo_folder)
from minicpmv_attn.demo.pointing import map_kinds, play
from minicpmv_attn.demo.scenes import default_example, scenes
from minicpmv_attn.demo.train import build_processor, encode_batch, new_model, train_steps
from minicpmv_attn.processing_minicpmv import MiniCPMVProcessor

MAX_BYTES = 1_500_000
# The targets: answer accuracy >= 0.95 and the best map >= 0.7 and >= 3x chance (the shipped model
# reaches 1.00 on both on these 40 scenes; 0.99 on 200 scenes of seeds 1 and 7, see the README).
ANSWER_ACCURACY = 0.95
PLAIN_MAP = 0.9  # the plain LLM -> image mean map must point too, not only a composed one


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
    image, question, answer, box = default_example()
    got = model.chat(image, [{"role": "user", "content": question}], processor.tokenizer, processor=processor,
                     sampling=False, max_new_tokens=4)
    assert got == answer


def test_answers_and_points_on_unseen_scenes(trained):
    """Answer accuracy and the pointing game on 40 scenes the training never drew (seed 123), with the
    attention map kinds (relevancy needs a backward per scene: scripts/pointing_game.py reports it)."""
    model, processor = trained
    kinds = {k: v for k, v in map_kinds(model.config.num_hidden_layers).items() if not k.startswith("relevancy")}
    res = play(model, processor, seed=123, n=40, kinds=kinds)
    assert res.answer_accuracy >= ANSWER_ACCURACY, res.summary()
    name, best = res.best
    assert best >= 0.7 and best >= 3 * res.chance, res.summary()
    assert res.hits["raw mean"] >= PLAIN_MAP and res.hits["mean+siglip"] >= PLAIN_MAP, res.summary()


def test_training_reproduces_the_logged_losses():
    """Five steps of the shipped run from its seed give the first five logged losses."""
    log = json.load(open(os.path.join(trained_demo_folder(), "train_log.json")))
    torch.manual_seed(12345)  # whatever the global state, train_steps' model and scenes come from the seed
    model, processor = new_model(log["seed"]), build_processor()
    losses = train_steps(model, processor, 5, log["batch"], log["lr"], log["warmup"], log["seed"],
                         total_steps=log.get("schedule_steps", log["steps"]), shape_share=log.get("shape_share"))
    assert losses == pytest.approx(log["losses"][:5], rel=1e-3, abs=1e-4)
    tail = log["losses"][-100:]
    assert sum(tail) / len(tail) < 0.05 * log["losses"][0]  # and the run learned


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
