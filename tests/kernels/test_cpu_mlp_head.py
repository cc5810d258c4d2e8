"""The C kernels of a decode step outside attention: the two panel kernels for linear layers (the hand-written
panel GEMM and oneDNN's brgemm, against an fp64 matmul; their dispatch in layers.linear), the gated MLP's
silu * up, and greedy sampling's row argmax."""

import json

import pytest
import torch
import torch.nn.functional as F

from packserve.kernels import cpu_ops as K
from packserve.layers.cpu_gemm import CALIBRATION_ROWS, CpuPackedLinear, row_table
from packserve.layers.linear import ColumnLinear, RowLinear, linear, prepack_cpu

pytestmark = pytest.mark.usefixtures("each_isa")  # tests/kernels/conftest.py: every ISA build


def _ref(x, w, b):
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


def _kernel(name):
    if name == "brgemm" and not K.has_brgemm_linear():
        pytest.skip("this torch has no fp32 brgemm")
    return K.linear_packed if name == "panel" else K.linear_brgemm


# M covers every row-tile mix (8, 4, 2, 1 and their sums; brgemm's 32- and 64-row tiles and their remainders);
# N covers partial and single panels; K = 1 too.
@pytest.mark.parametrize("kernel", ["panel", "brgemm"])
@pytest.mark.parametrize("M", [1, 2, 3, 7, 8, 13, 32, 65, 256, 300])
@pytest.mark.parametrize("N,Kin", [(1, 5), (31, 17), (33, 64), (640, 384), (50, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_fp64_matmul(kernel, M, N, Kin, bias):
    g = torch.Generator().manual_seed(M * 1000 + N)
    w = torch.randn(N, Kin, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    wide = torch.randn(M, Kin + 7, generator=g)
    x = wide[:, 3:3 + Kin]  # strided rows, as a slice of a fused projection's output
    out = _kernel(kernel)(x, K.pack_linear(w, b))
    assert out.shape == (M, N) and out.is_contiguous()
    torch.testing.assert_close(out.double(), _ref(x, w, b), atol=1e-4 * Kin ** 0.5, rtol=1e-5)


def test_pack_layout_and_padding():
    w = torch.arange(40 * 3, dtype=torch.float32).view(40, 3)
    p = K.pack_linear(w, torch.ones(40))
    assert p.panels.shape == (2, 3, 32) and (p.out_features, p.in_features) == (40, 3)
    assert torch.equal(p.panels[1, :, :8], w[32:].T) and not p.panels[1, :, 8:].any()
    assert p.bias.shape == (64,) and p.bias[:40].eq(1).all() and not p.bias[40:].any()


@pytest.mark.parametrize("kernel", ["panel", "brgemm"])
def test_rejects_bad_input(kernel):
    fn = _kernel(kernel)
    p = K.pack_linear(torch.randn(8, 4))
    with pytest.raises(RuntimeError, match="must be"):
        fn(torch.randn(2, 5), p)
    with pytest.raises(RuntimeError, match="fp32"):
        fn(torch.randn(2, 4).double(), p)
    with pytest.raises(ValueError):
        K.pack_linear(torch.randn(8, 4), torch.randn(7))
    with pytest.raises(ValueError):
        K.pack_linear(torch.randn(8, 4).half())
    assert fn(torch.randn(0, 4), p).shape == (0, 8)


def test_row_table_takes_the_verdict_of_the_next_timed_row_count():
    table = row_table(["panel", None, "brgemm", None, "panel", None])  # timed at 1, 4, 16, 64, 256, 1024 rows
    assert CALIBRATION_ROWS == (1, 4, 16, 64, 256, 1024) and len(table) == 1025
    assert table[0] is None and table[1] == "panel"
    assert set(table[2:5]) == {None} and set(table[5:17]) == {"brgemm"} and set(table[17:65]) == {None}
    assert set(table[65:257]) == {"panel"} and set(table[257:]) == {None}
    packed = CpuPackedLinear(None, row_table([None] * 5 + ["brgemm"]))
    assert packed.kernel(255) is None and packed.kernel(1024) == "brgemm" and packed.kernel(5000) == "brgemm"


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 17, 64, 256, 257, 1024, 1025, 1100])
def test_linear_dispatch_on_either_side_of_each_verdict(rows):
    """Rows the panel serves and rows it does not (and beyond the table): the same result either way."""
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 48, generator=g), torch.randn(96, generator=g)
    x = torch.randn(rows, 48, generator=g)
    verdicts = ["panel", None, "brgemm" if K.has_brgemm_linear() else "panel", None, "panel", "brgemm"]
    if not K.has_brgemm_linear():
        verdicts[-1] = "panel"
    packed = CpuPackedLinear(K.pack_linear(w, b), row_table(verdicts))
    torch.testing.assert_close(linear(x, w, b, packed).double(), _ref(x, w, b), atol=1e-4, rtol=1e-5)


def test_prepack_cpu_keeps_panels_only_where_they_measured_faster(tmp_path, monkeypatch):
    """Every linear is timed against F.linear (the verdicts are cached in the cache folder); a layer keeps a packed
    copy only where a panel kernel won somewhere, and the model's output equals the fp64 reference either way."""
    monkeypatch.setenv("PACKSERVE_CACHE_DIR", str(tmp_path))
    model = torch.nn.Sequential(ColumnLinear(16, 40, bias=True), RowLinear(40, 16, bias=True))
    for m in model:
        torch.nn.init.normal_(m.weight)
        torch.nn.init.normal_(m.bias)
    n = prepack_cpu(model)
    assert n == sum(m.packed is not None for m in model) and model.cpu_prepacked
    for m in model:
        assert m.packed is None or (any(m.packed.kernels) and m.packed.panels.bias is not None)
        assert m.packed is None or set(m.packed.kernels) <= {None, "panel", "brgemm"}
    cached = json.loads((tmp_path / "cpu-kernels" / "gemm-calibration.json").read_text())
    (verdicts,) = cached.values()
    assert set(verdicts) == {"40x16+b", "16x40+b"} and all(len(v) == len(CALIBRATION_ROWS) for v in verdicts.values())
    for rows in (1, 5, 300):
        x = torch.randn(rows, 16)
        want = _ref(torch.relu(_ref(x, model[0].weight, model[0].bias)).float(), model[1].weight, model[1].bias)
        got = model[1](torch.relu(model[0](x)))
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_calibration_is_cached_per_torch_isa_cap(tmp_path, monkeypatch):
    """Verdicts measured against torch's AVX-512 kernels must not be reused when torch is capped at AVX2."""
    from packserve.layers.cpu_gemm import TORCH_ISA_CAPS, Calibration

    monkeypatch.setenv("PACKSERVE_CACHE_DIR", str(tmp_path))
    for k in TORCH_ISA_CAPS:
        monkeypatch.delenv(k, raising=False)
    plain = Calibration()
    plain.table, plain.dirty = {"8x8": ["panel"]}, True
    plain.save()
    assert Calibration().table == {"8x8": ["panel"]}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = Calibration()
    assert capped.key != plain.key and capped.table == {}


@pytest.mark.parametrize("rows,inter", [(1, 1), (3, 17), (32, 1024), (65, 40)])
def test_silu_mul_matches_torch(rows, inter):
    g = torch.Generator().manual_seed(rows + inter)
    wide = torch.randn(rows, 2 * inter + 3, generator=g) * 6  # saturating inputs too (exp of +-large)
    gate_up = wide[:, 1:1 + 2 * inter]  # strided rows
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(K.silu_mul(gate_up).double(), F.silu(gate) * up, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 31, 33, 63, 64, 65, 255, 256, 300])
@pytest.mark.parametrize("inter,bias", [(32, False), (96, True), (256, False)])
def test_linear_brgemm_silu_mul_matches_fp64(rows, inter, bias):
    """The fused gate_up + silu * up against fp64: brgemm's 32- and 64-row tiles and remainders, one and several
    panel pairs, a bias on both halves, strided input rows, saturating activations."""
    if not K.has_brgemm_linear():
        pytest.skip("this torch has no fp32 brgemm")
    g = torch.Generator().manual_seed(rows * inter)
    w = torch.randn(2 * inter, 40, generator=g) * 0.4
    b = torch.randn(2 * inter, generator=g) * 3 if bias else None
    x = torch.randn(rows, 45, generator=g)[:, 2:42]  # strided rows
    gate, up = _ref(x, w, b).chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = K.linear_brgemm_silu_mul(x, K.pack_linear(w, b))
    assert got.shape == (rows, inter)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        K.linear_brgemm_silu_mul(x, K.pack_linear(w[: 2 * inter - 32], None))


@pytest.mark.parametrize("rows", [1, 16, 64, 300])
def test_gated_mlp_fuses_silu_where_brgemm_serves_the_rows(rows, monkeypatch):
    """GatedMLP takes the fused kernel exactly where gate_up's verdict is brgemm (poisoned elsewhere: the unfused
    path must not run there), with the same output as the unfused torch path."""
    if not K.has_brgemm_linear():
        pytest.skip("this torch has no fp32 brgemm")
    from packserve.layers.mlp import GatedMLP

    torch.manual_seed(rows)
    mlp = GatedMLP(48, 64)
    for m in (mlp.gate_up_proj, mlp.down_proj):
        torch.nn.init.normal_(m.weight, std=0.3)
    x = torch.randn(rows, 48)
    want = mlp(x)  # nothing packed: F.linear and the torch activation
    mlp.gate_up_proj.packed = CpuPackedLinear(K.pack_linear(mlp.gate_up_proj.weight), row_table(["brgemm"] * 6))
    monkeypatch.setattr(K, "silu_mul", lambda t: t.new_full((t.shape[0], t.shape[1] // 2), float("nan")))
    torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)
    mlp.gate_up_proj.packed = CpuPackedLinear(K.pack_linear(mlp.gate_up_proj.weight), row_table(["panel"] * 6))
    assert mlp(x).isnan().all()  # the panel verdict keeps the unfused kernels


@pytest.mark.parametrize("fused_chunk_elems", [64 * 20, 64 * 1000])
def test_gated_mlp_chunks_long_inputs_by_what_it_materializes(fused_chunk_elems):
    """Long inputs: unfused in chunks of cpu_chunk rows; fused in chunks of fused_chunk_elems / intermediate rows
    (20 rows, or one piece); the same output every way."""
    if not K.has_brgemm_linear():
        pytest.skip("this torch has no fp32 brgemm")
    from packserve.layers.mlp import GatedMLP

    torch.manual_seed(1)
    mlp = GatedMLP(48, 64)
    for m in (mlp.gate_up_proj, mlp.down_proj):
        torch.nn.init.normal_(m.weight, std=0.3)
    mlp.cpu_chunk, mlp.fused_chunk_elems = 8, fused_chunk_elems
    x = torch.randn(301, 48)
    want = mlp(x)  # unpacked: 8-row chunks
    mlp.gate_up_proj.packed = CpuPackedLinear(K.pack_linear(mlp.gate_up_proj.weight), row_table(["brgemm"] * 6))
    torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)


def test_silu_mul_rejects_bad_input():
    with pytest.raises(RuntimeError, match="2 \\* intermediate"):
        K.silu_mul(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="fp32"):
        K.silu_mul(torch.randn(2, 4).double())


def test_argmax_rows_matches_torch_max_including_ties_nan_and_inf():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 32000, generator=g)
    x[1, 31999] = 99.0                                    # last column
    x[2, [5, 70, 31000]] = 50.0                           # ties: the first index
    x[3, :] = float("-inf")                               # all -inf: index 0, like torch
    x[4, 123] = float("nan")                              # NaN propagates: its index
    x[5, [10, 20]] = float("nan")
    x[6, 17] = float("inf")
    x[7, :] = 1.0                                         # constant row
    wide = torch.cat([x, torch.zeros(9, 5)], dim=1)[:, :32000]  # strided rows
    assert K.argmax_rows(wide) == torch.max(x, dim=-1).indices.tolist()
    assert K.argmax_rows(x[:, :1]) == [0] * 9 and K.argmax_rows(x[:0]) == []
    with pytest.raises(RuntimeError, match="n >= 1"):
        K.argmax_rows(torch.zeros(3, 0))


def test_lm_heads_are_timed_up_to_head_rows_only(tmp_path, monkeypatch):
    """A tied LM head is calibrated at the row counts it sees (sampled rows): verdicts past HEAD_ROWS are F.linear
    without timing, under their own cache key; its logits equal the fp64 reference at every row count."""
    from packserve.layers.cpu_gemm import HEAD_ROWS, Calibration, pack

    monkeypatch.setenv("PACKSERVE_CACHE_DIR", str(tmp_path))
    w = torch.randn(300, 16)
    cal = Calibration()
    packed = pack(w, None, cal, HEAD_ROWS)
    verdicts = cal.table[f"300x16<={HEAD_ROWS}"]
    assert verdicts[CALIBRATION_ROWS.index(HEAD_ROWS) + 1:] == [None] * (len(CALIBRATION_ROWS) - 4)
    for rows in (1, HEAD_ROWS, HEAD_ROWS + 1, 700):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(linear(x, w, None, packed).double(), _ref(x, w, None), atol=1e-4, rtol=1e-5)
        assert packed is None or rows <= HEAD_ROWS or packed.kernel(rows) is None


def test_linear_falls_back_for_inputs_without_a_row_layout():
    """An expanded input (row stride 0) is not something the C kernel reads: F.linear runs instead."""
    w, b = torch.randn(40, 8), torch.randn(40)
    x = torch.randn(1, 8).expand(5, 8)
    packed = CpuPackedLinear(K.pack_linear(w, b), row_table(["panel"] * len(CALIBRATION_ROWS)))
    torch.testing.assert_close(linear(x, w, b, packed).double(), _ref(x, w, b), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 1000, 32000])
def test_token_bitmask_matches_the_torch_reference(vocab):
    """Constrained decoding's mask on random bitmasks (xgrammar's int32 layout, the last word partly past the
    vocabulary), some rows all-allowed, only the listed rows touched."""
    from packserve.engine.structured import mask_logits_ref

    g = torch.Generator().manual_seed(vocab)
    words = -(-vocab // 32) + 1
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[2] = -1  # every token allowed
    logits = torch.randn(6, vocab, generator=g)
    rows = [0, 2, 3, 5]
    want = logits.clone()
    mask_logits_ref(want, bitmask, rows, vocab)
    got = logits.clone()
    K.apply_token_bitmask_(got, bitmask, torch.tensor(rows))
    assert torch.equal(got, want) and torch.equal(got[[1, 4]], logits[[1, 4]])
    with pytest.raises(RuntimeError, match="outside"):
        K.apply_token_bitmask_(got, bitmask, torch.tensor([6]))
