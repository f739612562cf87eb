"""visrec.ref: every NumPy layer against PyTorch's autograd in float64 (forward and every gradient), numerical
gradient checks, the bad inputs each layer refuses, update rules, the Solver and the models."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from visrec import ref
from visrec.ref import rel_error

TOL = 1e-7


def rng(seed=0):
    return np.random.default_rng(seed)


def _torch_grads(fn_t, arrays: dict, dout: np.ndarray, grad_keys):
    ts = {k: torch.tensor(v, requires_grad=k in grad_keys) if isinstance(v, np.ndarray) and v.dtype == np.float64
          else (torch.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}
    out = fn_t(**ts)
    (out * torch.tensor(dout)).sum().backward()
    return out.detach().numpy(), {k: ts[k].grad.numpy() for k in grad_keys}


def check_layer(fwd, bwd, arrays: dict, fn_t, grad_keys, extra=(), numeric=True):
    """Forward and backward of a NumPy layer against torch autograd, then against numerical gradients."""
    out, cache = fwd(**arrays, **dict(extra))
    dout = rng(9).standard_normal(out.shape)
    got = bwd(dout, cache)
    got = got if isinstance(got, tuple) else (got,)
    want_out, want = _torch_grads(fn_t, arrays, dout, grad_keys)
    assert out.shape == want_out.shape
    assert rel_error(out, want_out) < TOL
    for key, g in zip(grad_keys, got, strict=True):
        assert g.shape == arrays[key].shape, key
        assert rel_error(g, want[key]) < TOL, (key, rel_error(g, want[key]))
    if numeric:
        for key, g in zip(grad_keys, got, strict=True):
            a = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}

            def f(x, key=key, a=a):
                return fwd(**{**a, key: x}, **dict(extra))[0]

            num = ref.eval_numerical_gradient_array(f, a[key], dout)
            assert rel_error(num, g) < 1e-5, (key, rel_error(num, g))


def test_affine_and_activations():
    r = rng()
    x, w, b = r.standard_normal((3, 2, 5)), r.standard_normal((10, 4)), r.standard_normal(4)
    check_layer(ref.affine_forward, ref.affine_backward, {"x": x, "w": w, "b": b},
                lambda x, w, b: x.reshape(3, -1) @ w + b, ["x", "w", "b"])
    x = r.standard_normal((4, 7))
    x[np.abs(x) < 1e-3] = 0.5  # keep clear of the kink for the numerical check
    check_layer(ref.relu_forward, ref.relu_backward, {"x": x}, lambda x: torch.relu(x), ["x"])
    check_layer(ref.leaky_relu_forward, ref.leaky_relu_backward, {"x": x}, lambda x: F.leaky_relu(x, 0.1), ["x"],
                extra={"alpha": 0.1})
    big = x * 30  # the stable sigmoid must not overflow
    check_layer(ref.sigmoid_forward, ref.sigmoid_backward, {"x": big}, torch.sigmoid, ["x"], numeric=False)
    check_layer(ref.sigmoid_forward, ref.sigmoid_backward, {"x": x}, torch.sigmoid, ["x"])
    check_layer(ref.tanh_forward, ref.tanh_backward, {"x": x}, torch.tanh, ["x"])


def test_dropout_is_inverted_seeded_and_identity_in_test():
    x = rng().standard_normal((500, 50)) + 10
    out, cache = ref.dropout_forward(x, {"p": 0.3, "mode": "train", "seed": 1})
    again, _ = ref.dropout_forward(x, {"p": 0.3, "mode": "train", "seed": 1})
    assert np.array_equal(out, again)
    kept = out != 0
    assert abs(kept.mean() - 0.3) < 0.01  # p is the probability of keeping
    assert np.allclose(out[kept], x[kept] / 0.3)  # inverted: scaled in training
    assert abs(out.mean() - x.mean()) < 0.2
    dout = rng(2).standard_normal(x.shape)
    assert np.array_equal(ref.dropout_backward(dout, cache), dout * kept / 0.3)
    t_out, t_cache = ref.dropout_forward(x, {"p": 0.3, "mode": "test"})
    assert np.array_equal(t_out, x) and np.array_equal(ref.dropout_backward(dout, t_cache), dout)
    with pytest.raises(ref.RefError, match="mode 'eval' is not valid"):
        ref.dropout_forward(x, {"p": 0.5, "mode": "eval"})
    with pytest.raises(ref.RefError, match="probability of keeping"):
        ref.dropout_forward(x, {"p": 0, "mode": "train"})


def test_batchnorm_train_and_test_against_torch():
    r = rng(1)
    x, g, b = r.standard_normal((6, 5)) * 3 + 2, r.standard_normal(5), r.standard_normal(5)
    for bwd in (ref.batchnorm_backward, ref.batchnorm_backward_alt):
        check_layer(lambda x, gamma, beta: ref.batchnorm_forward(x, gamma, beta, {"mode": "train"}), bwd,
                    {"x": x, "gamma": g, "beta": b},
                    lambda x, gamma, beta: F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5),
                    ["x", "gamma", "beta"])
    bn = {"mode": "train", "momentum": 0.9}
    ref.batchnorm_forward(x, g, b, bn)
    assert np.allclose(bn["running_mean"], 0.1 * x.mean(0))  # momentum weights the old value
    assert np.allclose(bn["running_var"], 0.9 + 0.1 * x.var(0))  # the biased variance
    rm, rv = bn["running_mean"], bn["running_var"]
    check_layer(lambda x, gamma, beta: ref.batchnorm_forward(x, gamma, beta, {"mode": "test", "running_mean": rm,
                                                                               "running_var": rv}),
                ref.batchnorm_backward, {"x": x, "gamma": g, "beta": b},
                lambda x, gamma, beta: F.batch_norm(x, torch.tensor(rm), torch.tensor(rv), gamma, beta,
                                                    training=False, eps=1e-5), ["x", "gamma", "beta"])


def test_layernorm_spatial_batchnorm_and_groupnorm_against_torch():
    r = rng(2)
    x, g, b = r.standard_normal((3, 7)), r.standard_normal(7), r.standard_normal(7)
    check_layer(lambda x, gamma, beta: ref.layernorm_forward(x, gamma, beta, {}), ref.layernorm_backward,
                {"x": x, "gamma": g, "beta": b}, lambda x, gamma, beta: F.layer_norm(x, (7,), gamma, beta, 1e-5),
                ["x", "gamma", "beta"])
    x4, g3, b3 = r.standard_normal((2, 3, 4, 5)), r.standard_normal(3), r.standard_normal(3)
    check_layer(lambda x, gamma, beta: ref.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"}),
                ref.spatial_batchnorm_backward, {"x": x4, "gamma": g3, "beta": b3},
                lambda x, gamma, beta: F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5),
                ["x", "gamma", "beta"])
    x6, g6, b6 = r.standard_normal((2, 6, 3, 2)), r.standard_normal((1, 6, 1, 1)), r.standard_normal((1, 6, 1, 1))
    check_layer(lambda x, gamma, beta: ref.spatial_groupnorm_forward(x, gamma, beta, 3, {}),
                ref.spatial_groupnorm_backward, {"x": x6, "gamma": g6, "beta": b6},
                lambda x, gamma, beta: F.group_norm(x, 3, gamma.flatten(), beta.flatten(), 1e-5),
                ["x", "gamma", "beta"])
    with pytest.raises(ref.RefError, match=r"(?s)G=4 does not divide the 6 channels .* divides 6: 1, 2, 3, 6"):
        ref.spatial_groupnorm_forward(x6, g6, b6, 4, {})


def test_losses_against_torch_and_numerically():
    r = rng(3)
    x, y = r.standard_normal((8, 5)), r.integers(0, 5, 8)
    loss, dx = ref.softmax_loss(x, y)
    xt = torch.tensor(x, requires_grad=True)
    lt = F.cross_entropy(xt, torch.tensor(y))
    lt.backward()
    assert rel_error(loss, lt.item()) < TOL and rel_error(dx, xt.grad.numpy()) < TOL
    loss, dx = ref.svm_loss(x, y)
    xt = torch.tensor(x, requires_grad=True)
    lt = F.multi_margin_loss(xt, torch.tensor(y), margin=1.0) * 5  # torch divides by C too; the course does not
    lt.backward()
    assert rel_error(loss, lt.item()) < TOL and rel_error(dx, xt.grad.numpy()) < TOL
    for fn in (ref.softmax_loss, ref.svm_loss):
        num = ref.eval_numerical_gradient(lambda z, fn=fn: fn(z, y)[0], x.copy())
        assert rel_error(num, fn(x, y)[1]) < 1e-6
    with pytest.raises(ref.RefError, match=r"y has shape \(7,\); expected \(8,\)"):
        ref.softmax_loss(x, y[:7])


CONV_CASES = [  # (x shape, w shape, stride, pad): batch 1, non-square, one channel, stride 2 with pad 0 and 2
    ((1, 1, 5, 7), (2, 1, 3, 3), 1, 1),
    ((2, 3, 7, 9), (4, 3, 3, 3), 2, 0),
    ((2, 2, 6, 8), (3, 2, 4, 2), 2, 2),
]


@pytest.mark.parametrize("xs,ws,stride,pad", CONV_CASES)
@pytest.mark.parametrize("kind", ["naive", "fast"])
def test_conv_against_torch(xs, ws, stride, pad, kind):
    r = rng(4)
    a = {"x": r.standard_normal(xs), "w": r.standard_normal(ws), "b": r.standard_normal(ws[0])}
    fwd, bwd = getattr(ref, f"conv_forward_{kind}"), getattr(ref, f"conv_backward_{kind}")
    check_layer(lambda x, w, b: fwd(x, w, b, {"stride": stride, "pad": pad}), bwd, a,
                lambda x, w, b: F.conv2d(x, w, b, stride=stride, padding=pad), ["x", "w", "b"],
                numeric=kind == "naive")


@pytest.mark.parametrize("shape,ph,pw,stride", [((2, 3, 4, 6), 2, 2, 2), ((1, 1, 5, 7), 3, 3, 2),
                                                ((2, 2, 6, 5), 2, 1, 1)])
@pytest.mark.parametrize("kind", ["naive", "fast"])
def test_max_pool_against_torch(shape, ph, pw, stride, kind):
    x = rng(5).permutation(np.arange(float(np.prod(shape)))).reshape(shape) / 7  # no ties
    p = {"pool_height": ph, "pool_width": pw, "stride": stride}
    fwd, bwd = getattr(ref, f"max_pool_forward_{kind}"), getattr(ref, f"max_pool_backward_{kind}")
    check_layer(lambda x: fwd(x, p), bwd, {"x": x}, lambda x: F.max_pool2d(x, (ph, pw), stride), ["x"])


def test_conv_and_pool_refuse_bad_shapes_and_strides():
    r = rng(6)
    x, w, b = r.standard_normal((2, 3, 8, 8)), r.standard_normal((4, 2, 3, 3)), np.zeros(4)
    with pytest.raises(ref.RefError, match=r"w has shape \(4, 2, 3, 3\) with 2 input channels, but x .* has 3"):
        ref.conv_forward_fast(x, w, b, {"stride": 1, "pad": 1})
    w = r.standard_normal((4, 3, 3, 3))
    with pytest.raises(ref.RefError, match=r"stride 2 does not tile the padded input: height 8 \+ 2 \* pad 0 - "):
        ref.conv_forward_naive(x, w, b, {"stride": 2, "pad": 0})
    with pytest.raises(ref.RefError, match=r"b has shape \(3,\); expected \(4,\)"):
        ref.conv_forward_fast(x, w, np.zeros(3), {"stride": 1, "pad": 1})
    with pytest.raises(ref.RefError, match="stride 4 does not tile the input"):
        ref.max_pool_forward_fast(x, {"pool_height": 2, "pool_width": 2, "stride": 4})
    with pytest.raises(ref.RefError, match=r"x has shape \(3, 8\) \(2 dimensions\); expected 4"):
        ref.max_pool_forward_naive(x[0, 0, :3], {})


def test_a_cache_from_another_layer_is_refused():
    x = rng().standard_normal((2, 3))
    _, relu_cache = ref.relu_forward(x)
    with pytest.raises(ref.RefError, match="affine_backward: cache comes from relu_forward, not affine_forward"):
        ref.affine_backward(np.ones((2, 3)), relu_cache)
    _, naive = ref.conv_forward_naive(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), np.zeros(1), {"pad": 1})
    with pytest.raises(ref.RefError, match="conv_backward_fast: cache comes from conv_forward_naive"):
        ref.conv_backward_fast(np.ones((1, 1, 3, 3)), naive)
    with pytest.raises(ref.RefError, match="cache is a tuple"):
        ref.relu_backward(np.ones((2, 3)), (x,))
    _, aff = ref.affine_forward(x, np.ones((3, 4)), np.zeros(4))
    with pytest.raises(ref.RefError, match=r"dout has shape \(2, 5\); expected \(2, 4\)"):
        ref.affine_backward(np.ones((2, 5)), aff)
    with pytest.raises(ref.RefError, match=r"x of shape \(2, 3\) has 3 values per example, but w has shape \(4, 4\)"):
        ref.affine_forward(x, np.ones((4, 4)), np.zeros(4))


def test_rnn_and_lstm_against_torch_recurrent_layers():
    r = rng(7)
    n, t, d, h = 2, 4, 3, 5
    x, h0 = r.standard_normal((n, t, d)), r.standard_normal((n, h))
    wx, wh, b = r.standard_normal((d, h)) * 0.5, r.standard_normal((h, h)) * 0.5, r.standard_normal(h)

    def torch_rnn(x, h0, Wx, Wh, b):  # noqa: N803
        outs, prev = [], h0
        for k in range(x.shape[1]):
            prev = torch.tanh(x[:, k] @ Wx + prev @ Wh + b)
            outs.append(prev)
        return torch.stack(outs, 1)

    check_layer(ref.rnn_forward, ref.rnn_backward, {"x": x, "h0": h0, "Wx": wx, "Wh": wh, "b": b}, torch_rnn,
                ["x", "h0", "Wx", "Wh", "b"])
    # The same weights in torch's own nn.RNN agree too.
    rnn = torch.nn.RNN(d, h, batch_first=True).double()
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.tensor(wx.T))
        rnn.weight_hh_l0.copy_(torch.tensor(wh.T))
        rnn.bias_ih_l0.copy_(torch.tensor(b))
        rnn.bias_hh_l0.zero_()
        want = rnn(torch.tensor(x), torch.tensor(h0)[None])[0].numpy()
        assert rel_error(ref.rnn_forward(x, h0, wx, wh, b)[0], want) < TOL

    wx4, wh4, b4 = r.standard_normal((d, 4 * h)) * 0.5, r.standard_normal((h, 4 * h)) * 0.5, r.standard_normal(4 * h)
    lstm = torch.nn.LSTM(d, h, batch_first=True).double()
    perm = np.concatenate([np.arange(k * h, (k + 1) * h) for k in (0, 1, 3, 2)])  # ours i,f,o,g -> torch i,f,g,o
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.tensor(wx4[:, perm].T))
        lstm.weight_hh_l0.copy_(torch.tensor(wh4[:, perm].T))
        lstm.bias_ih_l0.copy_(torch.tensor(b4[perm]))
        lstm.bias_hh_l0.zero_()

    def torch_lstm(x, h0, Wx, Wh, b):  # noqa: N803
        outs, ph, pc = [], h0, torch.zeros_like(h0)
        for k in range(x.shape[1]):
            a = x[:, k] @ Wx + ph @ Wh + b
            i, f, o, g = torch.sigmoid(a[:, :h]), torch.sigmoid(a[:, h:2 * h]), torch.sigmoid(a[:, 2 * h:3 * h]), \
                torch.tanh(a[:, 3 * h:])
            pc = f * pc + i * g
            ph = o * torch.tanh(pc)
            outs.append(ph)
        return torch.stack(outs, 1)

    a = {"x": x, "h0": h0, "Wx": wx4, "Wh": wh4, "b": b4}
    check_layer(ref.lstm_forward, ref.lstm_backward, a, torch_lstm, ["x", "h0", "Wx", "Wh", "b"])
    with torch.no_grad():
        want = lstm(torch.tensor(x), (torch.tensor(h0)[None], torch.zeros(1, n, h, dtype=torch.float64)))[0]
    assert rel_error(ref.lstm_forward(**a)[0], want.numpy()) < TOL
    with pytest.raises(ref.RefError, match=r"Wx has shape \(3, 5\); expected \(3, 20\)"):
        ref.lstm_forward(x, h0, wx, wh4, b4)


def test_embedding_temporal_affine_and_temporal_softmax_loss():
    r = rng(8)
    words, table = r.integers(0, 6, (2, 4)), r.standard_normal((6, 3))
    out, cache = ref.word_embedding_forward(words, table)
    dout = r.standard_normal(out.shape)
    tt = torch.tensor(table, requires_grad=True)
    (F.embedding(torch.tensor(words), tt) * torch.tensor(dout)).sum().backward()
    assert rel_error(out, table[words]) < TOL
    assert rel_error(ref.word_embedding_backward(dout, cache), tt.grad.numpy()) < TOL
    with pytest.raises(ref.RefError, match=r"word indices must lie in \[0, 5\]"):
        ref.word_embedding_forward(words + 3, table)
    x, w, b = r.standard_normal((2, 4, 3)), r.standard_normal((3, 5)), r.standard_normal(5)
    check_layer(ref.temporal_affine_forward, ref.temporal_affine_backward, {"x": x, "w": w, "b": b},
                lambda x, w, b: x @ w + b, ["x", "w", "b"])
    scores, y = r.standard_normal((3, 4, 6)), r.integers(0, 6, (3, 4))
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=bool)
    loss, dx = ref.temporal_softmax_loss(scores, y, mask)
    st = torch.tensor(scores, requires_grad=True)
    lt = (F.cross_entropy(st.reshape(-1, 6), torch.tensor(y).reshape(-1), reduction="none")
          * torch.tensor(mask.reshape(-1))).sum() / 3  # summed over kept steps, averaged over N
    lt.backward()
    assert rel_error(loss, lt.item()) < TOL and rel_error(dx, st.grad.numpy()) < TOL
    assert np.all(dx[~mask] == 0)
    num = ref.eval_numerical_gradient(lambda z: ref.temporal_softmax_loss(z, y, mask)[0], scores.copy())
    assert rel_error(num, dx) < 1e-6


def test_attention_against_torch():
    r = rng(10)
    q, k, v = r.standard_normal((2, 3, 4)), r.standard_normal((2, 5, 4)), r.standard_normal((2, 5, 6))
    mask = np.tril(np.ones((3, 5), bool), 1)
    check_layer(lambda q, k, v: ref.attention_forward(q, k, v, mask), ref.attention_backward, {"q": q, "k": k, "v": v},
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.tensor(mask)),
                ["q", "k", "v"])
    e, heads = 8, 2
    x, mem = r.standard_normal((2, 3, e)), r.standard_normal((2, 4, e))
    params = ref.init_multihead_params(e, r)
    params = {kk: vv + 0.1 * r.standard_normal(vv.shape) for kk, vv in params.items()}
    causal = np.tril(np.ones((3, 4), bool))
    out, cache = ref.multihead_attention_forward(x, mem, mem, params, heads, causal)
    dout = r.standard_normal(out.shape)
    dq, dk, dv, grads = ref.multihead_attention_backward(dout, cache)
    tp = {kk: torch.tensor(vv, requires_grad=True) for kk, vv in params.items()}
    xt, mt = torch.tensor(x, requires_grad=True), torch.tensor(mem, requires_grad=True)
    mha = F.multi_head_attention_forward(
        xt.transpose(0, 1), mt.transpose(0, 1), mt.transpose(0, 1), e, heads, None,
        torch.cat([tp["bq"], tp["bk"], tp["bv"]]), None, None, False, 0.0, tp["Wo"].T, tp["bo"], training=False,
        need_weights=False, attn_mask=torch.tensor(~causal), use_separate_proj_weight=True,
        q_proj_weight=tp["Wq"].T, k_proj_weight=tp["Wk"].T, v_proj_weight=tp["Wv"].T)[0].transpose(0, 1)
    assert rel_error(out, mha.detach().numpy()) < TOL
    (mha * torch.tensor(dout)).sum().backward()
    assert rel_error(dq, xt.grad.numpy()) < TOL
    assert rel_error(dk + dv, mt.grad.numpy()) < TOL  # key and value are the same array here
    for name, g in grads.items():
        if name == "bk":  # adds q.bk to every key's score of a query; softmax ignores that: the gradient is 0,
            # and both sides hold only rounding noise (~1e-16), which rel_error's 1e-8 floor would compare
            assert np.abs(g).max() < 1e-12 and np.abs(tp[name].grad.numpy()).max() < 1e-12
            continue
        assert rel_error(g, tp[name].grad.numpy()) < TOL, name
        num = ref.eval_numerical_gradient_array(
            lambda w, name=name: ref.multihead_attention_forward(x, mem, mem, {**params, name: w}, heads, causal)[0],
            params[name].copy(), dout)
        assert rel_error(num, g) < 1e-6 or np.abs(num - g).max() < 1e-9, name  # bk's is zero: softmax ignores it
    with pytest.raises(ref.RefError, match="num_heads=3 does not divide the embedding size E=8"):
        ref.multihead_attention_forward(x, mem, mem, params, 3)


def test_update_rules_match_torch_optimizers():
    r = rng(11)
    w0, grads = r.standard_normal(6), [r.standard_normal(6) for _ in range(20)]
    cases = [(ref.sgd_momentum, {"learning_rate": 0.1, "momentum": 0.9},
              lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
             (ref.sgd_nesterov, {"learning_rate": 0.1, "momentum": 0.9},  # the course's form is torch's, rewritten
              lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)),
             (ref.adam, {"learning_rate": 0.01}, lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8)),
             (ref.rmsprop, {"learning_rate": 0.01, "decay_rate": 0.99, "epsilon": 1e-8}, None),
             (ref.sgd, {"learning_rate": 0.1}, lambda p: torch.optim.SGD(p, lr=0.1))]
    for rule, cfg, make in cases:
        w, c = w0.copy(), dict(cfg)
        for g in grads:
            w, c = rule(w, g, c)
        if make is None:  # rmsprop: torch adds eps inside the square root's neighbour the same way
            wt = torch.tensor(w0, requires_grad=True)
            opt = torch.optim.RMSprop([wt], lr=0.01, alpha=0.99, eps=1e-8)
        else:
            wt = torch.tensor(w0, requires_grad=True)
            opt = make([wt])
        for g in grads:
            wt.grad = torch.tensor(g)
            opt.step()
        assert rel_error(w, wt.detach().numpy()) < 1e-9, rule.__name__
    with pytest.raises(ref.RefError, match=r"w and dw must be NumPy arrays of one shape"):
        ref.adam(np.zeros(3), np.zeros(4))


@pytest.mark.parametrize("make", [
    lambda: ref.TwoLayerNet(12, 7, 3, weight_scale=0.3, reg=0.1),
    lambda: ref.FullyConnectedNet([6, 5], 12, 3, normalization="batchnorm", reg=0.05, weight_scale=0.5,
                                  dtype=np.float64, seed=0),
    lambda: ref.FullyConnectedNet([6], 12, 3, normalization="layernorm", dropout_keep_ratio=0.7, reg=0.05,
                                  weight_scale=0.5, dtype=np.float64, seed=0),
    lambda: ref.ThreeLayerConvNet((2, 4, 6), num_filters=3, filter_size=3, hidden_dim=5, num_classes=3,
                                  weight_scale=0.3, reg=0.05, dtype=np.float64),
])
def test_model_gradients_with_regularization_check_numerically(make):
    model = make()
    r = rng(12)
    shape = (5, 2, 4, 6) if isinstance(model, ref.ThreeLayerConvNet) else (5, 12)
    x, y = r.standard_normal(shape), r.integers(0, 3, 5)
    loss, grads = model.loss(x, y)
    assert np.isfinite(loss) and set(grads) == set(model.params)
    for name, p in model.params.items():
        def f(_, name=name):
            return model.loss(x, y)[0]

        num = ref.eval_numerical_gradient(f, p)
        # relative error, except for gradients that are zero in exact arithmetic (a bias before batch norm)
        assert rel_error(num, grads[name]) < 1e-5 or np.abs(num - grads[name]).max() < 1e-9, \
            (name, rel_error(num, grads[name]))
    assert model.loss(x).shape == (5, 3)


def test_solver_overfits_a_small_set_and_writes_checkpoints(tmp_path):
    r = rng(13)
    x, y = r.standard_normal((50, 20)), r.integers(0, 4, 50)
    model = ref.FullyConnectedNet([100], 20, 4, weight_scale="he", dtype=np.float64, seed=0)
    solver = ref.Solver(model, {"X_train": x, "y_train": y, "X_val": x, "y_val": y}, update_rule="adam",
                        optim_config={"learning_rate": 3e-2}, num_epochs=30, batch_size=25, verbose=False,
                        seed=0, checkpoint_name=str(tmp_path / "ck" / "fc"), lr_decay=0.98)
    solver.train()
    assert max(solver.train_acc_history) == 1.0 and solver.best_val_acc == 1.0
    assert solver.check_accuracy(x, y) == 1.0  # the best parameters are the model's at the end
    assert solver.loss_history[-1] < solver.loss_history[0] / 10
    assert (tmp_path / "ck" / "fc_epoch_30.safetensors").is_file()
    with pytest.raises(ref.RefError, match="update_rule 'adamw' is not valid"):
        ref.Solver(model, {"X_train": x, "y_train": y, "X_val": x, "y_val": y}, update_rule="adamw")


def test_every_public_function_has_a_docstring():
    import inspect

    missing = [n for n in ref.__all__ if callable(getattr(ref, n)) and not inspect.getdoc(getattr(ref, n))]
    assert not missing


def test_the_engine_imports_no_torch():
    src = Path(ref.__file__).parent
    for path in src.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "torch" for n in names), path
