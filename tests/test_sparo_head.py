"""SPARO read-out against a literal, slot-by-slot evaluation of SPARO.md's equations."""
import math

import pytest
import torch

from sparo_head import SparoReadout, select_slots


def reference_sparo(head: SparoReadout, h: torch.Tensor, key_bias=None):
    """Slow and obvious: every slot's keys, values and softmax computed on their own.

    key_bias stands for the key biases b_l of SPARO.md when the module has none (share_kv
    false, where they cannot change the result); any values may be passed.
    """
    L, a = head.num_slots, head.attn_dim
    key_bias = head.key.bias if head.key.bias is not None else key_bias
    slots, attentions = [], []
    for l in range(L):
        rows = slice(l * a, (l + 1) * a)
        keys = h @ head.key.weight[rows].T + key_bias[rows]                    # (B, N, a)
        if head.share_kv:
            values = keys
        else:
            values = h @ head.value.weight[rows].T + head.value.bias[rows]
        logits = keys @ head.queries[l] / math.sqrt(a)                         # (B, N)
        alpha = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        alpha = alpha / alpha.sum(dim=1, keepdim=True)
        z = (alpha.unsqueeze(-1) * values).sum(dim=1)                          # (B, a)
        slots.append(z @ head.out_proj.weight.T + head.out_proj.bias)          # (B, V)
        attentions.append(alpha)
    y = torch.stack(slots, dim=1)                                              # (B, L, V)
    if head.norm == "slot":
        e = y / y.norm(dim=-1, keepdim=True) / math.sqrt(L)
        encoding = e.reshape(len(h), -1)
    else:
        flat = y.reshape(len(h), -1)
        encoding = flat / flat.norm(dim=-1, keepdim=True)
    return encoding, torch.stack(attentions, dim=1)


def randomise_biases(head: SparoReadout) -> None:
    # Zero-initialised biases would hide a wrongly handled bias; give them values.
    with torch.no_grad():
        for linear in (head.key, head.value, head.out_proj):
            if linear is not None and linear.bias is not None:
                linear.bias.normal_()


@pytest.mark.parametrize("share_kv", [True, False])
@pytest.mark.parametrize("norm", ["slot", "global"])
@pytest.mark.parametrize("num_tokens", [1, 5, 50, 197])
def test_matches_per_slot_reference(share_kv, norm, num_tokens):
    torch.manual_seed(0)
    head = SparoReadout(embed_dim=48, num_slots=6, slot_dim=10, attn_dim=8,
                        share_kv=share_kv, norm=norm).double()
    randomise_biases(head)
    h = torch.randn(3, num_tokens, 48, dtype=torch.float64)
    encoding, alpha = head(h, return_attention=True)
    # Without shared values the equations' key biases b_l drop out of the softmax; the module
    # has none, and the literal evaluation with arbitrary b_l must agree with it.
    key_bias = torch.randn(6 * 8, dtype=torch.float64) * 3
    expected_encoding, expected_alpha = reference_sparo(head, h, key_bias)
    assert encoding.shape == (3, 60) and alpha.shape == (3, 6, num_tokens)
    torch.testing.assert_close(alpha, expected_alpha.to(alpha.dtype), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(encoding, expected_encoding.to(encoding.dtype), rtol=1e-6, atol=1e-7)


def test_defaults_and_unit_norm():
    head = SparoReadout(embed_dim=384)
    assert (head.num_slots, head.slot_dim, head.attn_dim, head.share_kv) == (64, 64, 64, True)
    assert head.value is None and head.out_dim == 4096
    assert torch.count_nonzero(head.key.bias) == 0 and torch.count_nonzero(head.out_proj.bias) == 0
    encoding = head(torch.randn(4, 37, 384))
    torch.testing.assert_close(encoding.norm(dim=1), torch.ones(4))
    # per-slot normalisation: every slot has norm 1/sqrt(L)
    per_slot = encoding.view(4, 64, 64).norm(dim=-1)
    torch.testing.assert_close(per_slot, torch.full((4, 64), 1 / 8.0))


def test_initialisation_follows_the_authors_code():
    """W_o keeps nn.Linear's default init (uniform within +-1/sqrt(a)), b_o = 0; the key map is
    Xavier-uniform; without shared values there is no key bias (it would get no gradient)."""
    torch.manual_seed(5)
    a, V, d = 64, 64, 384
    head = SparoReadout(embed_dim=d, num_slots=64, slot_dim=V, attn_dim=a)
    bound = 1 / math.sqrt(a)
    weight = head.out_proj.weight
    assert weight.abs().max() <= bound and weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(head.out_proj.bias) == 0
    xavier_bound = math.sqrt(6 / (d + 64 * a))  # one Linear(d, L*a) holds all L key maps
    key = head.key.weight
    assert key.abs().max() <= xavier_bound and key.std().item() == pytest.approx(xavier_bound / math.sqrt(3), rel=0.05)
    separate = SparoReadout(embed_dim=d, num_slots=4, slot_dim=V, attn_dim=a, share_kv=False)
    assert separate.key.bias is None and torch.count_nonzero(separate.value.bias) == 0
    # Weights saved when the unused key bias still existed load, and compute the same.
    state = {**separate.state_dict(), "key.bias": torch.randn(4 * a)}
    reloaded = SparoReadout(embed_dim=d, num_slots=4, slot_dim=V, attn_dim=a, share_kv=False)
    reloaded.load_state_dict(state, strict=True)
    h = torch.randn(2, 9, d)
    torch.testing.assert_close(reloaded(h), separate(h))


@pytest.mark.parametrize("share_kv", [True, False])
def test_every_parameter_gets_a_gradient(share_kv):
    """DDP (without find_unused_parameters) stops on a parameter the loss does not reach."""
    head = SparoReadout(embed_dim=16, num_slots=4, slot_dim=4, attn_dim=4, share_kv=share_kv)
    head(torch.randn(2, 5, 16)).square().sum().backward()
    unused = [name for name, p in head.named_parameters() if p.grad is None or not p.grad.any()]
    assert not unused


def test_dot_product_is_mean_slot_cosine():
    torch.manual_seed(1)
    head = SparoReadout(embed_dim=32, num_slots=5, slot_dim=7, attn_dim=4)
    h1, h2 = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    e1, e2 = head(h1), head(h2)
    y1 = e1.view(2, 5, 7)
    y2 = e2.view(2, 5, 7)
    cosines = torch.nn.functional.cosine_similarity(y1, y2, dim=-1)
    torch.testing.assert_close((e1 * e2).sum(1), cosines.mean(1))


def test_attention_rows_sum_to_one_and_token_order_invariance():
    torch.manual_seed(2)
    head = SparoReadout(embed_dim=32, num_slots=8, slot_dim=4, attn_dim=4)
    h = torch.randn(2, 13, 32)
    encoding, alpha = head(h, return_attention=True)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 8))
    assert (alpha >= 0).all()
    permutation = torch.randperm(13)
    encoding_permuted, alpha_permuted = head(h[:, permutation], return_attention=True)
    torch.testing.assert_close(encoding_permuted, encoding, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alpha_permuted, alpha[:, :, permutation])


@pytest.mark.parametrize("share_kv", [True, False])
def test_slot_depends_only_on_its_own_parameters(share_kv):
    torch.manual_seed(3)
    L, a, V = 4, 3, 5
    head = SparoReadout(embed_dim=16, num_slots=L, slot_dim=V, attn_dim=a, share_kv=share_kv)
    h = torch.randn(2, 7, 16)
    y = head(h).view(2, L, V)
    for l in range(L):
        head.zero_grad()
        y_l = head(h).view(2, L, V)[:, l]
        y_l.sum().backward()
        own = slice(l * a, (l + 1) * a)
        for linear in (head.key, head.value):
            if linear is None:
                continue
            grad = linear.weight.grad.clone()
            assert grad[own].abs().sum() > 0
            grad[own] = 0
            assert torch.count_nonzero(grad) == 0, f"slot {l} depends on another slot's key/value map"
        query_grad = head.queries.grad.clone()
        assert query_grad[l].abs().sum() > 0
        query_grad[l] = 0
        assert torch.count_nonzero(query_grad) == 0, f"slot {l} depends on another slot's query"
    assert y.shape == (2, L, V)


def test_select_slots_keeps_unit_norm_and_rejects_bad_indices():
    head = SparoReadout(embed_dim=16, num_slots=8, slot_dim=4, attn_dim=4)
    encoding = head(torch.randn(3, 5, 16))
    chosen = select_slots(encoding, 8, [1, 4, 6])
    assert chosen.shape == (3, 12)
    torch.testing.assert_close(chosen.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(chosen[:, :4], encoding[:, 4:8] * math.sqrt(8 / 3))
    with pytest.raises(ValueError):
        select_slots(encoding, 8, [8])
    with pytest.raises(ValueError):
        select_slots(encoding, 8, [])


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError):
        SparoReadout(embed_dim=16, norm="cosine")
    with pytest.raises(ValueError):
        SparoReadout(embed_dim=16, num_slots=0)
    head = SparoReadout(embed_dim=16, num_slots=2, slot_dim=2, attn_dim=2)
    with pytest.raises(ValueError):
        head(torch.randn(2, 5, 15))


def test_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(4)
    head = SparoReadout(embed_dim=64, num_slots=8, slot_dim=8, attn_dim=8)
    h = torch.randn(2, 20, 64)
    exact = head(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx = head(h)
    assert approx.dtype == torch.float32  # normalisation runs in fp32
    torch.testing.assert_close(approx.norm(dim=1), torch.ones(2))
    assert (approx - exact).abs().max() < 0.05
