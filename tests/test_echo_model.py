"""Echo: forward conventions, gradients (with and without checkpointing), the adaptive base,
initialisation, padding and input checks. Tiny configs only."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import Seq2SeqLMOutput

import echo.attention
import echo.positional
from echo import Echo
from echo.attention import EchoAttention
from echo.config import small_config
from echo.model import shift_tokens_right
from echo.positional import GivensSite, rope_frequencies

OPTIONS = {
    "default": {},
    "local_sum_conv": dict(local_window=2, hybrid_combine="sum", conv_attention=True),
    "local_linear": dict(local_window=3, hybrid_combine="linear"),
    "s1_interleaved": dict(mlp="s1", layer_norm="s1", rope_layout="interleaved", n_givens=3),
    "no_cross_fixed_base": dict(cross_attention=False, adaptive_base=False),
}


def batch(config, B=2, T=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = 2 * config.n_audio_ctx if T is None else T
    mel = torch.randn(B, config.n_mels, T, generator=g)
    labels = torch.randint(4, config.vocab_size, (B, config.n_text_ctx), generator=g)
    return mel, labels


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return Echo(small_config(**overrides))


def test_forward_follows_hf_seq2seq_conventions():
    model = build().eval()
    config = model.config
    mel, labels = batch(config)
    labels[0, -3:] = -100
    hidden = {}
    model.decoder.ln.register_forward_hook(lambda m, i, o: hidden.update(x=o))
    out = model(mel, labels=labels)
    assert isinstance(out, Seq2SeqLMOutput)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (*labels.shape, config.vocab_size)
    # tied logits
    torch.testing.assert_close(out.logits, hidden["x"] @ model.decoder.token_embedding.weight.T)
    # decoder input = labels shifted right, start token first, -100 -> pad
    shifted = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    assert shifted[0, 0] == config.decoder_start_token_id and shifted[0, -2] == config.pad_token_id
    assert torch.equal(shifted[:, 1:].masked_fill(labels[:, :-1] == -100, -100), labels[:, :-1])
    explicit = model(mel, decoder_input_ids=shifted)
    torch.testing.assert_close(explicit.logits, out.logits, rtol=0, atol=0)
    # CE ignores -100
    keep = labels != -100
    expected = F.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected)


def _train_step(model, mel, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # dropout of the s1 MLP draws the same masks in every run
    out = model(mel, labels=labels)
    out.loss.backward()
    return out


def _attention_sites(model):
    """{name: EchoAttention} of every attention site of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, EchoAttention)}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_parameter_gets_a_gradient(option, checkpointing):
    model = build(checkpointing=checkpointing, **OPTIONS[option])
    _train_step(model, *batch(model.config))
    # without cross-attention the decoder never reads the audio: the encoder gets no gradient
    unreachable = "encoder." if not model.config.cross_attention else None
    dead = [n for n, p in model.named_parameters()
            if not (unreachable and n.startswith(unreachable))
            and (p.grad is None or not bool(p.grad.abs().max() > 0))]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("option", ["default", "local_sum_conv"])
def test_every_attention_rotation_learns(option, checkpointing):
    """Default order, q' = RoPE(q G_1 ... G_N R): at every attention site the angles get a gradient of
    at least 1e-3 of R's (their initial 0 is no stationary point), and one angle moved by 1e-3 moves
    the logits."""
    model = build(checkpointing=checkpointing, **OPTIONS[option])
    assert model.config.attention_rotation == "m_then_rope"
    mel, labels = batch(model.config)
    _train_step(model, mel, labels)
    sites = _attention_sites(model)
    assert len(sites) >= 6
    for name, attn in sites.items():
        ratio = attn.site.thetas.grad.norm() / attn.site.R.grad.norm()
        assert ratio >= 1e-3, (name, ratio.item())
    model.eval()
    with torch.no_grad():
        before = model(mel, labels=labels).logits
        for name, attn in sites.items():
            attn.site.thetas[0] += 1e-3
            after = model(mel, labels=labels).logits
            attn.site.thetas[0] -= 1e-3
            assert (after - before).abs().max() > 1e-6, name


@pytest.mark.parametrize("checkpointing", [False, True])
def test_rope_then_m_angles_get_only_rounding(checkpointing):
    """attention_rotation="rope_then_m", the reference code's order: logits see M M^T = R R^T, so the
    angles' gradient is rounding noise (about 1e-8 of R's in float32), as the README says."""
    model = build(checkpointing=checkpointing, attention_rotation="rope_then_m")
    _train_step(model, *batch(model.config))
    for name, attn in _attention_sites(model).items():
        assert attn.site.R.grad.norm() > 0, name
        assert attn.site.thetas.grad.norm() < 1e-5 * attn.site.R.grad.norm(), name


def _is_attention_angle(name):
    return name.endswith("site.thetas") and "rotary" not in name


def test_rope_then_m_angles_do_not_change_the_output():
    """attention_rotation="rope_then_m" rotates q and k by the same M = R G after RoPE, so logits see
    M M^T = R G G^T R^T = R R^T: the attention Givens angles cancel exactly, for every R."""
    model = build(attention_rotation="rope_then_m").eval()
    mel, labels = batch(model.config)
    before = model(mel, labels=labels).logits
    with torch.no_grad():
        for n, p in model.named_parameters():
            if _is_attention_angle(n):
                p.uniform_(-1.0, 1.0)
            if n.endswith("attn.site.R") or n.endswith("cross_attn.site.R"):
                p.add_(0.1 * torch.randn_like(p))  # R no longer orthogonal: M M^T != I
    changed_r = model(mel, labels=labels).logits
    with torch.no_grad():
        for n, p in model.named_parameters():
            if _is_attention_angle(n):
                p.uniform_(-1.0, 1.0)
    torch.testing.assert_close(model(mel, labels=labels).logits, changed_r, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, changed_r, atol=1e-4)  # R itself is live


@pytest.mark.parametrize("option", ["default", "s1_interleaved", "local_sum_conv"])
def test_checkpointing_gives_the_same_gradients_and_state(option):
    plain = build(checkpointing=False, **OPTIONS[option])
    ckpt = build(checkpointing=True, **OPTIONS[option])
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    ckpt.encoder.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    mel, labels = batch(plain.config)
    for step in range(2):  # the second step runs with a base the first one changed
        a = _train_step(plain, mel, labels)
        b = _train_step(ckpt, mel, labels)
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
        for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert len(calls) == 4  # forward + recomputation, twice: checkpointing did run
    for (n, x), (_, y) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(y, x, rtol=0, atol=0, msg=n)  # BatchNorm stats, base, prev_loss


def test_adaptive_base_follows_the_loss():
    model = build()
    config = model.config
    f, base0 = config.base_factor, float(config.base)
    assert model.base.item() == base0 and math.isinf(model.prev_loss.item())
    mel, labels = batch(config)
    model.train()
    with torch.no_grad():
        l1 = model(mel, labels=labels).loss
    assert torch.equal(model.prev_loss, l1)
    torch.testing.assert_close(model.base, torch.tensor(base0 * f))  # l1 < inf
    with torch.no_grad():
        l2 = model(mel, labels=labels).loss
    expected = base0 * f * f if l2 < l1 else base0
    torch.testing.assert_close(model.base, torch.tensor(expected, dtype=torch.float32))
    # every attention site's w comes from the current base
    pos = model.positional_state()
    torch.testing.assert_close(pos.w_audio, rope_frequencies(model.base, config.head_width("audio")))
    torch.testing.assert_close(pos.w_text, rope_frequencies(model.base, config.head_width("text")))
    # both branches of the rule, directly
    model.update_base(torch.tensor(0.0))
    b = model.base.clone()
    model.update_base(torch.tensor(1.0))
    torch.testing.assert_close(model.base, b / f)
    # eval mode leaves it alone
    model.eval()
    state = (model.base.clone(), model.prev_loss.clone())
    model(mel, labels=labels)
    assert torch.equal(model.base, state[0]) and torch.equal(model.prev_loss, state[1])


def test_adaptive_base_off_and_base_matters():
    model = build(adaptive_base=False)
    mel, labels = batch(model.config)
    model.train()
    with torch.no_grad():
        model(mel, labels=labels)
    assert model.base.item() == model.config.base and math.isinf(model.prev_loss.item())
    model.eval()
    before = model(mel, labels=labels).logits
    with torch.no_grad():
        model.base.mul_(3.0)
    assert not torch.allclose(model(mel, labels=labels).logits, before, atol=1e-5)


def test_base_update_never_syncs_with_the_host(monkeypatch):
    model = build()

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the base update")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    model.update_base(torch.tensor(2.0))
    model.update_base(torch.tensor(3.0))


def test_apply_initialization():
    model = build(local_window=2, conv_attention=True, layer_norm="s1")
    config = model.config
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    model.apply_initialization()
    emb = model.decoder.token_embedding.weight
    assert abs(emb.std().item() - config.init_std) < 0.1 * config.init_std and abs(emb.mean().item()) < 0.01
    enc = model.encoder
    assert enc.conv1.bias.abs().max() == 0 and enc.conv2.bias.abs().max() == 0
    fan_out = enc.conv2.weight.shape[0] * enc.conv2.weight.shape[2]
    assert abs(enc.conv2.weight.std().item() / math.sqrt(2 / fan_out) - 1) < 0.1
    fan_in1, fan_out1 = enc.conv1.weight.shape[1] * 3, enc.conv1.weight.shape[0] * 3
    assert abs(enc.conv1.weight.std().item() / math.sqrt(2 / (fan_in1 + fan_out1)) - 1) < 0.1
    n_norms = n_sites = 0
    for name, m in model.named_modules():
        if name.endswith("ln") or "_ln" in name or name.endswith("ln_post"):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
            n_norms += 1
        if isinstance(m, EchoAttention):
            torch.testing.assert_close(m.site.R @ m.site.R.T, torch.eye(m.site.h), atol=1e-5, rtol=0)
            n_sites += 1
    assert n_norms > 0
    # one site per attention: local and global in each encoder block, self and cross in each decoder block
    assert n_sites == 2 * config.n_audio_layer + 2 * config.n_text_layer
    lin = model.decoder.blocks[0].mlp.net[0].weight
    assert abs(lin.std().item() / math.sqrt(2 / sum(lin.shape)) - 1) < 0.1


def test_odd_and_short_audio_lengths():
    model = build().eval()
    config = model.config
    for T in (1, 7, 2 * config.n_audio_ctx - 1):
        mel, _ = batch(config, T=T)
        out = model(mel, decoder_input_ids=torch.tensor([[3, 5], [3, 6]]))
        assert out.encoder_last_hidden_state.shape[1] == math.ceil(T / 2)


def test_padded_frames_are_not_attended():
    model = build().eval()
    mel, labels = batch(model.config, T=32)
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 16:] = 0
    out = model(mel, labels=labels, attention_mask=mask)
    changed = mel.clone()
    changed[1, :, 20:] = torch.randn(model.config.n_mels, 12)  # beyond the front end's reach of frame 7
    again = model(changed, labels=labels, attention_mask=mask)
    torch.testing.assert_close(again.logits, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.encoder_last_hidden_state[1, :8], out.encoder_last_hidden_state[1, :8],
                               rtol=1e-5, atol=1e-5)
    unmasked = model(changed, labels=labels)
    assert not torch.allclose(unmasked.logits[1], out.logits[1], atol=1e-4)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda c: dict(input_features=torch.randn(c.n_mels, 32)), r"\(B, n_mels, T\)"),
        (lambda c: dict(input_features=torch.randn(1, c.n_mels + 1, 32)), "mel bins"),
        (lambda c: dict(input_features=torch.randn(1, c.n_mels, 2 * c.n_audio_ctx + 1)), "2 \\* n_audio_ctx"),
        (lambda c: dict(input_features=torch.full((1, c.n_mels, 8), float("nan"))), "NaN or inf"),
        (lambda c: dict(input_features=torch.full((1, c.n_mels, 8), float("inf"))), "NaN or inf"),
        (lambda c: dict(labels=torch.tensor([[5, -1]])), "labels holds token id -1"),
        (lambda c: dict(labels=torch.tensor([[5, c.vocab_size]])), "labels holds token id"),
        (lambda c: dict(labels=None, decoder_input_ids=torch.tensor([[5, -100]])), "decoder_input_ids holds"),
        (lambda c: dict(labels=torch.ones(1, c.n_text_ctx + 1, dtype=torch.long)), "n_text_ctx"),
        (lambda c: dict(labels=torch.ones(1, 3)), "integer tensor"),
        (lambda c: dict(attention_mask=torch.ones(1, 5)), "attention_mask"),
    ],
)
def test_bad_input_raises_value_error(make, message):
    model = build().eval()
    config = model.config
    kwargs = dict(input_features=torch.randn(1, config.n_mels, 8), labels=torch.tensor([[5, 6]]))
    kwargs.update(make(config))
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_nan_loss_leaves_the_base_alone():
    model = build()
    model.update_base(torch.tensor(2.0))
    state = (model.base.clone(), model.prev_loss.clone())
    model.update_base(torch.tensor(float("nan")))
    assert torch.equal(model.base, state[0]) and torch.equal(model.prev_loss, state[1])


def test_casting_the_model_keeps_the_adaptive_state_float32():
    model = build()
    model.base.fill_(10007.0)
    model.to(torch.bfloat16)
    assert model.base.dtype == torch.float32 and model.base.item() == 10007.0
    assert model.decoder.token_embedding.weight.dtype == torch.bfloat16
    mel, labels = batch(model.config)
    out = model.eval()(mel.bfloat16(), labels=labels)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


def test_decoder_padding_mask():
    model = build().eval()
    mel, labels = batch(model.config)
    ids = shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)
    mask = torch.ones_like(ids)
    mask[0, 5] = 0  # key 5 of row 0 hidden from later queries
    out = model(mel, decoder_input_ids=ids, decoder_attention_mask=mask).logits
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % model.config.vocab_size
    again = model(mel, decoder_input_ids=changed, decoder_attention_mask=mask).logits
    # only position 5 itself (its own query) may change
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[5] = False
    torch.testing.assert_close(again[0, keep], out[0, keep], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="decoder_attention_mask"):
        model(mel, decoder_input_ids=ids, decoder_attention_mask=mask[:, :3])


def test_return_dict_false_gives_a_tuple():
    model = build().eval()
    mel, labels = batch(model.config)
    loss, logits = model(mel, labels=labels, return_dict=False)[:2]
    assert logits.shape[-1] == model.config.vocab_size and loss.dim() == 0


def test_local_branch_sees_only_its_band_and_conv_mixer_has_one_output_projection():
    model = build(local_window=2, hybrid_combine="linear", conv_attention=True).eval()
    mixer = model.encoder.blocks[0].attn
    assert mixer.attn.global_attn.out is None and mixer.attn.local_attn.out is None
    assert mixer.attn.combine.in_features == 2 * model.config.n_audio_state
    pos = model.positional_state()
    u = torch.randn(1, 12, model.config.n_audio_state)
    far = u.clone()
    far[:, 8:] = torch.randn(1, 4, model.config.n_audio_state)
    local = mixer.attn.local_attn
    with torch.no_grad():
        torch.testing.assert_close(local(far, pos)[:, :6], local(u, pos)[:, :6], rtol=0, atol=0)
        glob = mixer.attn.global_attn
        assert not torch.allclose(glob(far, pos)[:, :6], glob(u, pos)[:, :6])


# site -> (config overrides, the module in the model); s1 LayerNorms keep the whole site in float64
FOLD_SITES = {
    "self_causal": (dict(layer_norm="s1"), lambda m: m.decoder.blocks[0].attn),
    "cross": (dict(layer_norm="s1"), lambda m: m.decoder.blocks[1].cross_attn),
    "encoder_self": (dict(layer_norm="s1"), lambda m: m.encoder.blocks[0].attn),
    "local": (dict(local_window=2, layer_norm="s1"), lambda m: m.encoder.blocks[0].attn.local_attn),
    "hybrid": (dict(local_window=3, hybrid_combine="linear", layer_norm="s1"),
               lambda m: m.encoder.blocks[1].attn),
    "conv_attention": (dict(conv_attention=True, local_window=2, layer_norm="s1"),
                       lambda m: m.encoder.blocks[0].attn),
}


def _site_run(model, site, x, xa, padding):
    """The site's output and the gradients of the input(s) and of every model parameter, for a fixed
    random upstream gradient. pos (with M) is built inside, so thetas and R get their gradients."""
    model.zero_grad(set_to_none=True)
    x, xa = x.clone().requires_grad_(True), xa.clone().requires_grad_(True)
    pos = model.positional_state()
    if getattr(site, "cross", False):
        out = site(x, pos, xa=xa, key_padding_mask=padding)
    elif getattr(site, "causal", False):
        out = site(x, pos)
    else:
        out = site(x, pos, key_padding_mask=padding)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype))
    grads = {"x": x.grad, "xa": xa.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return out, grads


@pytest.mark.parametrize("site_name", list(FOLD_SITES))
def test_folded_projections_compute_the_unfolded_attention(site_name, monkeypatch):
    """q' = RoPE(x (Wq M) + bq M), M folded into the projections (the default), and q' = RoPE((x Wq + bq) M),
    M given to the op, agree in float64: the output and every gradient, thetas and R included."""
    overrides, pick = FOLD_SITES[site_name]
    model = build(**overrides).double()
    with torch.no_grad():
        for p in model.parameters():  # angles off 0, biases off 0, R off orthogonal
            p.add_(0.05 * torch.randn_like(p))
    site = pick(model)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 11, 64, generator=g, dtype=torch.float64)
    xa = torch.randn(2, 9, 64, generator=g, dtype=torch.float64)
    padding = torch.zeros(2, 9 if getattr(site, "cross", False) else 11, dtype=torch.bool)
    padding[1, -3:] = True
    folded, g_folded = _site_run(model, site, x, xa, padding)
    monkeypatch.setattr(echo.attention, "FOLD_M", False)
    unfolded, g_unfolded = _site_run(model, site, x, xa, padding)
    torch.testing.assert_close(folded, unfolded, rtol=1e-11, atol=1e-12)
    assert g_folded.keys() == g_unfolded.keys()
    prefix = next(n for n, m in model.named_modules() if m is site)
    thetas = [n for n in g_folded if n.startswith(prefix) and n.endswith("site.thetas")]
    assert thetas and all(g_folded[n].norm() > 1e-6 for n in thetas)  # the site's own angles learn
    for name in g_folded:
        torch.testing.assert_close(g_folded[name], g_unfolded[name], rtol=1e-10, atol=1e-12, msg=name)


def test_demo_runs(capsys):
    from echo.__main__ import main

    assert main(["--size", "test", "--tokens", "2"]) == 0
    printed = capsys.readouterr().out
    assert "base before the step: 10000.00" in printed and "reloaded model identical: True" in printed
    for stage in ("build", "forward", "backward", "save", "load", "decode"):
        assert stage in printed


def test_positional_state_holds_every_site_once_batching_grouped_sites(monkeypatch):
    """One M per Givens site, keyed by the site; the attention sites share one orthogonal_product call,
    each residual-stream rotary has its own; a side other than audio or text is a ValueError."""
    model = build()
    calls = []
    real = echo.positional.orthogonal_product
    monkeypatch.setattr(echo.positional, "orthogonal_product",
                        lambda *a: calls.append(a[0].dim()) or real(*a))
    pos = model.positional_state()
    sites = [m for m in model.modules() if isinstance(m, GivensSite)]
    assert set(pos.matrices) == set(sites) and len(pos.matrices) == len(sites)
    assert sorted(calls) == [1, 1, 2]  # two rotaries alone, every attention site in one batched call
    attn = model.decoder.blocks[0].attn
    torch.testing.assert_close(pos.matrix(attn.site), attn.site.matrix())
    assert pos.w("audio") is pos.w_audio and pos.w("text") is pos.w_text
    with pytest.raises(ValueError, match="side must be 'audio' or 'text'"):
        pos.w("image")


def test_positional_state_encoder_and_decoder_compile_fullgraph():
    """torch.compile traces the positional state (its matrices keyed by the sites), the encoder and the
    decoder as one graph, with the eager logits."""
    model = build().eval()
    mel, labels = batch(model.config)

    def logits(mel, tokens):
        pos = model.positional_state()
        return model.decoder(tokens, model.encoder(mel, pos), pos)

    torch._dynamo.reset()
    with torch.no_grad():
        expected = logits(mel, labels)
        got = torch.compile(logits, fullgraph=True)(mel, labels)
    # inductor fuses and reorders the float32 sums: the same maths, not the same rounding
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
