"""Build an argparse CLI from dataclasses, so `--help` lists every field and defaults live only in the dataclass.

    @dataclass
    class TrainArgs:
        lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    targs, = parse_args(argv, TrainArgs, description=__doc__)   # --lr 1e-4

Field `max_steps` becomes `--max-steps`; bools become `--x/--no-x`; `tuple[str, ...]` takes a comma list;
`metadata={"choices": [...]}` limits values. A `ValueError` from `__post_init__` exits with the message (status 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path


def _base_type(tp):
    """(type, optional) for an annotation such as `int | None` or `Optional[Path]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union annotation {tp}")
        return args[0], True
    return tp, False


def _converter(tp, name: str):
    """A function str -> value for argparse, with an error that names the flag."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        item = typing.get_args(tp)[0] if typing.get_args(tp) else str
        conv = _converter(item, name)
        return lambda s: tuple(conv(x.strip()) for x in s.split(",") if x.strip())
    if origin is typing.Literal:
        return str
    if tp in (int, float, str, Path):
        return tp
    raise TypeError(f"field {name}: unsupported type {tp}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, seen: set[str] | None = None) -> None:
    """Add one flag per field of dataclass `cls` to `parser`."""
    hints = typing.get_type_hints(cls)
    seen = set() if seen is None else seen
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_") or f.metadata.get("cli") is False:
            continue
        if f.name in seen:
            raise ValueError(f"field {f.name} appears in two dataclasses of one CLI")
        seen.add(f.name)
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _base_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        help_ = f.metadata.get("help", "")
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = f"{help_} (default: {shown})" if help_ else f"(default: {shown})"
        kw = dict(dest=f.name, default=default, help=help_)
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        choices = f.metadata.get("choices")
        if typing.get_origin(tp) is typing.Literal:
            choices = list(typing.get_args(tp))
        conv = _converter(tp, f.name)
        if optional or not isinstance(conv, type):
            inner = conv

            def conv(s, inner=inner, optional=optional):
                return None if optional and s.lower() in ("none", "") else inner(s)
            conv.__name__ = getattr(tp, "__name__", "value")  # argparse names the type in its error message
        group.add_argument(flag, type=conv, choices=choices, required=f.metadata.get("required", False), **kw)


def parse_args(argv, *classes, description: str | None = None, parser: argparse.ArgumentParser | None = None,
               positional: list[tuple[str, dict]] | None = None):
    """Parse `argv` into one instance of each dataclass in `classes` (plus the parsed Namespace if positional)."""
    parser = parser or argparse.ArgumentParser(description=description,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, kw in positional or []:
        parser.add_argument(name, **kw)
    seen: set[str] = set()
    for cls in classes:
        add_dataclass_args(parser, cls, seen)
    ns = parser.parse_args(argv)
    out = []
    for cls in classes:
        names = [f.name for f in dataclasses.fields(cls) if f.init and hasattr(ns, f.name)]
        try:
            out.append(cls(**{n: getattr(ns, n) for n in names}))
        except (ValueError, TypeError, FileNotFoundError) as e:
            parser.error(str(e))
    if positional:
        out.append(ns)
    return tuple(out)
