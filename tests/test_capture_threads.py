"""A capture belongs to the call that asked for it, never to whichever thread attached last.

Two threads share one model and each runs a forward pass (with its own capture spec, or none); a
barrier inside the LLM holds both mid-forward at once (the interleaving a threaded server gets).
Each result must equal what that spec captures alone.
"""
import threading

import torch

from golden import load_inputs
from test_golden import load

SPECS = [{"stages": ["llm"], "layers": [0], "reduce": "mean"},
         {"stages": ["llm", "vision"], "layers": [1], "reduce": "max"}]


def run(model, data, mask, spec):
    with torch.no_grad():
        out = model(data, attention_mask=mask, output_attentions=spec)
    return {k: v.clone() for k, v in (out.captured or {}).items()}


def run_together(model, data, mask, specs):
    """Each spec's capture from its own thread, both threads inside the forward pass at once."""
    barrier = threading.Barrier(len(specs), timeout=60)
    # both threads have attached their captures before either reaches the first LLM layer's attention
    hook = model.llm.model.layers[0].register_forward_pre_hook(lambda *_: [barrier.wait()] and None)
    results, errors = [None] * len(specs), []

    def worker(i):
        try:
            results[i] = run(model, data, mask, specs[i])
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)
            barrier.abort()

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        hook.remove()
    assert not errors, errors
    return results


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0)


def test_two_threads_keep_their_own_captures():
    model = load("single_image")
    data, mask = load_inputs("single_image")
    alone = [run(model, data, mask, spec) for spec in SPECS]
    for got, want in zip(run_together(model, data, mask, SPECS), alone):
        assert_same(got, want)


def test_a_plain_call_in_another_thread_records_nothing():
    """A thread that asks for no attention must not feed the capture another thread attached."""
    model = load("single_image")
    data, mask = load_inputs("single_image")
    alone = run(model, data, mask, SPECS[0])
    captured, plain = run_together(model, data, mask, [SPECS[0], None])
    assert_same(captured, alone)
    assert plain == {}
