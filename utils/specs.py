"""The command-line form of a component with parameters: ``NAME`` or ``NAME:key=value,...``.

Defenses (``--defense clustering:lambda_coeff=1e-3``) and attacks
(``--attacks tbfa_adaptive:loss=margin,scores=preact``) are named this way; values that read as
an integer, a float or true/false are converted, others stay text.
"""

from __future__ import annotations

from typing import Any


def spec_value(text: str) -> Any:
    """``"3"`` -> 3, ``"1e-3"`` -> 0.001, ``"true"`` -> True, anything else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``(name, params)`` of ``NAME[:key=value,...]`` (ValueError for a malformed pair, an empty
    name or a key given twice)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"{spec!r} names nothing: write NAME or NAME:key=value,...")
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"parameters are key=value pairs, got {item!r}")
        if key in params:
            raise ValueError(f"parameter {key!r} is given twice in {spec!r}")
        params[key] = spec_value(value.strip())
    return name, params


def spec_label(name: str, params: dict[str, Any]) -> str:
    """The canonical text of a spec: parameters in sorted order (``parse_spec``'s inverse)."""
    return name + (":" + ",".join(f"{k}={params[k]}" for k in sorted(params)) if params else "")
