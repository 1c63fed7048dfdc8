"""Hessian-vector products of a model's loss on one batch, restricted to chosen parameters.

`HVP` is the operator every estimator (power iteration, Lanczos, Hutchinson, SLQ) is built on:
H v for the block of the Hessian that belongs to a list of parameters, with the model in eval
mode. Two ways to compute it, which agree to rounding:

- ``double_backward``: the gradient is taken once with ``create_graph=True`` and every product
  differentiates that same graph again (``retain_graph=True``), so many products on one batch
  cost one forward pass in all;
- ``forward_over_reverse``: ``torch.func.jvp`` of ``torch.func.grad`` through
  ``torch.func.functional_call``, the other parameters held fixed; one forward per product.

`pyhessian_adapter` runs the same computation through PyHessian 0.1, the reference the tests
compare with; it hides what PyHessian needs (a wrapper module, frozen parameters, the global
RNG) and undoes all of it afterwards.

With ``sparse_embeddings=True`` the input embedding table enters the block as only the rows the
batch looks up (`RowTable`): the loss does not depend on the other rows, so their Hessian rows and
columns are zero and every trace and nonzero eigenvalue is unchanged, while a product on
``minilm-l6`` no longer draws, fills and reads the 30,522-row table's 11.7M entries.

With ``unpad=True`` a right-padded batch with one label per example is run as a few sub-batches of
similar length without their shared padding (`LengthBuckets`): the same loss and Hessian on fewer rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from qanalyze.cpu import ONEDNN_ISA_WITHOUT_BFLOAT16, onednn_isa_cap
from qanalyze.errors import ConfigError, NonFiniteError
from qanalyze.sensitivity.buckets import LengthBuckets, LossFn

Criterion = Callable[[Tensor, Tensor], Tensor]
"""A loss on ``(logits, labels)``, the form PyHessian calls."""

ParamSelection = nn.Module | Mapping[str, nn.Parameter] | str | Sequence[nn.Parameter | str]
"""Which parameters a Hessian block covers: a submodule (all its parameters), a name-to-parameter
map, one name, or a sequence of parameters and names (a name is a parameter's or a module's)."""

METHODS = ("double_backward", "forward_over_reverse")
"""The ways `HVP` can compute a product."""

PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}
"""The precisions `HVP` can run its matrix products in: the parameters' own, or ``bfloat16`` through
``torch.autocast`` (matrix products in bfloat16 with float32 accumulation; layer norms, softmax and the
loss in float32; vectors and products stay in the parameters' dtype). On CPUs with AVX512-BF16 a
bfloat16 GEMM is about five times faster than a float32 one; the price is about 2 % relative error per
product, small against a Hutchinson sample's spread but not against a 1e-3 eigenvalue tolerance."""


def resolve_precision(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The `PRECISIONS` key ``name`` stands for on parameters of `dtype` on `device`: ``auto`` is
    ``bfloat16`` for float32 parameters where the hardware multiplies bfloat16 natively (a CPU with
    AVX512-BF16 or AMX, a CUDA device that supports it), else ``float32``. ConfigError for an unknown name."""
    if name != "auto":
        if name not in PRECISIONS:
            raise ConfigError(f"unknown HVP precision {name!r}; known: auto, {', '.join(PRECISIONS)}")
        return name
    return "bfloat16" if dtype == torch.float32 and _native_bfloat16(device) else "float32"


def _native_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # Without these units oneDNN emulates bfloat16 and the products get slower, not faster. torch asks
    # the CPU, not oneDNN, so a cap set through the environment (to run as an AVX2-only machine would)
    # is checked here: under it bfloat16 is emulated too.
    if onednn_isa_cap() in ONEDNN_ISA_WITHOUT_BFLOAT16:
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def resolve_params(model: nn.Module, params: ParamSelection) -> tuple[list[str], list[nn.Parameter]]:
    """The fully qualified names and the parameters `params` selects in `model`, in the order given.

    Raises ConfigError for an unknown name, a parameter that is not the model's, one listed
    twice, a selection with no floating-point parameter, or parameters on different devices or
    of different dtypes.
    """
    named = dict(model.named_parameters())
    name_of = {id(p): name for name, p in named.items()}
    chosen: list[nn.Parameter] = []
    if isinstance(params, nn.Module):
        chosen = list(params.parameters())
    elif isinstance(params, Mapping):
        chosen = list(params.values())
    else:
        items = [params] if isinstance(params, str) else list(params)
        modules = dict(model.named_modules())
        for item in items:
            if isinstance(item, str):
                chosen.extend(_by_name(item, named, modules))
            else:
                chosen.append(item)
    names = []
    for param in chosen:
        if id(param) not in name_of:
            raise ConfigError(f"a selected parameter of shape {tuple(param.shape)} is not a parameter of the model")
        names.append(name_of[id(param)])
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"parameter {twice[0]} is selected more than once")
    if not chosen:
        raise ConfigError("the selection holds no parameters")
    kinds = {(p.dtype, p.device) for p in chosen}
    if len(kinds) > 1:
        raise ConfigError(f"selected parameters mix dtypes or devices: {sorted(map(str, kinds))}")
    if not chosen[0].is_floating_point():
        raise ConfigError(f"selected parameters have dtype {chosen[0].dtype}; a Hessian needs floating point")
    return names, chosen


def _by_name(name: str, named: Mapping[str, nn.Parameter], modules: Mapping[str, nn.Module]) -> list[nn.Parameter]:
    if name in named:
        return [named[name]]
    if name in modules and name:
        found = list(modules[name].parameters())
        if found:
            return found
        raise ConfigError(f"module {name} has no parameters")
    raise ConfigError(f"{name!r} names neither a parameter nor a module of the model")


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """``model(**batch).loss``, the loss a Hugging Face task model computes when the batch has labels.

    Raises ConfigError when there is none: a bare model (no task head) or a batch without labels.
    """
    output = model(**batch)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        missing = "the batch has no labels" if "labels" not in batch else "the model has no task head"
        raise ConfigError(
            f"the model returned no loss ({missing}); Hessian sensitivity needs a model with a task "
            "head: run `qanalyze finetune` first or give a model that has one"
        )
    return loss


class HVP:
    """Hessian-vector products of the loss of `model` on one batch w.r.t. a chosen list of
    parameters, model in eval mode (dropout off). Made by `HVP.build`, which runs the forward pass;
    the constructor only stores what `build` computed.

    `params` selects the block (see `ParamSelection`); `loss_fn(model, batch)` gives the loss
    (default `default_loss`). The model's parameters, their ``requires_grad`` flags, gradients
    and train/eval modes are the same after every call as before it. ``double_backward`` keeps
    the gradient's graph alive as long as this object lives (memory: one forward's activations).

    `restricted` gives the products of diagonal sub-blocks from the same graph.

    With `sparse_embeddings`, a selected input embedding table (``get_input_embeddings()``, an
    untied ``nn.Embedding``) enters as the rows ``batch["input_ids"]`` looks up (see `RowTable`):
    its entry in `params` is then a copy of those rows, and vectors and products have their shape.
    The rows left out have zero Hessian rows and columns, so traces and nonzero eigenvalues are
    the same as the full block's.

    With `unpad`, the default loss is taken over the batch's `LengthBuckets` (when it has any): the
    same loss as a weighted sum of sub-batches cut to their own longest example, so the products
    skip most of the padding. A custom `loss_fn` need not be a mean over examples, so the two do not
    combine (ConfigError).

    Attributes: `loss` (float, on the batch), `names` and `params` (the block, in order: the
    model's parameters, or the row copy of a cut table), `shapes`, `sizes` (elements per
    parameter), `numel` (block size), `omitted` (entries of the selected parameters left out by
    `sparse_embeddings`, else 0), `table` (the `RowTable` or None), `buckets` (the `LengthBuckets`
    or None), `dtype`, `device`, `method`, `precision` (a key of `PRECISIONS`), and `count`, the
    number of products computed so far.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        names: Sequence[str],
        params: Sequence[Tensor],
        *,
        loss: float,
        loss_fn: LossFn,
        method: str = "double_backward",
        precision: str = "float32",
        grads: Sequence[Tensor] | None = None,
        table: RowTable | None = None,
        omitted: int = 0,
        buckets: LengthBuckets | None = None,
    ) -> None:
        """Store a block `build` has prepared: `grads` is the ``double_backward`` gradient graph (None
        for ``forward_over_reverse``), `loss_fn` the loss the products differentiate."""
        self.model, self.batch = model, batch
        self.names, self.params = list(names), list(params)
        self.loss, self.method, self.precision = loss, method, precision
        self.table, self.omitted, self.buckets = table, omitted, buckets
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.count = 0
        self._loss_fn = loss_fn
        self._grads = None if grads is None else list(grads)
        self._gradient: list[Tensor] | None = None

    @classmethod
    def build(
        cls,
        model: nn.Module,
        batch: Mapping[str, Any],
        params: ParamSelection,
        *,
        method: str = "double_backward",
        loss_fn: LossFn | None = None,
        precision: str = "float32",
        sparse_embeddings: bool = False,
        unpad: bool = False,
    ) -> HVP:
        """The products of the block `params` selects on `batch`: resolves the block, runs the forward
        pass (and, for ``double_backward``, the gradient with its graph) and checks the loss is finite.

        Raises ConfigError for an unknown method or precision, a bad selection, ``unpad`` with a custom
        `loss_fn`, or a model that returns no loss; NonFiniteError when the loss is NaN or infinite.
        """
        if unpad and loss_fn is not None:
            raise ConfigError("unpad weights sub-batch losses by their examples, which only the default loss (a mean "
                              "over examples) allows; pass unpad=False with a custom loss_fn")
        if method not in METHODS:
            raise ConfigError(f"unknown HVP method {method!r}; known: {', '.join(METHODS)}")
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown HVP precision {precision!r}; known: {', '.join(PRECISIONS)}")
        names, chosen = resolve_params(model, params)
        table = RowTable.of(model, batch, chosen) if sparse_embeddings else None
        omitted = 0
        if table is not None:
            full = chosen[table.index]
            chosen[table.index] = full.detach()[table.rows].requires_grad_()
            omitted = full.numel() - chosen[table.index].numel()
        buckets = LengthBuckets.of(batch) if unpad else None
        loss_of = buckets.loss(default_loss) if buckets else loss_fn or default_loss
        device = chosen[0].device
        grads = None
        if method == "double_backward":
            # Freezing the other parameters for the forward keeps their branches out of the graph
            # the products reuse; the flags come back as soon as the graph exists.
            rows = table.active(chosen[table.index]) if table is not None else nullcontext()
            with (_eval_mode(model), _requires_grad(model, chosen, freeze_others=True), torch.enable_grad(),
                  _autocast(precision, device), rows):
                loss = _checked_loss(model, loss_of(model, batch))
                grads = torch.autograd.grad(loss, chosen, create_graph=True, allow_unused=True, materialize_grads=True)
        else:
            rows = table.active(chosen[table.index].detach()) if table is not None else nullcontext()
            with _eval_mode(model), torch.no_grad(), _autocast(precision, device), rows:
                loss = _checked_loss(model, loss_of(model, batch))
        return cls(model, batch, names, chosen, loss=float(loss.detach()), loss_fn=loss_of, method=method,
                   precision=precision, grads=grads, table=table, omitted=omitted, buckets=buckets)

    @cached_property
    def _functional(self) -> tuple[_LossModule, dict[str, Tensor], list[str]]:
        # forward_over_reverse: the loss module functional_call swaps parameters in, the model's other
        # parameters as detached constants (a cut table's full weight too: its hook replaces the lookup),
        # and the functional_call key of each parameter of the block.
        chosen = {id(p) for p in self.params}
        cut = self.names[self.table.index] if self.table is not None else None
        fixed = {f"model.{name}": p.detach() for name, p in self.model.named_parameters()
                 if id(p) not in chosen or name == cut}
        return _LossModule(self.model, self._loss_fn), fixed, [f"model.{name}" for name in self.names]

    def __call__(self, v: Sequence[Tensor]) -> list[Tensor]:
        """H v, one tensor per parameter of the block with that parameter's shape.

        `v` holds one tensor per parameter (same shapes; cast to the block's dtype and device).
        Raises ValueError for a wrong count or shape, NonFiniteError when the product holds NaN
        or infinity.
        """
        return self._product(list(range(len(self.params))), v)

    def gradient(self) -> list[Tensor]:
        """The gradient of the loss on the batch, one tensor per parameter of the block (detached).

        ``double_backward`` has it from its graph; ``forward_over_reverse`` takes one backward pass on
        first call. It does not count as a product."""
        if self._gradient is None:
            if self.method == "double_backward":
                self._gradient = [g.detach() for g in self._grads]
            else:
                loss_of = self._loss_of(list(range(len(self.params))))
                with _eval_mode(self.model):
                    grads = torch.func.grad(loss_of)(tuple(p.detach() for p in self.params))
                self._gradient = [g.detach() for g in grads]
        return self._gradient

    def restricted(self, indices: Sequence[int], v: Sequence[Tensor]) -> list[Tensor]:
        """H_SS v_S for the diagonal sub-block of the parameters at `indices` (positions in
        `params`): `v` and the result hold one tensor per index, in that order.

        It reuses this object's graph, so one `HVP` over every module serves the per-module and
        per-layer blocks too; it counts as one product.
        """
        chosen = list(indices)
        valid = all(not isinstance(i, bool) and isinstance(i, int) and 0 <= i < len(self.params) for i in chosen)
        if not chosen or not valid or len(set(chosen)) != len(chosen):
            raise ValueError(f"indices must be distinct positions in 0..{len(self.params) - 1}, got {chosen}")
        return self._product(chosen, v)

    def flat(self, v: Tensor) -> Tensor:
        """H v for `v` flattened to one vector of `numel` elements (parameters in block order)."""
        if v.dim() != 1 or v.numel() != self.numel:
            raise ValueError(f"expected a flat vector of {self.numel} elements, got shape {tuple(v.shape)}")
        parts = [chunk.view(shape) for chunk, shape in zip(v.split(self.sizes), self.shapes)]
        return torch.cat([h.reshape(-1) for h in self(parts)])

    def _product(self, indices: list[int], v: Sequence[Tensor]) -> list[Tensor]:
        vectors = self._checked_vectors(indices, v)
        if self.method == "double_backward":
            hv = self._double_backward(indices, vectors)
        else:
            hv = self._forward_over_reverse(indices, vectors)
        self.count += 1
        self._check_finite([self.names[i] for i in indices], hv, vectors)
        return hv

    def _checked_vectors(self, indices: list[int], v: Sequence[Tensor]) -> list[Tensor]:
        vectors = list(v)
        if len(vectors) != len(indices):
            raise ValueError(f"expected {len(indices)} tensors (one per parameter), got {len(vectors)}")
        for i, t in zip(indices, vectors):
            if t.shape != self.shapes[i]:
                raise ValueError(
                    f"vector for {self.names[i]} has shape {tuple(t.shape)}, expected {tuple(self.shapes[i])}"
                )
        return [t.to(device=self.device, dtype=self.dtype) for t in vectors]

    def _double_backward(self, indices: list[int], vectors: list[Tensor]) -> list[Tensor]:
        # A gradient that does not require grad is constant in the block: its Hessian rows are 0.
        live = [k for k, i in enumerate(indices) if self._grads[i].requires_grad]
        params = [self.params[i] for i in indices]
        if not live:
            return [torch.zeros_like(p) for p in params]
        with _requires_grad(self.model, params, freeze_others=False):
            hv = torch.autograd.grad(
                [self._grads[indices[k]] for k in live],
                params,
                grad_outputs=[vectors[k] for k in live],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
        return [h.detach() for h in hv]

    def _loss_of(self, indices: list[int]) -> Callable[[tuple[Tensor, ...]], Tensor]:
        # The loss as a function of the parameters at `indices`; the block's others join the constants.
        wrapper, constants, all_keys = self._functional
        keys = [all_keys[i] for i in indices]
        cut = all_keys[self.table.index] if self.table is not None else None
        fixed = {**constants, **{key: p.detach() for key, p in zip(all_keys, self.params)
                                 if key not in keys and key != cut}}

        def loss_of(values: tuple[Tensor, ...]) -> Tensor:
            swapped = dict(zip(keys, values))
            # The cut table's rows: the variable when it is among `indices`, else this object's constant copy.
            table = swapped.pop(cut, None)
            if table is None and self.table is not None:
                table = self.params[self.table.index].detach()
            rows = self.table.active(table) if self.table is not None else nullcontext()
            with rows, _autocast(self.precision, self.device):
                return torch.func.functional_call(wrapper, {**fixed, **swapped}, (self.batch,))

        return loss_of

    def _forward_over_reverse(self, indices: list[int], vectors: list[Tensor]) -> list[Tensor]:
        # H_SS v_S needs only the parameters at `indices` as variables.
        loss_of = self._loss_of(indices)
        primals = tuple(self.params[i].detach() for i in indices)
        with _eval_mode(self.model), warnings.catch_warnings():
            # torch scripts its forward-AD decompositions on first use and warns that scripting
            # is deprecated: torch's own business, not the caller's.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
            _, hv = torch.func.jvp(torch.func.grad(loss_of), (primals,), (tuple(vectors),))
        return [h.detach() for h in hv]

    def _check_finite(self, names: list[str], hv: list[Tensor], vectors: list[Tensor]) -> None:
        # A sum holds NaN or infinity whenever a term does: one read of each product in its own dtype
        # (1 ms for the word embeddings' 11.7M, against 35 ms for isfinite and 37 ms for a float64
        # sum, which converts first). One host sync for all parameters together; names only on failure.
        if bool(torch.isfinite(torch.stack([h.sum() for h in hv])).all()):
            return
        bad = next((name for name, h in zip(names, hv) if not torch.isfinite(h).all()), None)
        if bad is None:
            return  # finite values whose sum overflowed: the product itself is fine
        bad_input = next((name for name, t in zip(names, vectors) if not torch.isfinite(t).all()), None)
        cause = f"the vector for {bad_input} does" if bad_input else "the vector is finite"
        raise NonFiniteError(f"the Hessian-vector product for {bad} holds NaN or infinity ({cause})")


def _autocast(precision: str, device: torch.device) -> torch.autocast:
    # The graph built under autocast keeps its bfloat16 casts, so the double backward's products
    # run in bfloat16 without autocast being active when they are taken.
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _checked_loss(model: nn.Module, loss: Tensor) -> Tensor:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ConfigError("the loss function must return a scalar tensor")
    if not torch.isfinite(loss):
        bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        where = f"parameter {bad} holds NaN or infinity" if bad else "no parameter does, so the batch must"
        raise NonFiniteError(f"the loss on this batch is {float(loss.detach())}: {where}")
    return loss


class RowTable:
    """An input embedding table cut to the rows one batch looks up, for `HVP`'s ``sparse_embeddings``.

    `index` is the table's position in the block, `rows` the sorted row ids of ``batch["input_ids"]``,
    `module` the ``nn.Embedding``. While `active`, a forward hook on the module replaces its output by a
    lookup in a tensor of those rows only, so gradients and products are taken with respect to the
    rows, not the whole table; the model's other uses of ``input_ids`` see the ids unchanged.
    """

    def __init__(self, index: int, module: nn.Embedding, rows: Tensor) -> None:
        self.index, self.module, self.rows = index, module, rows
        self._position = torch.full((module.num_embeddings,), -1, dtype=torch.long, device=rows.device)
        self._position[rows] = torch.arange(rows.numel(), device=rows.device)
        pad = module.padding_idx
        # The padding row gets no gradient in the full table; it must get none at its new position either.
        self._padding = int(self._position[pad]) if pad is not None and int(self._position[pad]) >= 0 else None

    @classmethod
    def of(cls, model: nn.Module, batch: Mapping[str, Any], params: Sequence[Tensor]) -> RowTable | None:
        """The cut table for `model`'s input embeddings when it can stand in for the full one: the
        table is among `params`, an ``nn.Embedding`` without max_norm or sparse gradients, used by
        no other module (not tied to an output layer), and the batch gives ``input_ids``. Else None."""
        ids = batch.get("input_ids")
        getter = getattr(model, "get_input_embeddings", None)
        module = getter() if callable(getter) else None
        if not isinstance(ids, Tensor) or batch.get("inputs_embeds") is not None:
            return None
        if not isinstance(module, nn.Embedding) or module.max_norm is not None or module.sparse:
            return None
        index = next((i for i, p in enumerate(params) if p is module.weight), None)
        owners = sum(p is module.weight for _, p in model.named_parameters(remove_duplicate=False))
        if index is None or owners != 1:
            return None
        return cls(index, module, torch.unique(ids.to(module.weight.device)))

    @contextmanager
    def active(self, table: Tensor) -> Iterator[None]:
        """Look rows up in `table` (one row per entry of `rows`) while the context lasts."""
        handle = self.module.register_forward_hook(lambda module, args, output: self._lookup(args[0], table))
        try:
            yield
        finally:
            handle.remove()

    def _lookup(self, ids: Tensor, table: Tensor) -> Tensor:
        positions = self._position[ids]
        if bool((positions < 0).any()):
            raise ConfigError("the model looks up input embedding rows that batch['input_ids'] does not hold; "
                              "run without sparse embeddings")
        return nn.functional.embedding(positions, table, self._padding, None, 2.0, self.module.scale_grad_by_freq)


class _LossModule(nn.Module):
    """Holds the model as a submodule so functional_call can swap its parameters under `loss_fn`."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        """The loss of the wrapped model on `batch`."""
        return self.loss_fn(self.model, batch)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Per-module flags: model.train(True) would also flip submodules the caller kept in eval.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextmanager
def _requires_grad(model: nn.Module, chosen: Sequence[nn.Parameter], *, freeze_others: bool) -> Iterator[None]:
    # The block's parameters must require grad while a product differentiates them, even when
    # the caller froze them; the caller's flags come back afterwards.
    params = list(model.parameters()) if freeze_others else list(chosen)
    flags = [(p, p.requires_grad) for p in params]
    chosen_ids = {id(p) for p in chosen}
    try:
        for p in params:
            p.requires_grad_(id(p) in chosen_ids)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------
# PyHessian, the reference


def default_criterion(logits: Tensor, labels: Tensor) -> Tensor:
    """The loss a Hugging Face sequence classifier computes: cross-entropy for class labels,
    mean squared error for float labels (regression, one output)."""
    if labels.is_floating_point():
        return nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class _LogitsModule(nn.Module):
    """PyHessian calls ``model(inputs)`` with one argument and applies its criterion to the result."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """The logits of the wrapped model."""
        logits = getattr(self.model(**inputs), "logits", None)
        if logits is None:
            raise ConfigError("the model returns no logits; PyHessian needs a model with a task head")
        return logits


class PyHessianOracle:
    """PyHessian 0.1's `hessian` object for one block, model and batch, made by `pyhessian_adapter`.

    Its methods call PyHessian's own with the block's parameters the only ones requiring grad,
    the global RNG seeded (PyHessian draws from it) and then restored, and the model's flags,
    modes and gradients put back afterwards. `hessian` is the raw PyHessian object.
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], hessian: Any) -> None:
        self.model = model
        self.params = params
        self.hessian = hessian

    def eigenvalues(self, max_iter: int = 100, tol: float = 1e-3, top_n: int = 1, *, seed: int = 0) -> list[float]:
        """PyHessian's power iteration: the `top_n` eigenvalues largest in magnitude."""
        with _pyhessian_scope(self.model, self.params, seed=seed):
            values, _ = self.hessian.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)
        return [float(value) for value in values]

    def trace(self, max_iter: int = 100, tol: float = 1e-3, *, seed: int = 0) -> list[float]:
        """PyHessian's Hutchinson samples vᵀHv, one per probe (it returns samples, not a mean).

        PyHessian 0.1 divides its stopping test by the signed running mean, so it stops after two
        probes when that mean is negative; ``tol=0`` runs exactly `max_iter` probes on a block
        whose trace is positive.
        """
        with _pyhessian_scope(self.model, self.params, seed=seed):
            samples = self.hessian.trace(maxIter=max_iter, tol=tol)
        return [float(sample) for sample in samples]


def pyhessian_adapter(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    params: ParamSelection,
    *,
    criterion: Criterion | None = None,
) -> PyHessianOracle:
    """PyHessian on the same model, batch (with ``labels``) and block as ``HVP.build(model, batch, params)``.

    `criterion(logits, labels)` defaults to `default_criterion`, which equals the loss of a
    Hugging Face classifier or regressor. Raises ConfigError when the batch has no labels.
    """
    from pyhessian import hessian  # imported here: only the reference comparisons need it

    if "labels" not in batch:
        raise ConfigError("the batch has no labels; PyHessian needs (inputs, labels)")
    _, chosen = resolve_params(model, params)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with _pyhessian_scope(model, chosen, seed=0), warnings.catch_warnings():
        # PyHessian's backward(create_graph=True) ties .grad to the graph; the scope resets .grad.
        warnings.filterwarnings("ignore", message="Using backward.. with create_graph=True", category=UserWarning)
        reference = hessian(
            _LogitsModule(model),
            criterion or default_criterion,
            data=(inputs, batch["labels"]),
            cuda=chosen[0].device.type == "cuda",
        )
    return PyHessianOracle(model, chosen, reference)


@contextmanager
def _pyhessian_scope(model: nn.Module, chosen: list[nn.Parameter], *, seed: int) -> Iterator[None]:
    # PyHessian finds its parameters by requires_grad, calls model.eval() and zero_grad(), leaves
    # a create_graph gradient in .grad, draws from the global RNG and builds vectors in the
    # default dtype: each of these is set for the call and undone after it.
    grads = [(p, p.grad) for p in model.parameters()]
    devices = [chosen[0].device.index or 0] if chosen[0].device.type == "cuda" else []
    default_dtype = torch.get_default_dtype()
    with ExitStack() as stack:
        stack.enter_context(_eval_mode(model))
        stack.enter_context(_requires_grad(model, chosen, freeze_others=True))
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(torch.enable_grad())
        torch.manual_seed(seed)
        if chosen[0].dtype in (torch.float32, torch.float64):
            torch.set_default_dtype(chosen[0].dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(default_dtype)
            for p, grad in grads:
                p.grad = grad
