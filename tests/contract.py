"""The contract every ``LossModule`` of the package keeps, as one test base class.

Like TorchRL's ``LossModuleTestBase``: a test file subclasses :class:`LossContract` once per loss
(and per configuration that reads different keys), names the subclass ``Test...`` so pytest
collects it, and provides

* ``loss_class``: the ``LossModule`` subclass under test;
* ``make_loss(seed)``: a ready-to-use instance (value estimator made, as the recipes use it) whose
  parameters depend on ``seed`` only;
* ``make_input()``: a fresh tensordict the loss accepts, the same values on every call.

The inherited tests check:

* **keys**: ``tensor_keys`` is an instance of the loss's ``_AcceptedKeys`` with one entry per field,
  owned by the instance; ``set_keys`` refuses unknown names and ``set_keys(name=None)`` restores
  the default;
* **set_keys renames what is read**: for every accepted key the loss reads (``read_keys``, default:
  the accepted keys present in the input), with the entry moved to a new name and other values left
  under the old name, the renamed loss gives the original outputs and a loss with the default keys
  gives different ones;
* **no input mutation**: after ``forward`` the input has the same keys, shapes and values;
* **state_dict**: a fresh instance built with another seed (different outputs before) gives
  identical outputs once it loads the state of a used instance (buffers moved by ``forward``);
* **outputs**: every ``loss_*`` entry is a finite scalar that requires grad, their sum has a
  gradient for some parameter, and every other output entry (diagnostics, and the auxiliary
  tensordicts of losses that return a tuple) is detached;
* **torch.compile** (``supports_compile``): ``enable_compile`` (``compile_loss``) builds at least one
  graph (a counting ``aot_eager`` backend, seconds instead of inductor's minutes on CPU) and the
  compiled loss gives eager's outputs and parameter gradients.

A check a loss does not meet is marked ``xfail(strict=True)`` in its subclass, with the reason.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import pkgutil

import torch
from tensordict import TensorDictBase
from torchrl.objectives import LossModule

#: the backend of the compile check: traces with Dynamo and AOTAutograd (forward and backward
#: graphs) without inductor's code generation
COMPILE_BACKEND = "aot_eager"


def _renamed(key):
    """A new name for an accepted key (nested keys keep their group)."""
    if isinstance(key, tuple):
        return (*key[:-1], f"{key[-1]}_renamed")
    return f"{key}_renamed"


def _other_values(value: torch.Tensor) -> torch.Tensor:
    """Different values of the same shape and dtype (rows rolled along the first dimension)."""
    return value.roll(1, dims=0)


def _leaves(td: TensorDictBase) -> dict:
    return dict(td.items(include_nested=True, leaves_only=True))


def _snapshot(td: TensorDictBase) -> dict:
    return {k: v.detach().clone() for k, v in _leaves(td).items()}


def loss_modules_in(*packages: str) -> set[type]:
    """Every public ``LossModule`` subclass defined in ``packages`` (all their modules imported)."""
    for name in packages:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            importlib.import_module(info.name)
    found, todo = set(), list(LossModule.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] in packages and not cls.__name__.startswith("_"):
            found.add(cls)
    return found


class LossContract:
    """Base of the loss-contract tests (see the module docstring)."""

    loss_class: type[LossModule]
    #: accepted-key fields the forward reads; ``None``: the accepted keys present in the input
    read_keys: tuple[str, ...] | None = None
    #: the names of the ``loss_*`` entries (``None``: not checked)
    loss_terms: frozenset[str] | None = None
    supports_compile: bool = True
    #: tolerances of compiled against eager
    compile_atol, compile_rtol = 1e-5, 1e-4

    # --- provided by the subclasses -------------------------------------------------------------
    def make_loss(self, seed: int = 0) -> LossModule:
        raise NotImplementedError

    def make_input(self) -> TensorDictBase:
        raise NotImplementedError

    # --- overridable hooks ----------------------------------------------------------------------
    def compile_loss(self, loss: LossModule, backend) -> None:
        """Switch ``loss`` to its compiled path, compiling with ``backend``."""
        loss.enable_compile(backend=backend)

    def forward(self, loss: LossModule, td: TensorDictBase) -> tuple[TensorDictBase, list[TensorDictBase]]:
        """``(loss_td, auxiliary tensordicts)``; the random stream is reset first (losses that sample
        give the same outputs for the same input)."""
        torch.manual_seed(1234)
        out = loss(td)
        if isinstance(out, tuple):
            return out[0], list(out[1:])
        return out, []

    # --- helpers --------------------------------------------------------------------------------
    def _fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.loss_class._AcceptedKeys)]

    def _read_keys(self, loss: LossModule, td: TensorDictBase) -> list[str]:
        if self.read_keys is not None:
            return list(self.read_keys)
        return [f for f in self._fields() if getattr(loss.tensor_keys, f) in td.keys(include_nested=True)]

    def _outputs(self, loss: LossModule, td: TensorDictBase) -> dict:
        loss_td, aux = self.forward(loss, td)
        flat = {("loss", k): v for k, v in _leaves(loss_td).items()}
        for i, extra in enumerate(aux):
            flat.update({(f"aux{i}", k): v for k, v in _leaves(extra).items()})
        return flat

    @staticmethod
    def _assert_same(a: dict, b: dict, atol: float = 0.0, rtol: float = 0.0) -> None:
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")

    @staticmethod
    def _differs(a: dict, b: dict) -> bool:
        return any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)

    # --- the contract ---------------------------------------------------------------------------
    def test_accepted_keys(self):
        loss, other = self.make_loss(), self.make_loss()
        assert isinstance(loss.tensor_keys, self.loss_class._AcceptedKeys)
        fields = self._fields()
        assert fields and set(fields) == {f.name for f in dataclasses.fields(loss.tensor_keys)}
        for name in fields:
            key = getattr(loss.tensor_keys, name)
            assert isinstance(key, str) or (isinstance(key, tuple) and all(isinstance(k, str) for k in key)), name
        try:
            loss.set_keys(not_an_accepted_key="x")
        except ValueError as err:
            assert "not an accepted tensordict key" in str(err)
        else:
            raise AssertionError("set_keys accepted an unknown key name")
        name = fields[0]
        default = getattr(loss.tensor_keys, name)
        loss.set_keys(**{name: _renamed(default)})
        assert getattr(loss.tensor_keys, name) == _renamed(default)
        assert getattr(other.tensor_keys, name) == default  # the keys belong to the instance
        loss.set_keys(**{name: None})
        assert getattr(loss.tensor_keys, name) == default

    def test_set_keys_renames_what_is_read(self):
        td = self.make_input()
        reference = self._outputs(self.make_loss(), td)
        read = self._read_keys(self.make_loss(), td)
        assert read, "the loss reads none of its accepted keys from this input"
        for name in read:
            loss = self.make_loss()
            old = getattr(loss.tensor_keys, name)
            new = _renamed(old)
            moved = td.clone()
            value = moved.get(old)
            moved.set(new, value)
            moved.set(old, _other_values(value))  # what a loss still reading the old name would see
            loss.set_keys(**{name: new})
            self._assert_same(reference, self._outputs(loss, moved))
            # ...and the key matters: a loss with the default keys reads the other values
            assert self._differs(reference, self._outputs(self.make_loss(), moved)), (
                f"'{name}' changes no output: not read by this forward (set read_keys)")

    def test_forward_does_not_mutate_its_input(self):
        td = self.make_input()
        before, batch_size = _snapshot(td), td.batch_size
        self.forward(self.make_loss(), td)
        after = _leaves(td)
        assert after.keys() == before.keys() and td.batch_size == batch_size
        for k, v in before.items():
            assert after[k].shape == v.shape and after[k].dtype == v.dtype, k
            assert torch.equal(after[k], v), k

    def test_state_dict_round_trip(self):
        used = self.make_loss(seed=0)
        self.forward(used, self.make_input())  # moves what forward moves (e.g. return normalisers)
        state = copy.deepcopy(used.state_dict())
        td = self.make_input()
        expected = self._outputs(used, td)
        assert self._differs(expected, self._outputs(self.make_loss(seed=1), td)), "seeds 0 and 1 build the same loss"
        fresh = self.make_loss(seed=1)
        fresh.load_state_dict(state)
        loaded = fresh.state_dict()
        assert list(loaded) == list(state)
        for k, v in state.items():
            assert torch.equal(loaded[k], v), k
        self._assert_same(expected, self._outputs(fresh, td))

    def test_loss_terms_are_differentiable_and_the_rest_is_detached(self):
        loss = self.make_loss()
        loss_td, aux = self.forward(loss, self.make_input())
        terms = {k: v for k, v in loss_td.items() if k.startswith("loss_")}
        assert terms, "no loss_* output"
        if self.loss_terms is not None:
            assert set(terms) == set(self.loss_terms)
        for k, v in terms.items():
            assert v.ndim == 0 and torch.isfinite(v), k
            assert v.requires_grad, f"{k} is detached"
        for k, v in _leaves(loss_td).items():
            if not (isinstance(k, str) and k.startswith("loss_")):
                assert not v.requires_grad, f"diagnostic {k} requires grad"
        for i, extra in enumerate(aux):
            for k, v in _leaves(extra).items():
                assert not v.requires_grad, f"auxiliary output {i} entry {k} requires grad"
        params = [p for p in loss.parameters() if p.requires_grad]
        grads = torch.autograd.grad(sum(terms.values()), params, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)

    def test_compiled_equals_eager(self):
        if not self.supports_compile:
            import pytest

            pytest.skip(f"{self.loss_class.__name__} has no compiled path in this configuration")
        from torch._dynamo.testing import CompileCounterWithBackend

        results = []
        for compiled in (False, True):
            loss = self.make_loss()
            if compiled:
                counter = CompileCounterWithBackend(COMPILE_BACKEND)
                self.compile_loss(loss, counter)
            loss_td, aux = self.forward(loss, self.make_input())
            terms = [v for k, v in loss_td.items() if k.startswith("loss_")]
            params = [p for p in loss.parameters() if p.requires_grad]
            grads = torch.autograd.grad(sum(terms), params, allow_unused=True)
            flat = {("loss", k): v.detach() for k, v in _leaves(loss_td).items()}
            for i, extra in enumerate(aux):
                flat.update({(f"aux{i}", k): v.detach() for k, v in _leaves(extra).items()})
            results.append((flat, grads))
        assert counter.frame_count >= 1 and counter.op_count > 0, "enable_compile compiled nothing"
        (eager, g_eager), (comp, g_comp) = results
        self._assert_same(eager, comp, self.compile_atol, self.compile_rtol)
        assert len(g_eager) == len(g_comp)
        for a, b in zip(g_eager, g_comp):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, atol=self.compile_atol, rtol=self.compile_rtol)
