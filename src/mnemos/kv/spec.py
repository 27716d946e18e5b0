"""Policies by name: the registry ``POLICIES`` and the command-line grammar of ``mnemos eval --kv-policy``.

A spec is ``NAME[:KEY=VALUE[,KEY=VALUE...]]``: ``snapkv:budget=256,window_size=16``, ``kivi:bits=4``, ``h2o``.
A key may take several values, the items after it that hold no ``=``: ``snapkv:budget=64,128,256,window_size=16``
is a sweep of three policies (several swept keys give every combination, in order). ``A+B`` composes two policies,
an eviction policy then KIVI or ThinK (``h2o:budget=64+kivi:bits=2``, ``snapkv:budget=64+think:pruning_ratio=0.5``;
``mnemos.kv.compose``). ``none`` (or ``full``) is no
policy: the model's own cache.

Values: ``true`` / ``false``; integers (tokens); decimals (ratios); a size with a unit, ``4096B``, ``64KiB``,
``1MiB`` (a ``Bytes`` budget: bytes per sequence and layer); ``0;1`` a tuple of integers (``skip_layers``); anything
else a string (``pooling=maxpool``).
"""

from __future__ import annotations

import inspect
import itertools
import re
from typing import Any, Callable

from mnemos.kv.base import Bytes, Policy
from mnemos.kv.compose import compose
from mnemos.kv.d2o import D2O
from mnemos.kv.eviction import H2O, L2Norm, PyramidKV, SnapKV, StreamingLLM
from mnemos.kv.kivi import KIVI
from mnemos.kv.minicache import MiniCache
from mnemos.kv.perhead import DuoAttention
from mnemos.kv.retrieval import InfLLM, SentenceKV
from mnemos.kv.scissorhands import Scissorhands
from mnemos.kv.think import ThinK

__all__ = ["POLICIES", "NO_POLICY", "PolicySpec", "parse_policy_spec", "register_policy", "spec_text"]

POLICIES: dict[str, Callable[..., Policy]] = {
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "l2norm": L2Norm,
    "kivi": KIVI,
    "think": ThinK,
    "scissorhands": Scissorhands,
    "d2o": D2O,
    "duo": DuoAttention,
    "infllm": InfLLM,
    "sentencekv": SentenceKV,
    "minicache": MiniCache,
}

NO_POLICY = ("none", "full")  # spec names meaning "the model's own cache"

_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def register_policy(name: str, factory: Callable[..., Policy]) -> None:
    """Make ``factory`` (a policy class) available to specs as ``name`` (lower case, once)."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name) or name in NO_POLICY:
        raise ValueError(f"policy name must be lower-case letters, digits, '-' or '_' (not none/full), got {name!r}")
    if name in POLICIES:
        raise ValueError(f"policy {name!r} is already registered")
    POLICIES[name] = factory


class PolicySpec:
    """One policy of a parsed spec: its canonical ``text`` (what results record), its registered ``name`` (``a+b``
    for a composition) and the ``policy`` object (None for ``none``)."""

    def __init__(self, text: str, name: str, policy: Policy | None):
        self.text, self.name, self.policy = text, name, policy

    def __repr__(self) -> str:
        return f"PolicySpec({self.text!r})"


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    m = re.fullmatch(r"(\d+)(B|KiB|MiB|GiB)", text)
    if m:
        return Bytes(int(m.group(1)) * _UNITS[m.group(2)])
    if ";" in text:
        try:
            return tuple(int(x) for x in text.split(";") if x.strip())
        except ValueError:
            raise ValueError(f"{text!r}: a ';'-separated list must hold integers") from None
    try:
        return float(text)
    except ValueError:
        return text


def _fmt(v: Any) -> str:
    if isinstance(v, Bytes):
        n = int(v)
        for unit in ("GiB", "MiB", "KiB"):
            if n % _UNITS[unit] == 0:
                return f"{n // _UNITS[unit]}{unit}"
        return f"{n}B"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return ";".join(map(str, v))
    return str(v)


def spec_text(name: str, kwargs: dict[str, Any]) -> str:
    """The canonical text of one policy: ``snapkv:budget=256,window_size=16`` (keys in the order given)."""
    return name + (":" + ",".join(f"{k}={_fmt(v)}" for k, v in kwargs.items()) if kwargs else "")


def _one(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``NAME[:K=V,...]`` -> every (name, kwargs) of its sweep."""
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)} (or none)")
    values: dict[str, list[Any]] = {}
    key = None
    for item in (x.strip() for x in rest.split(",")):
        if not item:
            continue
        if "=" in item:
            key, _, v = item.partition("=")
            key = key.strip()
            if not key or key in values:
                raise ValueError(f"{text!r}: {'empty' if not key else 'repeated'} parameter name {key!r}")
            values[key] = [_value(v.strip())]
        elif key is None:
            raise ValueError(f"{text!r}: {item!r} has no name; write KEY=VALUE (a bare value continues the previous "
                             "key's list)")
        else:
            values[key].append(_value(item))
    params = inspect.signature(POLICIES[name]).parameters
    unknown = [k for k in values if k not in params or params[k].kind in (params[k].VAR_POSITIONAL,
                                                                          params[k].VAR_KEYWORD)]
    if unknown:
        raise ValueError(f"{name} has no parameter {unknown[0]!r}; its parameters: {', '.join(params)}")
    keys = list(values)
    return [(name, dict(zip(keys, combo, strict=True))) for combo in itertools.product(*(values[k] for k in keys))]


def parse_policy_spec(text: str) -> list[PolicySpec]:
    """Every policy a ``--kv-policy`` spec names (one, or several for a sweep), constructed (so each argument is
    checked by its policy: a ValueError naming it); ``none`` / ``full`` -> ``[PolicySpec("none", "none", None)]``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a policy spec must be a non-empty string, got {text!r}")
    if text.strip().lower() in NO_POLICY:
        return [PolicySpec("none", "none", None)]
    parts = [_one(p) for p in text.split("+")]
    if len(parts) > 2:
        raise ValueError(f"{text!r}: compose at most two policies (an eviction policy + kivi or think)")
    out = []
    for combo in itertools.product(*parts):
        built = []
        for name, kwargs in combo:
            try:
                built.append(POLICIES[name](**kwargs))
            except TypeError as e:  # a wrong value type the constructor did not catch itself
                raise ValueError(f"{spec_text(name, kwargs)}: {e}") from None
        if len(built) == 1:
            policy = built[0]
        else:
            try:
                policy = compose(*built)
            except ValueError as e:
                raise ValueError(f"{text!r}: {e} (compose as EVICTION+kivi or EVICTION+think)") from None
        out.append(PolicySpec("+".join(spec_text(n, kw) for n, kw in combo), "+".join(n for n, _ in combo),
                              policy))
    return out
