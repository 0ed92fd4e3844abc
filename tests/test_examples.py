"""The examples: the tiny LM's backward, training, generation, and the framework wrappers."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
tiny_lm = importlib.import_module("tiny_lm")

TINY = tiny_lm.Config(vocab=256, d_model=12, n_heads=3, n_layers=2, d_mlp=20)


def perturbed_model(seed: int, cfg=TINY):
    """float64 weights away from their initial values (gains not 1, biases and mixes varied)."""
    rng = np.random.default_rng(seed)
    params = tiny_lm.init_params(cfg, rng, dtype=np.float64)
    return {n: a + 0.2 * rng.standard_normal(a.shape) for n, a in params.items()}


def test_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    params = perturbed_model(0)
    inputs, targets = rng.integers(0, 256, (2, 9)), rng.integers(0, 256, (2, 9))
    _, grads = tiny_lm.loss_and_grads(params, TINY, inputs, targets)
    assert grads.keys() == params.keys()
    h = 1e-5
    for name, value in params.items():
        direction = rng.standard_normal(value.shape)
        shifted = dict(params)
        losses = []
        for sign in (1, -1):
            shifted[name] = value + sign * h * direction
            losses.append(tiny_lm.loss_and_grads(shifted, TINY, inputs, targets)[0])
        numeric = (losses[0] - losses[1]) / (2 * h)
        analytic = float((grads[name] * direction).sum())
        assert abs(numeric - analytic) <= 1e-6 * max(abs(analytic), 1e-3), (name, numeric, analytic)


def test_adam_steps_lower_the_validation_loss():
    cfg = tiny_lm.Config(d_model=32, n_heads=2, n_layers=1, d_mlp=64)
    rng = np.random.default_rng(0)
    params = tiny_lm.init_params(cfg, rng)
    data = tiny_lm.TextData(EXAMPLES / "data" / "kjv.txt", 32)
    val = data.val_batches(8, 2)
    adam = tiny_lm.Adam(params)
    before = tiny_lm.evaluate(params, cfg, val)
    for i in range(30):
        _, grads = tiny_lm.loss_and_grads(params, cfg, *data.batch(rng, 8))
        tiny_lm.clip_grads(grads, 1.0)
        adam.update(params, grads, tiny_lm.learning_rate(i, 30, 1e-2, 5))
    after = tiny_lm.evaluate(params, cfg, val)
    assert before > 5.0  # about ln(256): a uniform guess over bytes
    assert after < before - 1.5, (before, after)


def test_greedy_steps_match_the_parallel_forward():
    params = perturbed_model(2)
    prompt = np.random.default_rng(3).integers(0, 256, (2, 5))
    tokens, sizes = [], []
    for token, states in tiny_lm.generate(params, TINY, prompt, 12):
        tokens.append(token)
        sizes.append(sum(s.nbytes for s in states))
        assert int(states[0].attn.count[0]) == prompt.shape[1] + len(tokens) - 1
    seq = prompt
    for token in tokens:
        logits, _ = tiny_lm.forward(params, TINY, seq)
        np.testing.assert_array_equal(token, logits[:, -1].argmax(axis=-1))
        seq = np.concatenate([seq, token[:, None]], axis=1)
    assert len(set(sizes)) == 1  # the recurrent memory does not grow with the context


def test_save_and_load_round_trip(tmp_path):
    params = perturbed_model(4)
    path = tmp_path / "model.npz"
    tiny_lm.save(path, params, TINY)
    loaded, cfg = tiny_lm.load(path)
    assert cfg == TINY
    assert loaded.keys() == params.keys()
    for name, value in params.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_command_lines_train_and_generate(tmp_path):
    weights = tmp_path / "tiny.npz"
    train = [sys.executable, str(EXAMPLES / "train_tiny_lm.py"), "--steps", "3", "--batch", "2",
             "--context", "16", "--d-model", "16", "--heads", "2", "--layers", "1",
             "--eval-every", "2", "--eval-batches", "1", "--out", str(weights)]
    subprocess.run(train, check=True, capture_output=True, text=True)
    _, cfg = tiny_lm.load(weights)
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers) == (16, 2, 1)
    generate = [sys.executable, str(EXAMPLES / "generate.py"), "--weights", str(weights),
                "--prompt", "And God said", "--tokens", "20", "--report-every", "10"]
    out = subprocess.run(generate, check=True, capture_output=True, text=True).stdout
    assert out.startswith("And God said")
    table = out.split("softmax KV cache\n")[1].split()
    assert [int(n) for n in table[0::5]] == [12, 20, 30, 31]  # prompt, every 10, the last


def test_serve_gives_each_request_what_generate_prints_for_it_alone(tmp_path, monkeypatch,
                                                                    capsys):
    """Requests prefilled packed into reused slots and decoded together in a fixed batch with
    free places: each text is the greedy continuation of generate.py for that prompt alone."""
    weights, results = tmp_path / "model.npz", tmp_path / "serve.json"
    tiny_lm.save(weights, {n: a.astype(np.float32) for n, a in perturbed_model(5).items()}, TINY)
    serve = [sys.executable, str(EXAMPLES / "serve.py"), "--weights", str(weights),
             "--requests", "7", "--slots", "3", "--prompt-bytes", "1", "40", "--tokens", "1",
             "25", "--gap", "3", "--json", str(results)]
    out = subprocess.run(serve, check=True, capture_output=True, text=True).stdout
    assert "generated bytes per second" in out and "memory of the pool" in out
    served = json.loads(results.read_text())
    assert len(served) == 7 and len({r["tokens"] for r in served}) > 1
    assert len({len(r["text"]) - len(r["prompt"]) for r in served}) > 1
    generate = importlib.import_module("generate")
    for request in served:
        monkeypatch.setattr(sys, "argv", [
            "generate.py", "--weights", str(weights), "--prompt", request["prompt"],
            "--tokens", str(request["tokens"]), "--temperature", "0"])
        generate.main()
        alone = capsys.readouterr().out.rsplit("\n\n", 1)[0]
        assert alone == request["text"], request["prompt"]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_torch_autograd_function_matches_naive_autograd(causal):
    torch = pytest.importorskip("torch")
    torch_autograd = importlib.import_module("torch_autograd")
    errors = torch_autograd.gradient_check(causal=causal, dtype=torch.float64)
    assert max(errors.values()) <= 1e-12, errors


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_jax_custom_vjp_matches_naive_autograd(causal, jit):
    jax = pytest.importorskip("jax")
    jax_custom_vjp = importlib.import_module("jax_custom_vjp")
    with jax.enable_x64(True):
        errors = jax_custom_vjp.gradient_check(causal=causal, jit=jit, dtype=np.float64)
    assert max(errors.values()) <= 1e-12, errors
