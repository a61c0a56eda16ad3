"""The ``bnctl`` command: ``bnctl demo``, ``bnctl compare``, ``bnctl inspect`` and ``bnctl report``.

The only module of bnctl that prints. ``main(argv)`` returns the exit status:
0 on success, 1 when ``inspect`` or ``report`` finds problems or no setting of
``compare`` finished, 2 for a usage error or a file or module it cannot read
(one line on stderr, no traceback). A reader that closes the pipe early
(``bnctl inspect model.pt | head -1``) ends the output quietly; the status
stays what the command found.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXAMPLES = """examples:
  bnctl demo                      # the full run (about 30 s on 2 cores), results in ./bnctl-out
  bnctl demo --quick --out /tmp/d # a smaller run (about 10 s)
  bnctl compare --model mymodels:pretrained --data mydata:loaders --steps 50
                                  # which BatchNorm setting, measured on your model and data
  bnctl inspect model.pt          # check the BatchNorm statistics of a checkpoint
  bnctl inspect model.pt --json   # the same, as JSON
  bnctl report model.pt           # per layer: what is wrong and what to do about it
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnctl",
        description="Explicit, per-layer control over BatchNorm in PyTorch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,compare,inspect,report}")
    demo = sub.add_parser(
        "demo",
        help="measure what BatchNorm settings do, on real data (scikit-learn's digits)",
        description="Part A: what each setting really does. Part B: domain shift and "
        "adaptation. Prints tables; writes results.json and results.png.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--quick", action="store_true", help="fewer seeds and steps (about 10 s)")
    demo.add_argument("--seed", type=int, default=0, help="first random seed (default 0)")
    demo.add_argument("--seeds", type=int, default=None, help="number of seeds (default 10, 3 with --quick)")
    demo.add_argument("--out", default="bnctl-out", help="output folder (default ./bnctl-out)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    compare = sub.add_parser(
        "compare",
        help="fine-tune copies of your model under each BatchNorm setting and compare them",
        description="Fine-tunes a copy of the model under each setting, from the same weights and data order, "
        "evaluates each, prints a table with the best setting and how sure that is, and writes results.json "
        "and results.png. MOD is a module path importable from the current folder (as with python -m).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("--model", required=True, metavar="MOD:FACTORY",
                         help="a function that returns the (pretrained) model, e.g. mymodels:pretrained")
    compare.add_argument("--data", required=True, metavar="MOD:LOADERS",
                         help="a function that returns (train, val): iterables of (input, target) batches")
    compare.add_argument("--settings", default=None, metavar="A,B,...",
                         help="comma-separated settings, each [recalibrate+]PRESET[+fold] (default: torch, frozen, "
                         "frozen_stats, running_update, recalibrate+frozen_stats)")
    compare.add_argument("--steps", type=int, default=100, help="fine-tuning steps per setting (default 100)")
    compare.add_argument("--seeds", default="0", metavar="S,S,...",
                         help="comma-separated seeds; several give mean ± std (default 0)")
    compare.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam",
                         help="adam (the default), adamw or sgd (momentum 0.9)")
    compare.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    compare.add_argument("--cycle", action="store_true", help="start the training data again when it ends")
    compare.add_argument("--out", default="bnctl-compare", help="output folder (default ./bnctl-compare)")
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")
    inspect = sub.add_parser(
        "inspect",
        help="check the BatchNorm statistics of a checkpoint (read with weights_only=True)",
        description="Lists each BatchNorm layer of a state-dict checkpoint and flags problems. "
        "Exit status: 0 no problems, 1 problems found, 2 unreadable file.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("path", help="a .pt/.pth file holding a state dict")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report = sub.add_parser(
        "report",
        help="what to do about each BatchNorm layer of a checkpoint (read with weights_only=True)",
        description="Per BatchNorm layer (and bnctl domain) of a state-dict checkpoint: channels, batches "
        "tracked, and for each problem what to do about it. Exit status: 0 nothing to do, 1 problems found, "
        "2 unreadable file.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("path", help="a .pt/.pth file holding a state dict")
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _print(*args: object) -> None:
    """``print`` to stdout, quietly dropping what a reader that closed the pipe no longer wants."""
    try:
        print(*args)
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so later output and the interpreter's final flush go nowhere, silently."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a file (a test's capture): nothing will flush to a closed pipe
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _error(message: str) -> int:
    print(f"bnctl: error: {' '.join(message.split())}", file=sys.stderr)  # always one line
    return 2


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    cfg = demo.Config.quick() if args.quick else demo.Config()
    if args.seeds is not None:
        if args.seeds < 1:
            return _error(f"--seeds: expected a positive number, got {args.seeds}.")
        cfg.seeds = args.seeds
    try:
        result = demo.run(args.out, quick=args.quick, seed=args.seed,
                          progress=False if args.no_progress else None, config=cfg)
    except ImportError as err:
        return _error(str(err))
    except OSError as err:
        return _error(f"--out: cannot write results to {args.out!r} ({err.strerror or err}).")
    _print("Part A: a few SGD steps on the digits under each setting; what happened to the first "
          "BatchNorm layer (measured)\n")
    _print(demo.format_part_a(result["part_a"]))
    _print()
    _print(demo.format_part_a_notes())
    _print(f"\nPart B: domain shift, target and source accuracy after adaptation, mean ± std over "
          f"{cfg.seeds} seeds\n")
    _print(demo.format_part_b(result["summary"]))
    files = result["files"]
    _print(f"\nwrote {files['json']}")
    if "png" in files:
        _print(f"wrote {files['png']}")
    else:
        _print("no plot: matplotlib is not installed (pip install 'bnctl[demo]')")
    _print(f"took {result['seconds']:.0f} s")
    return 0


def _load(spec: str, option: str) -> Any:
    """The object ``MOD:NAME`` names, imported with the current folder on ``sys.path`` (as ``python -m`` does).

    Raises:
        ValueError: a malformed spec, a module that cannot be imported, or a missing name (one line).
    """
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"{option}: expected MOD:NAME (a module path and a function in it), got {spec!r}.")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module may raise anything while importing
        raise ValueError(f"{option}: could not import {module_name!r} ({type(err).__name__}: {err}). Run bnctl "
                         "from the folder that holds it, or install it.") from err
    try:
        return functools.reduce(getattr, name.split("."), module)
    except AttributeError:
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ValueError(f"{option}: module {module_name!r} has no {name!r}; its functions and classes: "
                         f"{public[:15]}{' ...' if len(public) > 15 else ''}.") from None


_OPTIMIZERS = {"sgd": ("SGD", {"momentum": 0.9}), "adam": ("Adam", {}), "adamw": ("AdamW", {})}


def _compare(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from .compare import DEFAULT_SETTINGS, as_setting, compare
    from .demo import check_writable

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        return _error(f"--seeds: expected comma-separated integers, got {args.seeds!r}.")
    if not seeds:
        return _error(f"--seeds: expected at least one seed, got {args.seeds!r}.")
    if args.steps < 1:
        return _error(f"--steps: expected a positive number, got {args.steps}.")
    if not args.lr > 0:
        return _error(f"--lr: expected a positive learning rate, got {args.lr}.")
    names = DEFAULT_SETTINGS if args.settings is None else [s.strip() for s in args.settings.split(",") if s.strip()]
    try:
        settings = [as_setting(name) for name in names]
        factory, loaders = _load(args.model, "--model"), _load(args.data, "--data")
    except ValueError as err:
        return _error(str(err))
    if not settings:
        return _error(f"--settings: expected at least one setting, got {args.settings!r}.")
    try:
        model = factory()
    except Exception as err:
        return _error(f"--model: {args.model}() raised {type(err).__name__}: {err}")
    if not isinstance(model, nn.Module):
        return _error(f"--model: expected {args.model}() to return a torch.nn.Module, got {type(model).__name__}.")
    try:
        data = loaders()
    except Exception as err:
        return _error(f"--data: {args.data}() raised {type(err).__name__}: {err}")
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        size = f" of length {len(data)}" if isinstance(data, (tuple, list)) else ""
        return _error(f"--data: expected {args.data}() to return a pair (train, val) of iterables of batches, "
                      f"got {type(data).__name__}{size}.")
    try:
        check_writable(Path(args.out))
    except OSError as err:
        return _error(f"--out: cannot write results to {args.out!r} ({err.strerror or err}).")
    cls, options = _OPTIMIZERS[args.optimizer]
    optimizer = functools.partial(getattr(torch.optim, cls), lr=args.lr, **options)
    try:
        result = compare(model, data[0], data[1], settings=settings, steps=args.steps, seeds=seeds,
                         optimizer=optimizer, cycle=args.cycle, progress=False if args.no_progress else None)
    except (ValueError, TypeError, RuntimeError) as err:
        return _error(str(err))
    _print(result)
    out = Path(args.out)
    _print(f"\nwrote {result.to_json(out / 'results.json')}")
    try:
        _print(f"wrote {result.plot(out / 'results.png')}")
    except ImportError:
        _print("no plot: matplotlib is not installed (pip install 'bnctl[demo]')")
    if not result.complete:
        _print("interrupted: the table holds the settings that finished")
        return 130
    return 0 if result.best is not None else 1


def _checked(path: str, check: Any) -> tuple[dict, Any] | int:
    """``(state dict, check(state dict))`` of the checkpoint at ``path``, or the exit status of the one-line
    error (2) for anything it cannot read or check."""
    from .checkpoint_files import CheckpointError, load_state_dict

    try:
        state = load_state_dict(path)
    except CheckpointError as err:
        return _error(str(err))
    try:
        return state, check(state)
    except Exception as err:  # the promise: one line and exit 2 for anything it cannot read
        return _error(f"{path}: could not check the BatchNorm statistics ({type(err).__name__}: {err}).")


def _inspect(args: argparse.Namespace) -> int:
    from .checkpoint_files import check_checkpoint, checks_as_records

    loaded = _checked(args.path, check_checkpoint)
    if isinstance(loaded, int):
        return loaded
    state, checks = loaded
    problems = sum(len(c.problems) for c in checks)
    if args.json:
        _print(json.dumps({"path": args.path, "layers": checks_as_records(checks),
                          "problems": problems}, indent=2))
        return 1 if problems else 0
    if not checks:
        _print(f"{args.path}: no BatchNorm layers found ({len(state)} tensors)")
        return 0
    names = [c.name if c.domain == "default" else f"{c.name} [{c.domain}]" for c in checks]
    width = max(len("layer"), *(len(n) for n in names))
    _print(f"{'layer'.ljust(width)}  {'channels':>8}  {'batches':>9}  problems")
    for name, c in zip(names, checks):
        nbt = "-" if c.num_batches_tracked is None else str(c.num_batches_tracked)
        _print(f"{name.ljust(width)}  {c.channels:>8}  {nbt:>9}  {'; '.join(c.problems) or 'ok'}")
    flagged = sum(1 for c in checks if c.problems)
    _print(f"{len(checks)} BatchNorm layer(s), {flagged} with problems, {problems} problem(s)")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bnctl`` command line; returns the exit status."""
    try:
        return _run(argv)
    except BrokenPipeError:  # only argparse's own output (--help) gets here: commands print with _print
        _drop_stdout()
        return 0


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 for --help
        return int(exc.code or 0)
    if args.command == "demo":
        return _demo(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "report":
        return _report(args)
    parser.print_help()
    return 2


def _report(args: argparse.Namespace) -> int:
    from .report import checkpoint_report

    loaded = _checked(args.path, checkpoint_report)
    if isinstance(loaded, int):
        return loaded
    state, result = loaded
    problems = len(result.warnings)
    if args.json:
        _print(json.dumps({"path": args.path, "layers": result.records(), "problems": problems}, indent=2))
    elif not result.layers:
        _print(f"{args.path}: no BatchNorm layers found ({len(state)} tensors)")
    else:
        _print(result)
    return 1 if problems else 0
