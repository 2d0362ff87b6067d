"""Fine-tuning with attention losses (modeling/train/, scripts/finetune_attention.py) on the demo model."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from minicpmv_attn.analysis import attention_map as am
from minicpmv_attn.attention_record import AttentionRecord
from minicpmv_attn.demo import build_demo_checkpoint, demo_image_path
from minicpmv_attn.train.checkpoints import find_checkpoint, save_checkpoint
from minicpmv_attn.train.data import DataError, builtin_examples, encode_examples, read_jsonl, write_jsonl
from minicpmv_attn.train.figures import box_heatmap
from minicpmv_attn.train.forward import example_forward, model_inputs
from minicpmv_attn.train.loop import TrainConfig, train
from minicpmv_attn.train.losses import LossConfig, box_column_weights, box_loss, teacher_loss, teacher_maps
from minicpmv_attn.train.model import (LORA_TARGETS, add_lora, base_model, enable_checkpointing, load_model,
                                       parse_layers, peft_available)

TOL = 1e-4
needs_peft = pytest.mark.skipif(not peft_available(),
                                reason="peft is not installed (optional extra: pip install peft); LoRA path untested")


@pytest.fixture(scope="module")
def processor_and_examples(demo_cache):
    _, processor, _ = load_model()
    encoded = encode_examples(processor, builtin_examples()[:3])
    return processor, encoded


def fresh_model():
    model, _, _ = load_model()
    return model.train()


def run_cli(argv):
    from minicpmv_attn.scripts.finetune_attention import main

    return main([str(a) for a in argv])


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def test_read_jsonl_reports_and_skips_bad_lines(tmp_path):
    img = demo_image_path()
    lines = [
        json.dumps({"image": img, "prompt": "Where?", "answer": "There.", "box": [1, 2, 30, 40]}),
        "{not json",
        json.dumps({"image": img, "answer": "no prompt"}),
        json.dumps({"image": "nowhere/missing.jpg", "prompt": "p", "answer": "a"}),
        json.dumps({"image": img, "prompt": "p", "answer": "a", "box": [5, 5, 1, 1]}),
        "",
        json.dumps({"image": img, "prompt": "p", "answer": "a", "id": "x1"}),
        json.dumps({"image": img, "prompt": "q", "answer": "b", "id": "x1"}),
        json.dumps([1, 2]),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    msgs = []
    examples = read_jsonl(str(path), msgs.append)
    assert [e.line for e in examples] == [1, 7]
    assert examples[0].box == (1.0, 2.0, 30.0, 40.0) and examples[1].box is None and examples[1].id == "x1"
    text = "\n".join(msgs)
    for n, words in ((2, "not valid JSON"), (3, "missing field 'prompt'"), (4, "missing.jpg"), (5, "empty"),
                     (8, "duplicate id"), (9, "JSON object")):
        assert any(f"line {n}:" in m and words in m for m in msgs), (n, text)
    assert str(tmp_path / "nowhere" / "missing.jpg") in text  # the missing file is named, resolved
    assert len(msgs) == 6


def test_read_jsonl_nothing_valid(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{}\n")
    with pytest.raises(DataError, match="no valid examples"):
        read_jsonl(str(path), lambda m: None)
    with pytest.raises(DataError, match="not found"):
        read_jsonl(str(tmp_path / "absent.jsonl"))


def test_parse_layers():
    assert parse_layers("2:4", 4) == [2, 3]
    assert parse_layers("-2:", 4) == [2, 3]
    assert parse_layers("0,3", 4) == [0, 3]
    assert parse_layers("-1", 4) == [3]
    assert parse_layers(None, 3) == [0, 1, 2] == parse_layers("all", 3)
    for bad in ("7", "x", "5:9"):
        with pytest.raises(ValueError):
            parse_layers(bad, 4)


def test_encoded_example_layout(processor_and_examples):
    processor, encoded = processor_and_examples
    enc = encoded[0]
    ids = enc.data["input_ids"][0]
    L = ids.shape[0]
    answer = processor.tokenizer.encode(enc.example.answer, add_special_tokens=False)
    assert ids[enc.n_prompt:enc.n_prompt + len(answer)].tolist() == answer
    assert ids[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert enc.rows == list(range(enc.n_prompt - 1, L - 1))  # the rows predicting the answer
    assert (enc.labels[0, :enc.n_prompt] == -100).all() and (enc.labels[0, enc.n_prompt:] == ids[enc.n_prompt:]).all()
    # in-box fractions: the source slice covers the whole photo, so its patch fractions sum to the box area
    W, H = enc.layout.images[0].size
    x0, y0, x1, y1 = enc.example.box
    src = enc.layout.slices[0]
    h, w = src.tgt_size
    assert enc.box_frac[0].sum().item() == pytest.approx((x1 - x0) * (y1 - y0) / (W * H) * h * w, rel=1e-5)
    assert enc.box_cols.shape == (len(enc.layout.slices), 16)


# --------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------
def test_box_loss_values():
    w = torch.tensor([0.0, 0.5, 1.0, 0.5, 0.0])
    t = w / w.sum()
    kl, share = box_loss(t[None].clone(), w, eps=0.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    assert share.item() == pytest.approx(float((t * w).sum()))
    a = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2]], requires_grad=True)
    kl, share = box_loss(a, w)
    assert kl.item() > 0 and share.item() == pytest.approx(0.4)
    kl.backward()
    assert a.grad[0, 2] < a.grad[0, 1] < 0 and a.grad[0, 0] == 0  # pulled towards the in-box column


def test_box_share_equals_heatmap_mass_in_box(processor_and_examples):
    """The loss's share equals attention_map.image_heatmap's mass inside the box."""
    processor, encoded = processor_and_examples
    model = fresh_model().eval()
    enc = encoded[0]
    with torch.no_grad():
        r = example_forward(model, enc, LossConfig("box", layers=[2, 3]))
    rec, heat, share = box_heatmap(model, enc, [2, 3], processor.tokenizer)
    assert share == pytest.approx(float(r["share"]), rel=1e-4)
    # and the per-column weights are what the mapping module says the tokens see
    w = box_column_weights(enc, rec.tensors["resampler.attn"], enc.data["input_ids"].shape[1])
    g = 2  # one grid slice, checked patch by patch with attention_map's patch boxes
    sl = enc.layout.slices[g]
    res = am.resampler_query_maps(rec, 0, sl.index)  # [Q, h, w]
    boxes = am.patch_boxes(sl)
    x0, y0, x1, y1 = enc.example.box
    ov = (np.clip(np.minimum(boxes[..., 2], x1) - np.maximum(boxes[..., 0], x0), 0, None)
          * np.clip(np.minimum(boxes[..., 3], y1) - np.maximum(boxes[..., 1], y0), 0, None)
          / ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])))
    want = (res * ov).sum((-2, -1))
    a, b = sl.token_span
    np.testing.assert_allclose(w[a:b].numpy(), want, rtol=1e-5, atol=1e-7)


def _stock_reference(model, enc, layers, w):
    """LLM parameter gradients of LM loss + box KL computed with transformers' eager Qwen2."""
    from test_gradients import stock_qwen2

    ref = stock_qwen2(model)
    with torch.no_grad():
        embeds, _ = model.get_vllm_embedding(model_inputs(model, enc))
    out = ref(inputs_embeds=embeds.detach(), attention_mask=enc.attention_mask,
              position_ids=enc.data["position_ids"], labels=enc.labels, output_attentions=True)
    attn = torch.stack([out.attentions[l][0][:, enc.rows].mean(0) for l in layers])
    kl, share = box_loss(attn, w)
    (out.loss + kl).backward()
    return ref, float(share.detach())


def test_box_loss_gradients_match_stock_eager(processor_and_examples):
    _, encoded = processor_and_examples
    enc, layers = encoded[1], [1, 3]
    model = fresh_model()
    r = example_forward(model, enc, LossConfig("box", layers=layers), keep_output=True)
    r["loss"].backward()
    w = box_column_weights(enc, r["output"].resampler_attentions, enc.data["input_ids"].shape[1])
    ref, share = _stock_reference(model, enc, layers, w)
    assert share == pytest.approx(float(r["share"]), abs=TOL)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "lm_head.weight"):
        ours, theirs = model.llm.get_parameter(name).grad, ref.get_parameter(name).grad
        assert ours is not None and float(ours.abs().max()) > 0, name
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=1e-3)
    # the captured attention also reaches the vision side through the LM loss
    assert model.vpm.encoder.layers[0].self_attn.q_proj.weight.grad.abs().max() > 0


def _grads(model, enc, cfg):
    r = example_forward(model, enc, cfg)
    r["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_same_gradients(processor_and_examples):
    _, encoded = processor_and_examples
    cfg = LossConfig("box", layers=[2, 3])
    grads = []
    for on in (False, True):
        model = fresh_model()
        if on:
            enable_checkpointing(model)
            assert model.llm.model.gradient_checkpointing and model.vpm.encoder.gradient_checkpointing
        grads.append(_grads(model, encoded[0], cfg))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def _lora_model(checkpointing=False, seed=0):
    model = fresh_model()
    if checkpointing:
        enable_checkpointing(model)
    torch.manual_seed(seed)
    model = add_lora(model, r=4, alpha=8)
    with torch.no_grad():  # non-zero B so every adapter weight gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    return model.train()


@needs_peft
def test_lora_only_llm_attention_trainable():
    model = _lora_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".llm.model.layers." in n and ".self_attn." in n for n in trainable)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in trainable} == set(LORA_TARGETS)
    assert not any("vpm" in n for n in trainable)


@needs_peft
def test_lora_gradients_match_stock_eager_with_lora(processor_and_examples):
    """LoRA adapter gradients of LM + box loss equal transformers' eager Qwen2 wrapped by peft."""
    from peft import LoraConfig, get_peft_model

    _, encoded = processor_and_examples
    enc, layers = encoded[2], [2, 3]
    model = _lora_model()
    r = example_forward(model, enc, LossConfig("box", layers=layers), keep_output=True)
    r["loss"].backward()
    base = base_model(model)
    w = box_column_weights(enc, r["output"].resampler_attentions, enc.data["input_ids"].shape[1])

    from test_gradients import stock_qwen2

    ref = stock_qwen2(fresh_model())  # same demo weights, without the adapters
    ref = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS), lora_dropout=0.0))
    ours = {n.replace("base_model.model.llm.", "base_model.model."): p for n, p in model.named_parameters()
            if p.requires_grad}
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(ours[n])
        embeds, _ = base.get_vllm_embedding(model_inputs(model, enc))
    out = ref(inputs_embeds=embeds, attention_mask=enc.attention_mask, position_ids=enc.data["position_ids"],
              labels=enc.labels, output_attentions=True)
    attn = torch.stack([out.attentions[l][0][:, enc.rows].mean(0) for l in layers])
    kl, _ = box_loss(attn, w)
    (out.loss + kl).backward()
    checked = 0
    for n, p in ref.named_parameters():
        if "lora_" in n:
            assert ours[n].grad is not None and float(ours[n].grad.abs().max()) > 0, n
            torch.testing.assert_close(ours[n].grad, p.grad, atol=TOL, rtol=1e-3)
            checked += 1
    assert checked == 4 * 2 * base.config.num_hidden_layers


@needs_peft
def test_lora_gradient_checkpointing_same_gradients(processor_and_examples):
    _, encoded = processor_and_examples
    cfg = LossConfig("box", layers=[1, 2])
    g0 = _grads(_lora_model(False), encoded[0], cfg)
    g1 = _grads(_lora_model(True), encoded[0], cfg)
    assert g0.keys() == g1.keys() and len(g0) == 32
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
def test_short_training_attention_loss_decreases(processor_and_examples, tmp_path):
    """Full fine-tuning (no peft): the box loss falls, the share rises, the LM loss stays finite."""
    _, encoded = processor_and_examples
    model = fresh_model()
    model.vpm.requires_grad_(False)
    cfg = TrainConfig(steps=8, lr=3e-4, out=str(tmp_path / "run"), save_every=4, progress=False)
    res = train(model, encoded[:2], LossConfig("box", layers=[2, 3]), cfg, report=lambda m: None)
    assert res.step == 8 and len(res.metrics) == 8
    assert all(np.isfinite(m["lm_loss"]) and np.isfinite(m["attn_loss"]) for m in res.metrics)
    assert res.after["attn"] < 0.7 * res.before["attn"]
    assert res.after["share"] > res.before["share"]
    assert np.isfinite(res.after["lm"])
    names = sorted(os.listdir(tmp_path / "run"))
    assert names == ["checkpoint-000004", "checkpoint-000008", "latest", "metrics.jsonl"]
    ckpt = tmp_path / "run" / "checkpoint-000008"
    assert sorted(os.listdir(ckpt)) == ["metrics.jsonl", "model", "optimizer.pt", "rng.pt", "state.json"]
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoint-000008"
    # the saved model folder is a loadable checkpoint with the trained weights
    from minicpmv_attn import MiniCPMV

    loaded = MiniCPMV.from_pretrained(str(ckpt / "model"))
    name = "llm.model.layers.2.self_attn.q_proj.weight"
    torch.testing.assert_close(loaded.get_parameter(name), model.get_parameter(name))
    assert os.path.isfile(ckpt / "model" / "tokenizer.json") and os.path.isfile(ckpt / "model" /
                                                                                 "preprocessor_config.json")


def test_none_loss_reports_share_only(processor_and_examples):
    _, encoded = processor_and_examples
    model = fresh_model()
    r = example_forward(model, encoded[0], LossConfig("none", layers=[3]))
    assert r["attn"] is None and r["share"] is not None and torch.isfinite(r["loss"])


def test_cli_resume_continues_from_saved_step(tmp_path, capsys):
    """3 steps + resume to 5 equals 5 steps straight (weights, optimizer, RNG and data order restored)."""
    common = ["--steps", 5, "--layers", "3", "--freeze-vision", "--quiet", "--no-eval", "--save-every", 1,
              "--keep", 1]
    data = tmp_path / "data.jsonl"
    write_jsonl(builtin_examples()[:3], str(data))
    common += ["--data", data]
    assert run_cli(common + ["--out", tmp_path / "straight"]) == 0
    a = tmp_path / "resumed"
    assert run_cli(common[:1] + [3] + common[2:] + ["--out", a]) == 0
    assert read_metrics(a / "metrics.jsonl")[-1]["step"] == 3
    assert run_cli(common + ["--out", a]) == 1  # refuses to mix runs without --resume
    assert "--resume" in capsys.readouterr().err
    assert run_cli(common + ["--out", a, "--resume"]) == 0
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(a / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    for x, y in zip(straight, resumed):
        assert x["examples"] == y["examples"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "straight" / "checkpoint-000005" / "model" / "model.safetensors"))
    w2 = load_file(str(a / "checkpoint-000005" / "model" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=1e-5)
    assert sorted(n for n in os.listdir(a) if n.startswith("checkpoint")) == ["checkpoint-000005"]  # --keep 1
    assert json.loads((a / "checkpoint-000005" / "state.json").read_text())["step"] == 5
    # already there: nothing to do
    assert run_cli(common + ["--out", a, "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out


@needs_peft
def test_cli_lora_box_run_and_resume(tmp_path, capsys):
    out = tmp_path / "lora"
    args = ["--lora", 4, 8, "--layers", "2:4", "--quiet", "--save-every", 2, "--out", out, "--plot", tmp_path / "img"]
    assert run_cli(args + ["--steps", 2]) == 0
    ckpt = out / "checkpoint-000002"
    assert os.path.isfile(ckpt / "adapter" / "adapter_model.safetensors")
    assert os.path.isfile(ckpt / "adapter" / "adapter_config.json") and not os.path.exists(ckpt / "model")
    for name in ("attention_before_after.png", "tokens_before.png", "tokens_after.png"):
        assert os.path.getsize(tmp_path / "img" / name) > 5000
    # resuming with other LoRA settings is refused, the same settings continue
    assert run_cli(["--lora", 8, "--steps", 4, "--quiet", "--out", out, "--resume"]) == 1
    assert "--lora" in capsys.readouterr().err
    assert run_cli(args + ["--steps", 4, "--resume"]) == 0
    steps = [m["step"] for m in read_metrics(out / "metrics.jsonl") if "eval" not in m]
    assert steps == [1, 2, 3, 4]
    # the adapter loads with peft on a fresh base model
    from peft import PeftModel

    base = fresh_model()
    peft_model = PeftModel.from_pretrained(base, str(out / "checkpoint-000004" / "adapter"))
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_lora_without_peft_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    assert not peft_available()
    assert run_cli(["--lora", 4, "--steps", 1, "--quiet", "--no-eval", "--out", tmp_path / "o"]) == 1
    assert "pip install peft" in capsys.readouterr().err


def test_teacher_distillation(tmp_path):
    """Records of a teacher (demo weights, seed 1) pull the student's attention: KL(teacher || student) falls."""
    teacher = build_demo_checkpoint(str(tmp_path / "teacher"), seed=1)
    data = tmp_path / "data.jsonl"
    write_jsonl(builtin_examples()[:2], str(data))
    records = tmp_path / "records"
    assert run_cli(["--model", teacher, "--data", data, "--layers", "3", "--write-teacher", records]) == 0
    assert sorted(os.listdir(records)) == ["demo0.json", "demo0.safetensors", "demo1.json", "demo1.safetensors"]
    out = tmp_path / "student"
    assert run_cli(["--data", data, "--layers", "3", "--attn-loss", "teacher", "--teacher", records,
                    "--attn-weight", 5, "--freeze-vision", "--steps", 6, "--lr", 3e-4, "--quiet", "--save-every", 0,
                    "--out", out]) == 0
    log = read_metrics(out / "metrics.jsonl")
    before, after = log[0], log[-1]
    assert before["eval"] == "before" and after["eval"] == "after"
    assert after["attn"] < 0.8 * before["attn"] and np.isfinite(after["lm"])
    # layers the records lack are named
    assert run_cli(["--data", data, "--layers", "1", "--attn-loss", "teacher", "--teacher", records, "--steps", 1,
                    "--quiet", "--out", tmp_path / "x"]) == 1


def test_teacher_maps_column_subset():
    student = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    rec = AttentionRecord(tensors={"llm.layers.0.attn": torch.tensor([[[0.25, 0.75]]])},
                             index={"llm.layers.0.attn": {"rows": [7], "cols": [1, 3], "reduce": "mean"}})
    maps, cols = teacher_maps(rec, [0], [7], 4)
    assert cols == [1, 3]
    loss = teacher_loss(student, maps, cols, eps=0.0)
    p, q = torch.tensor([0.25, 0.75]), torch.tensor([0.2, 0.4]) / 0.6
    assert loss.item() == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    with pytest.raises(DataError, match="lacks query rows"):
        teacher_maps(rec, [0], [8], 4)


def test_cli_bad_data(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": "gone.png", "prompt": "p", "answer": "a"}) + "\n" + "oops\n")
    assert run_cli(["--data", data, "--steps", 1, "--quiet", "--out", tmp_path / "o"]) == 1
    err = capsys.readouterr().err
    assert "line 1" in err and "gone.png" in err and "line 2" in err and "no valid examples" in err
    data.write_text(json.dumps({"image": demo_image_path(), "prompt": "p", "answer": "a"}) + "\n")
    assert run_cli(["--data", data, "--attn-loss", "box", "--steps", 1, "--quiet", "--out", tmp_path / "o"]) == 1
    assert "box" in capsys.readouterr().err


def test_checkpoint_write_is_atomic(processor_and_examples, tmp_path, monkeypatch):
    _, encoded = processor_and_examples
    model = fresh_model()
    model.vpm.requires_grad_(False)
    out = tmp_path / "run"
    cfg = TrainConfig(steps=1, lr=1e-4, out=str(out), progress=False)
    train(model, encoded[:1], LossConfig("box", layers=[3]), cfg, report=lambda m: None, run_eval=False)
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if str(path).endswith("rng.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(out), 2, model, opt, {}, str(out / "metrics.jsonl"))
    assert sorted(os.listdir(out)) == ["checkpoint-000001", "latest", "metrics.jsonl"]  # no partial folder
    assert find_checkpoint(str(out)).endswith("checkpoint-000001")
