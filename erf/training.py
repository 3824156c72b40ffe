"""Training with ERF snapshots: how the effective receptive field changes while a network learns.

Luo et al., "Understanding the Effective Receptive Field in Deep Convolutional Neural Networks",
NIPS 2016 (https://arxiv.org/abs/1701.04128), section 4.3: the ERF grows during training.
Jang et al., "Pooling Revisited" (DynOPool), CVPR 2022 (https://arxiv.org/abs/2205.15254):
learned pooling reshapes it.

:func:`train` trains any classifier ``nn.Module`` (in place) with a standard optimiser and, at
epoch 0 and every ``erf_every`` epochs (and after the last), measures the ERF of the centre unit
of its last spatial feature map with :func:`erf.effective_rf`, on held-out task images and on
Gaussian inputs, and records loss, accuracies, ERF size, moments sigma per axis, anisotropy,
ERF/TRF, the Gaussian fit and the learned parameters of pooling modules. The result
(:class:`TrainingRun`) saves to one ``.npz`` (arrays + JSON, no pickle); a checkpoint holds the
same plus the model, optimiser and random states, so an interrupted run resumes bit-identically
on CPU.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

__all__ = ["train", "TrainingRun", "load_run", "pooling_parameters", "find_feature_layer", "erf_summary"]

RUN_FORMAT = 1
_ERF_KINDS = ("task", "gaussian")


# ------------------------------------------------------------------------------ summaries
def pooling_parameters(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The learned parameters of the ``erf.pooling`` modules of ``model``, by module path.

    DynOPool: ``r`` per axis (``1/alpha``) and ``delta`` (px); GeM: ``p``; LIP: mean/std of the logit
    conv weights and the norm's affine weights; gated/tree: mean/std of the gating weights; DPP:
    mean ``alpha`` and ``lambda``; any other learnable ``erf.pooling`` module: mean/std per parameter.
    """
    from erf.pooling.dynopool import DynOPool2d
    from erf.pooling.lip import LIP2d
    from erf.pooling.lp import GeMPool2d

    def ms(t: torch.Tensor) -> tuple[float, float]:
        t = t.detach().double().flatten()
        return float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0

    out: dict[str, dict[str, Any]] = {}
    for path, m in model.named_modules():
        if isinstance(m, DynOPool2d):
            out[path] = {"type": "dynopool", "r": [float(1.0 / a) for a in m.alpha.detach().double()],
                         "delta": [float(d) for d in m.delta.detach().double()]}
        elif isinstance(m, GeMPool2d):
            out[path] = {"type": "gem", "p": float(m.p.detach())}
        elif isinstance(m, LIP2d):
            w_mean, w_std = ms(m.logit.conv.weight)
            n_w, _ = ms(m.logit.norm.weight)
            n_b, _ = ms(m.logit.norm.bias)
            out[path] = {"type": "lip", "logit_weight_mean": w_mean, "logit_weight_std": w_std,
                         "logit_weight_absmean": float(m.logit.conv.weight.detach().abs().mean()),
                         "norm_weight_mean": n_w, "norm_bias_mean": n_b}
        elif _is_pooling_param_owner(m) and not any(path.startswith(p + ".") for p in out):
            entry: dict[str, Any] = {"type": type(m).__name__}
            for name, p in m.named_parameters(recurse=False):
                if name in ("log_alpha", "log_lambda"):
                    entry[name[4:] + "_mean"] = float(p.detach().double().exp().mean())
                else:
                    entry[name + "_mean"], entry[name + "_std"] = ms(p)
            out[path] = entry
    return out


def _is_pooling_param_owner(m: nn.Module) -> bool:
    """A module of ``erf.pooling`` with parameters of its own, not a plain convolution (strided/dilated)."""
    return (type(m).__module__.startswith("erf.pooling") and not isinstance(m, nn.modules.conv._ConvNd)
            and any(True for _ in m.parameters(recurse=False)))


def erf_summary(result) -> dict[str, Any]:
    """Flat numbers of one :class:`erf.ERFResult`: ERF size, moments sigma per axis, anisotropy
    (fit sigma_major / sigma_minor), sigma_row / sigma_col, ERF/TRF, TRF size, fit sigma, r2, theta."""
    def num(v):
        return None if v is None or not np.isfinite(v) else float(v)

    out: dict[str, Any] = {"n": int(result.n)}
    if not np.any(result.nonnegative_map > 0):  # a dead network (every ReLU off): nothing to measure
        import warnings

        warnings.warn("the ERF map is all zeros (dead units?): its size, moments and fit are undefined", stacklevel=2)
        return {"n": int(result.n), "erf_size": None, "sigma": [None] * result.ndim_spatial, "sigma_ratio": None,
                "anisotropy": None, "erf_trf": None, "trf_size": None, "fit": None}
    try:
        met = result.metrics
    except Exception:  # noqa: BLE001 - a map that cannot be analysed still gets its moments
        met = {}
    mom = result.moments
    out["erf_size"] = num(met.get("erf_size"))
    out["sigma"] = [float(s) for s in mom.sigma]
    out["sigma_ratio"] = float(mom.sigma[0] / mom.sigma[1]) if len(mom.sigma) > 1 and mom.sigma[1] > 0 else None
    out["anisotropy"] = num(met.get("anisotropy"))
    ratio = met.get("erf_trf_ratio")
    out["erf_trf"] = num(ratio["overall"]) if ratio else None
    trf = result.trf
    out["trf_size"] = list(trf.size) if trf is not None else None
    fit = result.fit
    out["fit"] = None if fit is None else {"sigma": [float(s) for s in fit.sigma], "r2": float(fit.r2),
                                           "theta_deg": float(fit.theta_deg),
                                           "sigma_major": float(fit.sigma_major), "sigma_minor": float(fit.sigma_minor)}
    return out


def find_feature_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The path of the last module (in order of completion) whose output is a tensor with spatial
    axes all > 1: the classifier's last spatial feature map. ``""`` when that is the model output."""
    found: list[str] = []
    hooks = []
    for path, m in model.named_modules():
        def hook(_m, _i, out, path=path):
            if isinstance(out, torch.Tensor) and out.dim() >= 3 and all(s > 1 for s in out.shape[2:]):
                found.append(path)
        hooks.append(m.register_forward_hook(hook))
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(x[:1])
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    if not found:
        raise ValueError("model: no layer outputs a spatial feature map (N, C, H, W); pass erf_layer=")
    return found[-1]


# ------------------------------------------------------------------------------ data
def _check_pair(item, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, (list, tuple)) and len(item) >= 2 and isinstance(item[0], torch.Tensor) \
            and isinstance(item[1], torch.Tensor):
        return item[0], item[1]
    kind = type(item).__name__ if not isinstance(item, (list, tuple)) else f"{type(item).__name__} of {len(item)}"
    raise ValueError(f"{what}: a DataLoader must yield (inputs, labels) pairs of tensors; it yielded a {kind} "
                     "(a DataLoader without labels cannot train a classifier)")


class _Data:
    """Train and test data: tensors (a generated task) or iterables of (x, y) batches."""

    def __init__(self, task, test, n_train, n_test, size, task_seed, batch_size):
        from erf import tasks as _tasks

        self.batch_size = batch_size
        self.name = None
        self.classes: int | None = None
        self.describe: dict[str, Any] = {}
        if isinstance(task, str):
            task = _tasks.load(task, n_train=n_train, n_test=n_test, size=size, seed=task_seed)
        if isinstance(task, _tasks.Task):
            self.name, self.classes = task.name, task.classes
            self.train_t = (task.x_train, task.y_train)
            self.test_t = (task.x_test, task.y_test)
            self.train_it = self.test_it = None
            self.describe = task.describe()
        elif isinstance(task, (tuple, list)) and len(task) == 2 and all(isinstance(t, torch.Tensor) for t in task):
            self.train_t, self.train_it = (task[0], task[1].long()), None
            self.test_t, self.test_it = None, None
            self.describe = {"name": "tensors", "n_train": len(task[1])}
        elif isinstance(task, Iterable) and not isinstance(task, (str, bytes, torch.Tensor)):
            self.train_t, self.train_it = None, task
            self.test_t, self.test_it = None, None
            self.describe = {"name": type(task).__name__}
        else:
            raise TypeError(f"task must be a task name ({', '.join(_tasks.names())}), an erf.tasks.Task, a pair of "
                            f"tensors (x, y) or a DataLoader of (x, y) batches, got {type(task).__name__}")
        if test is not None:
            if isinstance(test, (tuple, list)) and len(test) == 2 and all(isinstance(t, torch.Tensor) for t in test):
                self.test_t, self.test_it = (test[0], test[1].long()), None
            elif isinstance(test, Iterable):
                self.test_t, self.test_it = None, test
            else:
                raise TypeError(f"test must be a pair of tensors (x, y) or a DataLoader, got {type(test).__name__}")
        first = next(iter(self.batches("train", epoch_seed=None)), None)
        if first is None:
            raise ValueError("task: the training data is empty")
        self.example = first[0][:1]
        if self.test_t is None and self.test_it is None:
            self.describe["test"] = "none: test accuracy is measured on the training data"

    def batches(self, split: str, epoch_seed: int | None):
        """``(x, y)`` batches; tensors are shuffled with a generator keyed by ``epoch_seed`` (None: in order)."""
        t = self.train_t if split == "train" else self.test_t
        it = self.train_it if split == "train" else self.test_it
        if t is None and it is None:  # no test split: evaluate on the training data
            t, it = self.train_t, self.train_it
        if t is not None:
            x, y = t
            n = len(y)
            order = (torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed))
                     if epoch_seed is not None else torch.arange(n))
            for lo in range(0, n, self.batch_size):
                idx = order[lo:lo + self.batch_size]
                yield x[idx], y[idx]
        else:
            for item in it:
                yield _check_pair(item, "task" if split == "train" else "test")

    def erf_images(self, n: int) -> torch.Tensor:
        xs, have = [], 0
        for x, _ in self.batches("test", epoch_seed=None):
            xs.append(x)
            have += len(x)
            if have >= n:
                break
        return torch.cat(xs)[:n]


# ------------------------------------------------------------------------------ result
class TrainingRun:
    """A training run with ERF snapshots.

    Attributes:
        history: one dict per snapshot: ``epoch``, ``loss`` (mean training loss of that epoch; at
            epoch 0 the loss before training), ``train_acc``, ``test_acc``, ``test_loss``, ``erf``
            (``{"task": erf_summary, "gaussian": erf_summary}``) and ``pools`` (:func:`pooling_parameters`).
        erfs: ``{epoch: {"task": ERFResult, "gaussian": ERFResult}}``.
        config: every option (JSON-able); seconds: wall time per epoch (kept out of ``history``).
    """

    def __init__(self, history: list[dict], erfs: dict[int, dict[str, Any]], config: dict,
                 seconds: list[float] | None = None):
        self.history = history
        self.erfs = erfs
        self.config = config
        self.seconds = list(seconds or [])

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else {}
        return (f"TrainingRun(task={self.config.get('task')!r}, snapshots={[h['epoch'] for h in self.history]}, "
                f"test_acc={last.get('test_acc')})")

    @property
    def epochs(self) -> list[int]:
        """The epochs of the snapshots."""
        return [h["epoch"] for h in self.history]

    def table(self) -> list[dict[str, Any]]:
        """One flat row per snapshot (numbers only): accuracies, ERF columns per input kind, pooling parameters."""
        rows = []
        for h in self.history:
            row: dict[str, Any] = {k: h[k] for k in ("epoch", "loss", "train_acc", "test_acc", "test_loss")}
            for kind, e in h["erf"].items():
                row[f"erf_size_{kind}"] = e["erf_size"]
                row[f"sigma_row_{kind}"], row[f"sigma_col_{kind}"] = e["sigma"][0], e["sigma"][-1]
                row[f"anisotropy_{kind}"] = e["anisotropy"]
                row[f"erf_trf_{kind}"] = e["erf_trf"]
                row[f"fit_r2_{kind}"] = e["fit"]["r2"] if e["fit"] else None
            for path, p in h["pools"].items():
                for key, v in p.items():
                    if key == "type":
                        continue
                    if isinstance(v, list):
                        for ax, vv in zip(("h", "w"), v):
                            row[f"{path}.{key}_{ax}"] = vv
                    else:
                        row[f"{path}.{key}"] = v
            rows.append(row)
        return rows

    def to_markdown(self, columns: Sequence[str] | None = None) -> str:
        rows = self.table()
        cols = list(columns or (rows[0].keys() if rows else []))
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self, path) -> str:
        import csv
        import io

        from erf._io import atomic_write_text

        rows = self.table()
        buf = io.StringIO()
        cols = list(rows[0].keys()) if rows else []
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        return atomic_write_text(path, buf.getvalue())

    def to_json(self, path) -> str:
        from erf._io import atomic_write_text

        return atomic_write_text(path, json.dumps({"config": self.config, "history": self.history,
                                                   "seconds": self.seconds}, indent=1, allow_nan=False) + "\n")

    def plot(self, kinds: Sequence[str] | None = None):
        """Figure: the ERF at each snapshot (one row per input kind, all on one colour scale: each map
        as a share of its mass), and curves of accuracy, ERF size, anisotropy and DynOPool r."""
        from erf.studies._figures import training_figure

        return training_figure(self, kinds=kinds)

    # -- persistence
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for epoch, by_kind in self.erfs.items():
            for kind, res in by_kind.items():
                arrays.update(_erf_arrays(res, f"erf/{epoch}/{kind}/"))
        arrays["run"] = np.array(json.dumps({"format": RUN_FORMAT, "config": self.config, "history": self.history,
                                             "seconds": self.seconds}))
        return arrays

    def save(self, path: str | os.PathLike) -> str:
        """Write one ``.npz``: the ERF maps of every snapshot and the history/config as JSON (no pickle)."""
        path = _npz_path(path)
        from erf.engine import atomic_savez

        atomic_savez(path, self._arrays())
        return path

    def save_erfs(self, folder: str | os.PathLike, prefix: str = "erf") -> list[str]:
        """Each snapshot's ERF as its own :meth:`erf.ERFResult.save` file: ``PREFIX_eEPOCH_KIND.npz``."""
        return [res.save(os.path.join(os.fspath(folder), f"{prefix}_e{epoch}_{kind}.npz"))
                for epoch, by_kind in self.erfs.items() for kind, res in by_kind.items()]


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "—" if not math.isfinite(v) else format(v, ".4g")
    return str(v)


def _npz_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike ending in .npz, got {type(path).__name__}")
    path = os.fspath(path)
    return path if path.endswith(".npz") else path + ".npz"


def _erf_arrays(res, prefix: str) -> dict[str, np.ndarray]:
    from erf.engine import FORMAT_VERSION

    meta = dict(res.meta)
    meta.update({"format": FORMAT_VERSION, "n": res.n, "unit": list(res.unit), "layer": res.layer,
                 "input_shape": list(res.input_shape), "config": res.config})
    trf = res.trf
    if trf is not None and hasattr(trf, "to_dict"):
        meta["trf"] = trf.to_dict()
    return {prefix + "map": res.map, prefix + "m2": res.m2, prefix + "meta": np.array(json.dumps(meta))}


def _erf_from(z, prefix: str):
    from erf.engine import ERFResult
    from erf.trf import RFReport

    meta = json.loads(str(z[prefix + "meta"]))
    trf = RFReport.from_dict(meta["trf"]) if meta.get("trf") else None
    return ERFResult(meta["n"], z[prefix + "map"], z[prefix + "m2"], unit=tuple(meta["unit"]), layer=meta["layer"],
                     input_shape=tuple(meta["input_shape"]), config=meta["config"], meta=meta, trf=trf)


def _read_run(z) -> TrainingRun:
    info = json.loads(str(z["run"]))
    if info.get("format") != RUN_FORMAT:
        raise ValueError(f"training run format {info.get('format')!r}, expected {RUN_FORMAT}")
    erfs: dict[int, dict[str, Any]] = {}
    for key in z.files:
        if key.startswith("erf/") and key.endswith("/meta"):
            _, epoch, kind, _ = key.split("/")
            erfs.setdefault(int(epoch), {})[kind] = _erf_from(z, f"erf/{epoch}/{kind}/")
    erfs = {e: {k: erfs[e][k] for k in sorted(erfs[e], key=lambda k: (_ERF_KINDS + (k,)).index(k))}
            for e in sorted(erfs)}
    return TrainingRun(info["history"], erfs, info["config"], info.get("seconds"))


def load_run(path: str | os.PathLike) -> TrainingRun:
    """Restore a :class:`TrainingRun` written by :meth:`TrainingRun.save` (or a training checkpoint)."""
    path = _npz_path(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: no such training-run file {path!r}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return _read_run(z)
    except (KeyError, OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"path: {path!r} is not an erf training-run file ({exc})") from None


# ------------------------------------------------------------------------------ checkpoint
def _flatten_optimizer(state: dict) -> tuple[dict, dict[str, np.ndarray]]:
    arrays: dict[str, np.ndarray] = {}
    js: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, st in state["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                key = f"opt/{pid}/{k}"
                arrays[key] = v.detach().cpu().numpy()
                entry[k] = {"tensor": key, "shape0": v.dim() == 0}
            else:
                entry[k] = {"value": v}
        js["state"][str(pid)] = entry
    return js, arrays


def _unflatten_optimizer(js: dict, z) -> dict:
    state = {}
    for pid, entry in js["state"].items():
        st = {}
        for k, v in entry.items():
            st[k] = torch.from_numpy(np.array(z[v["tensor"]])) if "tensor" in v else v["value"]
        state[int(pid)] = st
    return {"state": state, "param_groups": js["param_groups"]}


def _save_checkpoint(path: str, run: TrainingRun, model: nn.Module, opt, epoch: int, fingerprint: dict) -> None:
    from erf.engine import atomic_savez

    arrays = run._arrays()
    for k, v in model.state_dict().items():
        arrays[f"model/{k}"] = v.detach().cpu().numpy()
    opt_js, opt_arrays = _flatten_optimizer(opt.state_dict())
    arrays.update(opt_arrays)
    arrays["rng/torch"] = torch.get_rng_state().numpy()
    arrays["ckpt"] = np.array(json.dumps({"epoch": epoch, "fingerprint": fingerprint, "optimizer": opt_js}))
    atomic_savez(path, arrays)


def _load_checkpoint(path: str, model: nn.Module, opt, fingerprint: dict) -> tuple[TrainingRun, int]:
    with np.load(path, allow_pickle=False) as z:
        if "ckpt" not in z.files:
            raise ValueError(f"checkpoint: {path!r} is not a training checkpoint")
        info = json.loads(str(z["ckpt"]))
        if info["fingerprint"] != fingerprint:
            diff = sorted(k for k in set(info["fingerprint"]) | set(fingerprint)
                          if info["fingerprint"].get(k) != fingerprint.get(k))
            raise ValueError(f"checkpoint: {path!r} was written by a different run (differs in {', '.join(diff)}); "
                             "use another path or the same options")
        run = _read_run(z)
        state = {k[len("model/"):]: torch.from_numpy(np.array(z[k])) for k in z.files if k.startswith("model/")}
        model.load_state_dict(state)
        opt.load_state_dict(_unflatten_optimizer(info["optimizer"], z))
        torch.set_rng_state(torch.from_numpy(np.array(z["rng/torch"])))
    return run, int(info["epoch"])


# ------------------------------------------------------------------------------ train
def _check_epochs(epochs, erf_every):
    for name, v in (("epochs", epochs), ("erf_every", erf_every)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def snapshot_epochs(epochs: int, erf_every: int) -> list[int]:
    """Epochs with an ERF snapshot: 0, every ``erf_every`` epochs, and the last."""
    _check_epochs(epochs, erf_every)
    out = list(range(0, epochs + 1, erf_every))
    return out if out[-1] == epochs else out + [epochs]


def _make_optimizer(optimizer, model: nn.Module, lr: float, pool_lr: float | None, weight_decay: float):
    pool_params, other = [], []
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owner = type(m).__module__.startswith("erf.pooling") and not isinstance(m, nn.modules.conv._ConvNd)
            (pool_params if owner else other).append(p)
    groups = [{"params": other}]
    if pool_params:
        groups.append({"params": pool_params, "lr": lr if pool_lr is None else pool_lr, "weight_decay": 0.0})
    if callable(optimizer):
        return optimizer(groups)
    if optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam', 'sgd' or a callable(param_groups) -> Optimizer, got {optimizer!r}")


def _evaluate(model, data: _Data, split: str, device, classes: int) -> tuple[float, float]:
    model.eval()
    total, correct, loss = 0, 0, 0.0
    with torch.no_grad():
        for x, y in data.batches(split, epoch_seed=None):
            out = model(x.to(device))
            _check_output(out, y, classes)
            loss += float(nn.functional.cross_entropy(out, y.to(device), reduction="sum"))
            correct += int((out.argmax(1).cpu() == y).sum())
            total += len(y)
    return loss / max(total, 1), correct / max(total, 1)


def _check_output(out, y, classes: int | None) -> None:
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: a classifier must return logits (N, classes); it returned {shape}")
    if classes is not None and out.shape[1] != classes:
        raise ValueError(f"model: its output has {out.shape[1]} classes per sample but the task has {classes}; "
                         f"give the model a {classes}-way head")
    if y.numel() and int(y.max()) >= out.shape[1]:
        raise ValueError(f"model: its output has {out.shape[1]} classes but the data has label {int(y.max())}")


def _measure(model, data: _Data, layer: str, kinds, n: int, reduce: str, device, seed: int) -> dict[str, Any]:
    from erf.engine import effective_rf

    shape = tuple(data.example.shape[1:])
    out = {}
    with torch.random.fork_rng(devices=[]):
        for kind in kinds:
            inputs = data.erf_images(n) if kind == "task" else "gaussian"
            out[kind] = effective_rf(model, shape, layer=layer or None, inputs=inputs, n_inputs=n, reduce=reduce,
                                     device=device, seed=seed, progress=False)
    return out


def train(model: nn.Module, task, epochs: int = 5, erf_every: int = 1, *, test=None, n_train: int = 1024,
          n_test: int = 256, size: int = 32, task_seed: int = 0, batch_size: int = 64, lr: float = 1e-3,
          optimizer: str | Callable = "adam", weight_decay: float = 0.0, pool_lr: float | None = None,
          dynopool_cost: float = 0.0, seed: int = 0, erf_layer: str | None = None,
          erf_inputs: Sequence[str] = _ERF_KINDS, erf_n: int = 16, erf_reduce: str = "abs", device=None,
          checkpoint: str | os.PathLike | None = None, resume: bool = False, progress: bool = False,
          callback: Callable[[TrainingRun, int], None] | None = None) -> TrainingRun:
    """Train a classifier (in place) and measure its ERF at epoch 0, every ``erf_every`` epochs and the last.

    Cross-entropy with Adam (or SGD, momentum 0.9); minibatches shuffled by a generator keyed by
    ``(seed, epoch)``; the global torch RNG (dropout, stochastic pooling) is seeded with ``seed``
    inside a fork, so the caller's RNG is untouched. ERF: :func:`erf.effective_rf` of the centre
    unit of ``erf_layer`` (default: the last spatial feature map), ``reduce=erf_reduce``, on the
    first ``erf_n`` held-out images (``"task"``) and on ``erf_n`` N(0, 1) inputs (``"gaussian"``).
    Luo et al. 2016 (https://arxiv.org/abs/1701.04128), section 4.3.

    Args:
        model: a classifier ``nn.Module`` returning logits ``(N, classes)``; trained in place.
        task: a task name of :mod:`erf.tasks` (generated with ``n_train``, ``n_test``, ``size``,
            ``task_seed``), an :class:`erf.tasks.Task`, tensors ``(x, y)``, or any iterable of
            ``(x, y)`` batches (a DataLoader); ``test`` the held-out data likewise.
        epochs, erf_every: positive ints. pool_lr: learning rate of ``erf.pooling`` parameters
            (default ``lr``). dynopool_cost: weight of DynOPool's size loss (its GMACs term).
        checkpoint, resume: write model, optimiser, RNG and history after every epoch (atomic
            ``.npz``, no pickle); ``resume=True`` continues from it (bit-identical on CPU).
        callback: ``callback(run, epoch)`` after each epoch (and its checkpoint).
    Returns:
        :class:`TrainingRun`.
    Raises:
        ValueError, TypeError: unknown task, epochs < 1, a model whose output does not match the
            classes, a DataLoader without labels, a checkpoint of another run.
    """
    from erf.pooling.dynopool import dynopool_size_loss

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a classifier), got {type(model).__name__}")
    snaps = snapshot_epochs(epochs, erf_every)
    for name, v in (("erf_n", erf_n), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    kinds = tuple(erf_inputs)
    if not kinds or any(k not in _ERF_KINDS for k in kinds):
        raise ValueError(f"erf_inputs must name some of {_ERF_KINDS}, got {erf_inputs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=PATH")
    data = _Data(task, test, n_train, n_test, size, task_seed, batch_size)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev)
    model.eval()
    with torch.no_grad():
        out = model(data.example.to(dev))
    _check_output(out, torch.zeros(0, dtype=torch.long), data.classes)
    classes = data.classes or int(out.shape[1])
    layer = find_feature_layer(model, data.example.to(dev)) if erf_layer is None else erf_layer
    config = {"task": data.name or data.describe.get("name"), "data": data.describe, "epochs": epochs,
              "erf_every": erf_every, "snapshots": snaps, "batch_size": batch_size, "lr": lr,
              "optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "callable"),
              "weight_decay": weight_decay, "pool_lr": pool_lr, "dynopool_cost": dynopool_cost, "seed": seed,
              "erf_layer": layer, "erf_inputs": list(kinds), "erf_n": erf_n, "erf_reduce": erf_reduce,
              "model": type(model).__name__, "classes": classes, "input_shape": list(data.example.shape[1:])}
    fingerprint = {k: v for k, v in config.items() if k not in ("epochs", "snapshots")}
    fingerprint["model_params"] = sum(p.numel() for p in model.parameters())
    opt = _make_optimizer(optimizer, model, lr, pool_lr, weight_decay)
    ckpt = None if checkpoint is None else _npz_path(checkpoint)
    run = TrainingRun([], {}, config)
    start = 0
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        if resume and ckpt is not None and os.path.isfile(ckpt):
            old, start = _load_checkpoint(ckpt, model, opt, fingerprint)
            run = TrainingRun(old.history, old.erfs, config, old.seconds)
            model.to(dev)
        use_size_loss = dynopool_cost > 0
        running_loss = float("nan")
        for epoch in range(start, epochs + 1):
            t0 = time.perf_counter()
            if epoch > 0:
                model.train()
                total, n_seen = 0.0, 0
                for x, y in data.batches("train", epoch_seed=seed * 100003 + epoch):
                    x, y = x.to(dev), y.to(dev)
                    out = model(x)
                    _check_output(out, y, data.classes)
                    loss = nn.functional.cross_entropy(out, y)
                    objective = loss + dynopool_cost * dynopool_size_loss(model) if use_size_loss else loss
                    opt.zero_grad(set_to_none=True)
                    objective.backward()
                    opt.step()
                    total += float(loss.detach()) * len(y)
                    n_seen += len(y)
                running_loss = total / max(n_seen, 1)
            if epoch in snaps:
                train_loss, train_acc = _evaluate(model, data, "train", dev, classes)
                test_loss, test_acc = _evaluate(model, data, "test", dev, classes)
                erfs = _measure(model, data, layer, kinds, erf_n, erf_reduce, dev, seed)
                run.erfs[epoch] = erfs
                run.history.append({"epoch": epoch, "loss": train_loss if epoch == 0 else running_loss,
                                    "train_acc": train_acc, "test_acc": test_acc, "test_loss": test_loss,
                                    "erf": {k: erf_summary(r) for k, r in erfs.items()},
                                    "pools": pooling_parameters(model)})
                if progress:
                    h = run.history[-1]
                    print(f"epoch {epoch}: loss {h['loss']:.4f} train {train_acc:.3f} test {test_acc:.3f} "
                          f"ERF {h['erf'][kinds[0]]['erf_size']}", flush=True)
            run.seconds.append(time.perf_counter() - t0)
            if ckpt is not None:
                _save_checkpoint(ckpt, run, model, opt, epoch + 1, fingerprint)
            if callback is not None:
                callback(run, epoch)
    model.eval()
    return run
