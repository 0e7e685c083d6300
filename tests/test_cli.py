"""cli.py: dataclass fields become flags, defaults stay in the dataclass, bad values exit with a clear message."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from cli import parse_args


@dataclass
class Args:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    max_steps: int = 10
    name: str = "run"
    out: Path = Path("out")
    pack: bool = True
    targets: tuple[str, ...] = ("wq", "wv")
    limit: int | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    def __post_init__(self):
        if self.max_steps < 0:
            raise ValueError(f"max_steps={self.max_steps} must be >= 0")


def test_defaults_come_from_the_dataclass():
    (a,) = parse_args([], Args)
    assert a == Args()


def test_every_type_parses():
    (a,) = parse_args(["--lr", "1e-4", "--max-steps", "5", "--out", "x", "--no-pack", "--targets", "wq,wk,w1",
                       "--limit", "3", "--precision", "bf16"], Args)
    assert a == Args(lr=1e-4, max_steps=5, out=Path("x"), pack=False, targets=("wq", "wk", "w1"), limit=3,
                     precision="bf16")
    (a,) = parse_args(["--limit", "none"], Args)
    assert a.limit is None


@pytest.mark.parametrize("argv, message", [(["--lr", "abc"], "invalid float value: 'abc'"),
                                           (["--max-steps", "-1"], "max_steps=-1 must be >= 0"),
                                           (["--precision", "fp8"], "invalid choice: 'fp8'")])
def test_bad_values_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv, Args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"], Args)
    out = capsys.readouterr().out
    for flag in ("--lr", "--max-steps", "--name", "--out", "--pack", "--targets", "--limit", "--precision"):
        assert flag in out
    assert "peak learning rate (default: 0.0003)" in out
