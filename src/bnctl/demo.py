"""``bnctl demo``: what BatchNorm settings really do, measured on real data.

Data: scikit-learn's bundled handwritten digits (1,797 real 8x8 images; no
download; ``pip install 'bnctl[demo]'``).

* **Part A** -- for each preset and the two settings people write by hand
  (``bn.eval()``; ``bn.train()`` + ``momentum=0`` + ``requires_grad=False``),
  a few real SGD steps of a small CNN, then measured: which statistics
  normalized, whether the running statistics, ``num_batches_tracked`` and
  weight/bias changed, whether train() and eval() give the same output, and
  whether the setting survives ``model.train()``.
* **Part B** -- domain shift. A small CNN trained on the digits (source) is
  tested on deterministic shifts of held-out digits (inverted, low contrast
  with an offset, additive noise, blur: in the spirit of MNIST-C/CIFAR-10-C)
  as is, after AdaBN (recalibration on unlabeled target data into a separate
  domain), with test-batch statistics, with blended statistics, and after
  fine-tuning on a few labeled target samples per class under several
  presets. Target accuracy and source accuracy after adaptation
  (forgetting), mean and std over seeds.

Both parts run on the engine of :func:`bnctl.compare`: Part A's steps are
:func:`bnctl.compare.fine_tune` and its "changed" columns
:func:`bnctl.compare.batchnorm_drift`; each target of Part B is one
:func:`bnctl.compare` call (fine-tuning settings, and settings with ``steps=0``
that only adapt statistics), with the target and source test sets as its two
validation sets. Everything here computes and returns numbers; :mod:`bnctl.cli`
prints them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .apply import apply, batchnorm_layers
from .compare import Setting, batchnorm_drift, batchnorm_tensors, compare, fine_tune
from .domains import add_domains
from .modules import display_name
from .policy import Policy, get_policy
from .recalibrate import progress_bar, recalibrate
from .scopes import no_update

__all__ = ["load_digits", "measure_setting", "run", "SHIFTS"]

PartASetting = Union[str, Policy, Callable[[nn.Module, nn.Module], None]]
ModuleT = TypeVar("ModuleT", bound=nn.Module)


# -- data ----------------------------------------------------------------------------------


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``(x, y)``: float32 ``(1797, 1, 8, 8)`` in [0, 1], int64 labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ImportError(
            "bnctl demo needs scikit-learn for its bundled digits data: "
            "pip install 'bnctl[demo]'"
        ) from err
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def _blur(x: Tensor) -> Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16.0).view(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)


def _noise(x: Tensor, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (x + 0.35 * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)


SHIFTS: dict[str, tuple[str, Callable[[Tensor, int], Tensor]]] = {
    "inverted": ("1 - x", lambda x, seed: 1.0 - x),
    "low_contrast": ("0.3 x + 0.5", lambda x, seed: 0.3 * x + 0.5),
    "noise": ("x + N(0, 0.35^2), clipped to [0, 1]", _noise),
    "blur": ("3x3 binomial blur", lambda x, seed: _blur(x)),
}
"""Target domains: name -> (description, deterministic function of (images, seed))."""


def small_cnn(channels: int = 16) -> nn.Sequential:
    """Conv-BN-ReLU x3 with pooling and a linear head, for 1x8x8 inputs and 10 classes."""
    c = channels
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 10),
    )


def _batches(x: Tensor, y: Tensor, size: int, gen: torch.Generator) -> Iterable[tuple[Tensor, Tensor]]:
    order = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x) - size + 1, size):  # drop_last: BatchNorm needs > 1 value
        idx = order[i : i + size]
        yield x[idx], y[idx]


def train(model: ModuleT, x: Tensor, y: Tensor, epochs: int, seed: int, lr: float = 3e-3) -> ModuleT:
    """Plain supervised training (Adam, batches of 64)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for xb, yb in _batches(x, y, 64, gen):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


# -- part A ----------------------------------------------------------------------------------


def forum_eval(model: nn.Module, bn: nn.Module) -> None:
    """The forum's setting 1: ``bn.eval()``."""
    bn.eval()


def forum_momentum0(model: nn.Module, bn: nn.Module) -> None:
    """The forum's setting 2: ``bn.train()``, ``momentum=0``, weight/bias ``requires_grad=False``."""
    bn.train()
    cast(_BatchNorm, bn).momentum = 0.0  # nn.Module does not type momentum; torch's BatchNorm base does
    bn.weight.requires_grad = False
    bn.bias.requires_grad = False


def _normalizes_with(model: nn.Module, bn: nn.Module, x: Tensor) -> str:
    """Which statistics ``bn`` normalizes its input with right now (nothing updated)."""
    seen: dict[str, Tensor] = {}
    hook = bn.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    try:
        with torch.no_grad(), no_update(model):
            model(x)
    finally:
        hook.remove()
    h, out = seen["x"], seen["y"]
    # a BatchNorm layer's tensors and eps (nn.Module types attributes only as Tensor | Module)
    mean, var, weight, bias = (cast(Optional[Tensor], getattr(bn, k))
                               for k in ("running_mean", "running_var", "weight", "bias"))
    eps = cast(float, bn.eps)
    running = F.batch_norm(h, mean, var, weight, bias, False, 0.0, eps)
    batch = F.batch_norm(h, None, None, weight, bias, True, 0.0, eps)
    if torch.allclose(out, running, atol=1e-5):
        return "running"
    return "batch" if torch.allclose(out, batch, atol=1e-5) else "other"


def measure_setting(
    model: nn.Module,
    bn: nn.Module,
    setting: PartASetting,
    batches: list[tuple[Tensor, Tensor]],
    probe: Tensor,
) -> dict[str, str]:
    """Apply ``setting`` to ``model`` (a preset, a Policy, or ``fn(model, bn)``), run SGD
    steps on ``batches`` (:func:`bnctl.compare.fine_tune`, lr 0.1), and measure what happened
    to ``bn``. ``model`` is changed."""
    model.train()
    if callable(setting):
        setting(model, bn)
    else:
        apply(model, setting)
    name = next(display_name(n, m) for n, m in batchnorm_layers(model) if m is bn)
    before = batchnorm_tensors(model)
    fine_tune(model, batches, len(batches), optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    drift = next(d for d in batchnorm_drift(before, batchnorm_tensors(model)) if d.name == name)
    used = _normalizes_with(model, bn, probe)
    model.train()  # what a trainer loop does at the start of every epoch
    survives = _normalizes_with(model, bn, probe) == used
    model.eval()
    same_eval = _normalizes_with(model, bn, probe) == used

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    return {
        "normalizes with": used,
        "running stats changed": yes(bool(drift.stats)),
        "num_batches_tracked changed": yes(bool(drift.updates)),
        "weight/bias changed": yes(bool(drift.affine)),
        "train() == eval()": yes(same_eval),
        "survives model.train()": yes(survives),
    }


PART_A_COLUMNS: dict[str, str] = {
    "normalizes with": "statistics the first BatchNorm layer normalized with after the steps, "
                       "in train() (measured against both)",
    "running stats changed": "running_mean/running_var differ after the SGD steps",
    "num_batches_tracked changed": "the batch counter moved (it counts updates, even with momentum 0)",
    "weight/bias changed": "the affine parameters were trained",
    "train() == eval()": "eval() normalizes with the same statistics as train()",
    "survives model.train()": "a trainer loop's model.train() leaves the setting as it was",
}
"""One line of explanation per Part A column, printed under the table."""

PART_A_NOTE = (
    "renorm measures as 'batch': during Batch Renormalization's warm-up (until step 5,000 by default) "
    "r = 1 and d = 0, which is exactly batch-statistics BatchNorm."
)

PART_A_SETTINGS: list[tuple[str, PartASetting]] = [
    ("bn.eval()", forum_eval),
    ("train()+momentum=0+no grad", forum_momentum0),
    *[(f"preset {name}", name) for name in (
        "torch", "frozen", "frozen_stats", "running_update", "batch_no_update", "test_time",
        "recalibrate", "renorm")],
]


def part_a(x: Tensor, y: Tensor, seed: int, epochs: int) -> list[dict[str, str]]:
    """Part A rows: one per setting, every value measured."""
    torch.manual_seed(seed)
    base = train(small_cnn(), x, y, epochs, seed)  # "pretrained" statistics and weights
    gen = torch.Generator().manual_seed(seed + 1)
    batches = list(_batches(x, y, 32, gen))[:3]
    probe = x[:64]
    rows = []
    for label, setting in PART_A_SETTINGS:
        model = copy.deepcopy(base)
        rows.append({"setting": label, **measure_setting(model, model[1], setting, batches, probe)})
    return rows


# -- part B ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    """Sizes of a demo run (``quick`` shrinks them)."""

    seeds: int = 10
    source_epochs: int = 20
    finetune_steps: int = 40
    shots: int = 5  # labeled target samples per class for fine-tuning
    blend_alpha: float = 0.5
    part_a_epochs: int = 5

    @classmethod
    def quick(cls) -> Config:
        return cls(seeds=3, source_epochs=10, finetune_steps=20, part_a_epochs=2)


FINETUNE_PRESETS = ("torch", "frozen", "frozen_stats", "running_update", "renorm")


def _finetune_policy(name: str) -> Policy:
    policy = get_policy(name)
    if name == "renorm":  # the paper's warm-up is 5k steps; a few-shot run has tens
        policy = dataclasses.replace(policy, renorm_warmup=(0, 0))
    return policy


def _few_shot(x: Tensor, y: Tensor, shots: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    order = torch.randperm(len(x), generator=gen)
    picked = [i for c in range(10) for i in [j for j in order.tolist() if int(y[j]) == c][:shots]]
    return x[picked], y[picked]


class RandomBatches:
    """Endless batches of ``size`` samples drawn at random from ``(x, y)``, the same sequence on every pass
    (each iteration starts a generator seeded with ``seed``): few-shot fine-tuning data for
    :func:`bnctl.compare`."""

    def __init__(self, x: Tensor, y: Tensor, size: int, seed: int) -> None:
        self.x, self.y, self.size, self.seed = x, y, size, seed

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            idx = torch.randperm(len(self.x), generator=gen)[: self.size]
            yield self.x[idx], self.y[idx]


def _in_batches(x: Tensor, y: Tensor, size: int = 128) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _adabn(adapt: Tensor) -> Callable[[nn.Module, Any], None]:
    """AdaBN as a ``prepare`` step: a ``"target"`` domain recalibrated on the unlabeled target images."""

    def adabn(model: nn.Module, _data: Any) -> None:
        add_domains(model, ["target"])
        recalibrate(model, [adapt[i : i + 64] for i in range(0, len(adapt) - 1, 64)], domain="target",
                    progress=False)

    return adabn


def part_b_settings(cfg: Config, adapt: Tensor) -> list[Setting]:
    """Part B's methods as :class:`bnctl.Setting` objects: statistics-only adaptations (``steps=0``), then
    few-shot fine-tuning under each of :data:`FINETUNE_PRESETS`."""
    alpha = cfg.blend_alpha
    blend = Policy(alpha, "none", alpha, "none", learn_affine=True, name="test_time_blend")
    return [
        Setting("source model as is", steps=0),
        Setting("AdaBN (target domain)", prepare=_adabn(adapt), steps=0, domain={"target": "target"}),
        Setting("test-batch statistics", "test_time", steps=0),
        Setting(f"blended statistics (alpha={alpha:g})", blend, steps=0),
        *[Setting(f"fine-tune {cfg.shots}/class, {preset}", _finetune_policy(preset)) for preset in FINETUNE_PRESETS],
    ]


def part_b_seed(x: Tensor, y: Tensor, seed: int, cfg: Config,
                tick: Callable[[], None] = lambda: None) -> dict[str, dict[str, dict[str, float]]]:
    """One seed of Part B: ``{target: {method: {"target": acc, "source": acc}}}``, one
    :func:`bnctl.compare` per target."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    n = len(x)
    src_train, src_test = order[: int(0.6 * n)], order[int(0.6 * n) : int(0.8 * n)]
    pool = order[int(0.8 * n) :]
    adapt_idx, test_idx = pool[: len(pool) // 2], pool[len(pool) // 2 :]
    torch.manual_seed(seed)
    source = train(small_cnn(), x[src_train], y[src_train], cfg.source_epochs, seed)
    source_test = _in_batches(x[src_test], y[src_test])
    results: dict[str, dict[str, dict[str, float]]] = {}
    for target, (_desc, shift) in SHIFTS.items():
        xa, ya = shift(x[adapt_idx], seed), y[adapt_idx]
        xt, yt = shift(x[test_idx], seed + 1), y[test_idx]
        xf, yf = _few_shot(xa, ya, cfg.shots, gen)
        result = compare(
            source, RandomBatches(xf, yf, 25, seed),
            {"target": _in_batches(xt, yt), "source": source_test},
            settings=part_b_settings(cfg, xa), steps=cfg.finetune_steps,
            optimizer=functools.partial(torch.optim.Adam, lr=1e-3), seed=seed, progress=False,
        )
        if not result.complete:
            raise KeyboardInterrupt  # compare returns what finished; the demo has nothing to show for a part
        failed = [f"{row.name}: {row.status}" for row in result.rows if not row.finished]
        if failed:
            raise RuntimeError(f"bnctl demo: target {target!r}, seed {seed}: {failed}")
        # every row finished (checked above) on non-empty target and source sets: both metrics are set
        results[target] = {row.name: {"target": cast(float, row.metric("target")),
                                      "source": cast(float, row.metric("source"))}
                           for row in result.rows}
        tick()
    return results


def run(
    out_dir: str | Path | None = "bnctl-out",
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    config: Config | None = None,
) -> dict[str, Any]:
    """Run Part A and Part B; write ``results.json`` (and ``results.png``) to ``out_dir``.

    Returns:
        Everything measured: ``{"config", "part_a", "part_b", "summary", "files", "seconds"}``.
        ``part_b[target][method]`` holds per-seed ``target``/``source`` accuracies;
        ``summary`` their means and standard deviations.

    Raises:
        OSError: ``out_dir`` cannot be created or written (checked before anything runs).
        ImportError: scikit-learn is missing.
    """
    cfg = config or (Config.quick() if quick else Config())
    if out_dir is not None:
        check_writable(Path(out_dir))
    start = time.perf_counter()
    x, y = load_digits()
    bar = progress_bar(1 + cfg.seeds * len(SHIFTS), "bnctl demo", progress)
    tick = (lambda: bar.update(1)) if bar is not None else (lambda: None)
    try:
        rows_a = part_a(x, y, seed, cfg.part_a_epochs)
        tick()
        per_seed = [part_b_seed(x, y, seed + s, cfg, tick) for s in range(cfg.seeds)]
    finally:
        if bar is not None:
            bar.close()
    part_b = {
        t: {m: {k: [r[t][m][k] for r in per_seed] for k in ("target", "source")}
            for m in per_seed[0][t]}
        for t in per_seed[0]
    }
    summary = {
        t: {m: {f"{k}_{stat}": fn(v[k]) for k in ("target", "source")
                for stat, fn in (("mean", statistics.mean), ("std", _std))}
            for m, v in methods.items()}
        for t, methods in part_b.items()
    }
    result: dict[str, Any] = {
        "config": {**dataclasses.asdict(cfg), "seed": seed, "quick": quick,
                   "shifts": {k: d for k, (d, _f) in SHIFTS.items()},
                   "data": "sklearn.datasets.load_digits (1797 8x8 images)"},
        "part_a": rows_a,
        "part_b": part_b,
        "summary": summary,
        "files": {},
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["files"]["json"] = str(out / "results.json")
        plot = _plot(summary, out / "results.png")
        if plot is not None:
            result["files"]["png"] = plot
        (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def check_writable(out: Path) -> None:
    """Create ``out`` if needed and check that a file can be written in it (before minutes of work).

    Raises:
        OSError: it cannot.
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):
        pass


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _plot(summary: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    targets = list(summary)
    methods = list(summary[targets[0]])
    fig, axes = plt.subplots(1, 2, figsize=(16, 5), sharey=True)
    width = 0.8 / len(methods)
    for ax, which, title in ((axes[0], "target", "target accuracy (adaptation)"),
                             (axes[1], "source", "source accuracy after adaptation (forgetting)")):
        for i, m in enumerate(methods):
            means = [summary[t][m][f"{which}_mean"] * 100 for t in targets]
            stds = [summary[t][m][f"{which}_std"] * 100 for t in targets]
            ax.bar([j + i * width for j in range(len(targets))], means, width, yerr=stds, label=m, capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(targets))], targets)
        ax.set_ylim(0, 100)
        ax.set_title(title)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8, bbox_to_anchor=(1.01, 1.0), loc="upper left")
    fig.suptitle("bnctl demo: digits under domain shift (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# -- text ------------------------------------------------------------------------------------


def format_part_a(rows: list[dict[str, str]]) -> str:
    """Part A as an aligned table."""
    cols = list(rows[0])
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
    for r in rows:
        lines.append("  ".join(r[c].ljust(w) if i == 0 else r[c].rjust(w)
                               for i, (c, w) in enumerate(zip(cols, widths))))
    return "\n".join(lines)


def format_part_a_notes() -> str:
    """What Part A's columns mean, and why renorm measures as batch."""
    width = max(len(c) for c in PART_A_COLUMNS)
    lines = [f"  {c.ljust(width)}  {text}" for c, text in PART_A_COLUMNS.items()]
    return "\n".join(lines + [f"  {PART_A_NOTE}"])


def format_part_b(summary: dict[str, Any]) -> str:
    """Part B: one block per target, target and source accuracy as mean ± std."""
    blocks = []
    for target, methods in summary.items():
        width = max(len(m) for m in methods)
        lines = [f"target: {target} ({SHIFTS[target][0]})",
                 f"  {'method'.ljust(width)}  {'target acc':>15}  {'source acc':>15}"]
        for m, v in methods.items():
            t = f"{v['target_mean']:6.1%} ± {v['target_std']:5.1%}"
            s = f"{v['source_mean']:6.1%} ± {v['source_std']:5.1%}"
            lines.append(f"  {m.ljust(width)}  {t:>15}  {s:>15}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
