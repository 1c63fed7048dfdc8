"""Hessian-vector products against a dense float64 Hessian, their guards, and PyHessian as the oracle."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
)

from qanalyze.data import collate, encode, load_task
from qanalyze.errors import ConfigError, InputError
from qanalyze.models import load_model
from qanalyze.sensitivity.estimators import hutchinson_traces, lanczos, power_iteration
from qanalyze.sensitivity.hvp import (
    HVP,
    METHODS,
    PRECISIONS,
    NonFiniteError,
    default_loss,
    pyhessian_adapter,
    resolve_precision,
)

LAYER = "bert.encoder.layer.0"
QUERY = f"{LAYER}.attention.self.query.weight"
CLASSIFIER = "classifier.weight"


def tiny_config(layers: int = 1) -> BertConfig:
    # A wider initialisation than BERT's 0.02 gives the attention blocks a Hessian well above rounding.
    return BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, initializer_range=0.2, attn_implementation="eager",
    )


def tiny_bert(*, dtype: torch.dtype = torch.float64, seed: int = 0) -> BertForSequenceClassification:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(tiny_config())
    return model.to(dtype).eval()


def tiny_batch(*, size: int = 8, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (size, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (size,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (size,), generator=g)}


def block_names(model: torch.nn.Module, prefix: str) -> list[str]:
    return [name for name, _ in model.named_parameters() if name == prefix or name.startswith(prefix + ".")]


def dense_hessian(model: torch.nn.Module, batch: dict, names: list[str]) -> torch.Tensor:
    """The float64 Hessian of the loss as a function of the flattened block."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(x: torch.Tensor) -> torch.Tensor:
        parts = {n: c.view(s) for n, c, s in zip(names, x.split(sizes), shapes)}
        return torch.func.functional_call(model, parts, args=(), kwargs=batch).loss

    return torch.autograd.functional.hessian(loss, flat, vectorize=True)


@pytest.fixture(scope="module")
def model() -> BertForSequenceClassification:
    return tiny_bert()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return tiny_batch()


@pytest.fixture(scope="module")
def dense(model, batch) -> dict[str, tuple[list[str], torch.Tensor]]:
    blocks = {QUERY: [QUERY], LAYER: block_names(model, LAYER), "classifier": block_names(model, "classifier")}
    return {key: (names, dense_hessian(model, batch, names)) for key, names in blocks.items()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block", [QUERY, LAYER])
def test_products_equal_dense_hessian_times_vector(model, batch, dense, method, block):
    names, hessian = dense[block]
    op = HVP.build(model, batch, block, method=method)
    assert op.names == names
    assert op.numel == hessian.shape[0] == sum(op.sizes)
    vectors = torch.randn(3, op.numel, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for v in vectors:
        assert relative_error(op.flat(v), hessian @ v) < 1e-8
    assert op.count == 3
    with torch.no_grad():
        assert op.loss == pytest.approx(float(model(**batch).loss), rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_products_stay_near_the_dense_hessian(dense, batch, method):
    # The float64 model's weights rounded to float32: autocast leaves float64 alone, and the
    # comparison should see bfloat16's rounding, not the weights'.
    _, hessian = dense[LAYER]
    model32 = tiny_bert().float()
    vectors = torch.randn(3, hessian.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    errors = {}
    for precision in PRECISIONS:
        op = HVP.build(model32, batch, LAYER, method=method, precision=precision)
        assert op.precision == precision and op.dtype == torch.float32
        products = [op.flat(v.float()) for v in vectors]
        assert all(h.dtype == torch.float32 for h in products)
        errors[precision] = max(relative_error(h.double(), hessian @ v) for h, v in zip(products, vectors))
    assert errors["float32"] < 1e-4
    # bfloat16 keeps 8 significant bits: a few per cent, and visibly not float32's error.
    assert 10 * errors["float32"] < errors["bfloat16"] < 0.05


def test_unknown_precision_is_a_config_error(model, batch):
    with pytest.raises(ConfigError, match="precision"):
        HVP.build(model, batch, QUERY, precision="float16")


@pytest.mark.parametrize(("cap", "expected"), [
    (None, "bfloat16"), ("AVX512_CORE_BF16", "bfloat16"), ("avx512_core_amx", "bfloat16"),
    ("AVX2", "float32"), ("avx512_core_vnni", "float32"), ("SSE41", "float32"),
])
def test_auto_precision_honours_the_onednn_isa_cap(monkeypatch, cap, expected):
    # On a CPU with AVX512-BF16, a oneDNN cap below it (the way an AVX2-only machine is emulated) means
    # bfloat16 is emulated, so `auto` must take float32; torch's own check asks the CPU and misses the cap.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert resolve_precision("auto", torch.device("cpu"), torch.float32) == expected
    assert resolve_precision("auto", torch.device("cpu"), torch.float64) == "float32"
    assert resolve_precision("bfloat16", torch.device("cpu"), torch.float32) == "bfloat16"  # asked for: kept


def test_older_dnnl_name_of_the_cap_counts_too(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert resolve_precision("auto", torch.device("cpu"), torch.float32) == "float32"


def test_constructor_only_stores_and_build_runs_the_forward(model, batch):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        op = HVP.build(model, batch, CLASSIFIER)
        assert len(calls) == 1 and op.count == 0 and math.isfinite(op.loss)
        # The same block from stored parts: no forward, and the same products from the same graph.
        again = HVP(model, batch, op.names, op.params, loss=op.loss, loss_fn=default_loss, grads=op._grads)
        assert len(calls) == 1
    finally:
        handle.remove()
    v = [torch.ones_like(p) for p in op.params]
    assert torch.equal(again(v)[0], op(v)[0])
    assert (again.numel, again.shapes, again.count) == (op.numel, op.shapes, 1)


def test_methods_agree_on_all_parameters(model, batch):
    backward = HVP.build(model, batch, model, method="double_backward")
    forward = HVP.build(model, batch, model, method="forward_over_reverse")
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype)
         for i, p in enumerate(backward.params)]
    for a, b in zip(backward(v), forward(v)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_list_and_flat_forms_agree(model, batch):
    op = HVP.build(model, batch, LAYER)
    v = torch.randn(op.numel, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    parts = [chunk.view(shape) for chunk, shape in zip(v.split(op.sizes), op.shapes)]
    listed = torch.cat([h.reshape(-1) for h in op(parts)])
    torch.testing.assert_close(op.flat(v), listed, rtol=0, atol=0)
    with pytest.raises(ValueError, match="flat vector"):
        op.flat(v[:-1])
    with pytest.raises(ValueError, match="expected"):
        op(parts[:-1])


@pytest.mark.parametrize("method", METHODS)
def test_model_state_is_left_as_it_was(batch, method):
    model = tiny_bert()
    model.train()
    model.classifier.bias.requires_grad_(False)  # a frozen parameter inside the block
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    op = HVP.build(model, batch, "classifier", method=method)
    hv = op([torch.ones_like(p) for p in op.params])
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(module.training for module in model.modules())
    assert all(p.grad is None for p in model.parameters())
    # The products are those of eval mode (dropout off), whatever mode the model was in.
    model.eval()
    again = HVP.build(model, batch, "classifier", method=method)([torch.ones_like(p) for p in op.params])
    for a, b in zip(hv, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_nan_weight_raises_named_error(batch, method):
    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"bert\.encoder\.layer\.0\.output\.dense\.weight") as caught:
        HVP.build(model, batch, CLASSIFIER, method=method)
    assert isinstance(caught.value, InputError)


def test_nan_vector_raises_named_error(model, batch):
    op = HVP.build(model, batch, "classifier")
    v = [torch.ones_like(p) for p in op.params]
    v[1] = v[1].clone()
    v[1][0] = math.inf
    with pytest.raises(NonFiniteError, match=r"classifier\.bias"):
        op(v)


def test_model_without_head_or_labels_is_a_config_error(batch):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bare = BertModel(tiny_config(), add_pooling_layer=False).double().eval()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with pytest.raises(ConfigError, match="qanalyze finetune"):
        HVP.build(bare, inputs, "encoder.layer.0.output.dense")
    with pytest.raises(ConfigError, match="no labels"):
        HVP.build(tiny_bert(), inputs, CLASSIFIER)


def test_bad_selections_are_config_errors(model, batch):
    other = tiny_bert(seed=1)
    with pytest.raises(ConfigError, match="neither a parameter nor a module"):
        HVP.build(model, batch, "bert.encoder.layer.9")
    with pytest.raises(ConfigError, match="more than once"):
        HVP.build(model, batch, [CLASSIFIER, model.classifier.weight])
    with pytest.raises(ConfigError, match="not a parameter of the model"):
        HVP.build(model, batch, [other.classifier.weight])
    with pytest.raises(ConfigError, match="unknown HVP method"):
        HVP.build(model, batch, CLASSIFIER, method="finite_differences")


def test_custom_loss_function(model, batch):
    def half_loss(m: torch.nn.Module, b: dict) -> torch.Tensor:
        return 0.5 * m(**b).loss

    full = HVP.build(model, batch, CLASSIFIER)
    for method in METHODS:
        half = HVP.build(model, batch, CLASSIFIER, method=method, loss_fn=half_loss)
        v = torch.ones(half.numel, dtype=torch.float64)
        torch.testing.assert_close(half.flat(v), 0.5 * full.flat(v), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# PyHessian, the oracle


def test_pyhessian_agrees_on_top_eigenvalue_and_trace(model, batch):
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    oracle = pyhessian_adapter(model, batch, QUERY)
    reference = oracle.eigenvalues(max_iter=100, tol=1e-3, top_n=1)[0]
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    op = HVP.build(model, batch, QUERY)
    native = lanczos(op, generator=torch.Generator().manual_seed(0), tol=1e-6)[0]
    powered = power_iteration(op, generator=torch.Generator().manual_seed(0))[0]
    assert native.value == pytest.approx(reference, rel=0.02)
    assert powered.value == pytest.approx(reference, rel=0.02)

    # The classifier block is positive semi-definite (logits are linear in it), so pyhessian's
    # signed stopping test with tol=0 never fires and both sides use the same number of probes.
    probes = 60
    samples = torch.tensor(pyhessian_adapter(model, batch, "classifier").trace(max_iter=probes, tol=0.0))
    assert samples.numel() == probes
    mine = hutchinson_traces(
        HVP.build(model, batch, "classifier"), {"all": [0, 1]}, generator=torch.Generator().manual_seed(0),
        max_probes=probes, min_probes=probes,
    )["all"]
    assert mine.iterations == probes
    theirs, their_stderr = float(samples.mean()), float(samples.std() / math.sqrt(probes))
    assert theirs > 0
    assert abs(mine.value - theirs) <= 3 * math.hypot(mine.stderr, their_stderr)


def test_pyhessian_seeded_call_is_reproducible(model, batch):
    oracle = pyhessian_adapter(model, batch, CLASSIFIER)
    state = torch.random.get_rng_state()
    first = oracle.trace(max_iter=5, tol=0.0, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert oracle.trace(max_iter=5, tol=0.0, seed=3) == first
    assert oracle.trace(max_iter=5, tol=0.0, seed=4) != first


def test_real_minilm_lanczos_agrees_with_pyhessian(glue_dir):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the new classification head is drawn at random
        loaded = load_model("minilm-l6", num_labels=2, eager_attention=True)
    data = load_task("sst2", str(glue_dir), max_train_examples=64, seed=0)
    encoded = encode(data.train[:8], loaded.tokenizer, max_length=32)
    batch = collate(encoded, range(8), loaded.tokenizer)
    block = "bert.encoder.layer.5.attention.output.dense.weight"
    op = HVP.build(loaded.model, batch, block)
    native = lanczos(op, generator=torch.Generator().manual_seed(0), tol=1e-4)[0]
    reference = pyhessian_adapter(loaded.model, batch, block).eigenvalues(max_iter=100, tol=1e-3)[0]
    assert native.converged
    assert native.value == pytest.approx(reference, rel=0.02)
    # Power iteration at the same tolerance needs several times the products (measured: 12 vs 61).
    powered = power_iteration(HVP.build(loaded.model, batch, block), generator=torch.Generator().manual_seed(0),
                              tol=1e-4)[0]
    assert native.iterations < powered.iterations
    assert powered.value == pytest.approx(native.value, rel=0.02)


@pytest.mark.parametrize("method", METHODS)
def test_restricted_products_are_diagonal_sub_blocks(model, batch, dense, method):
    names, hessian = dense[LAYER]
    op = HVP.build(model, batch, LAYER, method=method)
    picked = [names.index(f"{LAYER}.attention.self.value.weight"), names.index(QUERY)]
    offsets = [sum(op.sizes[:i]) for i in range(len(op.sizes))]
    rows = torch.cat([torch.arange(offsets[i], offsets[i] + op.sizes[i]) for i in picked])
    v = torch.randn(len(rows), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    parts = [chunk.view(op.shapes[i]) for chunk, i in zip(v.split([op.sizes[i] for i in picked]), picked)]
    hv = torch.cat([h.reshape(-1) for h in op.restricted(picked, parts)])
    assert relative_error(hv, hessian[rows][:, rows] @ v) < 1e-8
    assert op.count == 1
    with pytest.raises(ValueError, match="distinct positions"):
        op.restricted([0, 0], parts)


def products_agree_on_the_looked_up_rows(full: HVP, cut: HVP) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Asserts the cut block's products equal the full block's on the looked-up rows; returns both."""
    index, rows = cut.table.index, cut.table.rows
    v = [torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
         for i, shape in enumerate(full.shapes)]
    hv_full = full(v)
    hv_cut = cut([t[rows] if i == index else t for i, t in enumerate(v)])
    for i, (a, b) in enumerate(zip(hv_full, hv_cut)):
        torch.testing.assert_close(b, a[rows] if i == index else a, rtol=1e-10, atol=1e-13)
    return hv_full, hv_cut


@pytest.mark.parametrize("method", METHODS)
def test_sparse_embeddings_give_the_looked_up_rows_of_the_full_product(method):
    # Padding id 7 sits inside the cut table, not at its first row: its row must stay gradient-free there.
    config = tiny_config()
    config.pad_token_id = 7
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config).double().eval()
    batch = tiny_batch()
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7)
    full = HVP.build(model, batch, model, method=method)
    cut = HVP.build(model, batch, model, method=method, sparse_embeddings=True)
    index, rows = cut.table.index, cut.table.rows
    assert cut.names[index] == "bert.embeddings.word_embeddings.weight" and full.table is None
    assert torch.equal(rows, torch.unique(batch["input_ids"])) and 7 in rows.tolist() and rows[0] != 7
    assert cut.shapes[index] == (len(rows), 16) and cut.omitted == (50 - len(rows)) * 16 == full.numel - cut.numel
    assert cut.loss == full.loss
    hv_full, hv_cut = products_agree_on_the_looked_up_rows(full, cut)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[rows] = False
    assert hv_full[index][untouched].abs().max() == 0  # why the cut loses nothing
    assert hv_cut[index][rows.tolist().index(7)].abs().max() == 0  # the padding row's gradient is held at 0


def test_sparse_embeddings_follow_gpt2_which_reads_input_ids_itself():
    # GPT-2's classifier finds each sequence's last token from input_ids: the ids must reach it unchanged.
    config = GPT2Config(vocab_size=60, n_embd=16, n_layer=1, n_head=2, n_positions=32, num_labels=2,
                        pad_token_id=59, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2ForSequenceClassification(config).double().eval()
    batch = tiny_batch()
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 59)
    full, cut = HVP.build(model, batch, model), HVP.build(model, batch, model, sparse_embeddings=True)
    index = cut.table.index
    assert cut.names[index] == "transformer.wte.weight"
    products_agree_on_the_looked_up_rows(full, cut)


def test_sparse_embeddings_leave_tied_tables_and_other_blocks_whole(batch):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tied = BertForMaskedLM(tiny_config()).double().eval()
    masked = {**batch, "labels": batch["input_ids"]}
    op = HVP.build(tied, masked, "bert.embeddings.word_embeddings", sparse_embeddings=True)
    assert op.table is None and op.omitted == 0 and op.shapes[0] == (50, 16)  # the decoder shares the table
    model = tiny_bert()
    assert HVP.build(model, batch, LAYER, sparse_embeddings=True).table is None  # the table is not in the block
    embeds = {key: value for key, value in batch.items() if key != "input_ids"}
    embeds["inputs_embeds"] = model.get_input_embeddings()(batch["input_ids"]).detach()
    assert HVP.build(model, embeds, model, sparse_embeddings=True).table is None  # no ids to cut by


@pytest.mark.parametrize("method", METHODS)
def test_gradient_is_the_loss_gradient_of_the_block(model, batch, method):
    op = HVP.build(model, batch, model, method=method, sparse_embeddings=True)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    try:
        for i, (name, g) in enumerate(zip(op.names, op.gradient())):
            expected = dict(model.named_parameters())[name].grad
            expected = expected[op.table.rows] if i == op.table.index else expected
            torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-12)
    finally:
        model.zero_grad(set_to_none=True)
    assert op.count == 0
