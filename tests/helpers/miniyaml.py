"""Just enough YAML to read docker/docker-compose.yml without PyYAML (not a dependency).

The subset: ``#`` comments, block mappings (``key: value`` and ``key:`` with an
indented block), block sequences of scalars (``- item``), flow sequences of
scalars (``[a, "b c"]``), quoted and plain scalars, ``true``/``false``, integers.
Anything else (anchors, multi-line strings, flow mappings, sequences of
mappings, tabs) raises :class:`MiniYamlError`, which also keeps the compose file
plain.
"""

from __future__ import annotations

import re
from typing import Any


class MiniYamlError(ValueError):
    pass


_KEY = re.compile(r"^([A-Za-z0-9_.\-]+):(?:\s+(.*))?$")


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def scalar(text: str) -> Any:
    text = text.strip()
    if not text:
        raise MiniYamlError("empty value")
    if text[0] in "\"'":
        if len(text) < 2 or text[-1] != text[0]:
            raise MiniYamlError(f"unterminated string: {text}")
        body = text[1:-1]
        if text[0] == '"' and "\\" in body:
            raise MiniYamlError(f"escapes are not supported: {text}")
        return body
    if text[0] in "&*!|>{@`%" or text.startswith("- "):
        raise MiniYamlError(f"unsupported YAML: {text}")
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def _flow_sequence(text: str) -> list[Any]:
    inner = text[1:-1].strip()
    if not inner:
        return []
    items, cur, quote = [], "", ""
    for ch in inner:
        if quote:
            cur += ch
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            cur += ch
        elif ch == ",":
            items.append(cur)
            cur = ""
        elif ch in "[]{}":
            raise MiniYamlError(f"nested flow collections are not supported: {text}")
        else:
            cur += ch
    if quote:
        raise MiniYamlError(f"unterminated string in {text}")
    items.append(cur)
    return [scalar(i) for i in items]


def _value(text: str) -> Any:
    text = text.strip()
    if text.startswith("["):
        if not text.endswith("]"):
            raise MiniYamlError(f"multi-line flow sequences are not supported: {text}")
        return _flow_sequence(text)
    return scalar(text)


def loads(source: str) -> Any:
    lines: list[tuple[int, str, int]] = []
    for no, raw in enumerate(source.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise MiniYamlError(f"line {no}: tab indentation")
        text = _strip_comment(raw)
        if text.strip():
            lines.append((len(text) - len(text.lstrip(" ")), text.strip(), no))
    value, pos = _block(lines, 0, 0)
    if pos != len(lines):
        raise MiniYamlError(f"line {lines[pos][2]}: unexpected indentation")
    return value


def _block(lines: list[tuple[int, str, int]], pos: int, indent: int) -> tuple[Any, int]:
    if pos >= len(lines):
        raise MiniYamlError("missing block")
    if lines[pos][1].startswith("- ") or lines[pos][1] == "-":
        return _sequence(lines, pos, lines[pos][0])
    return _mapping(lines, pos, lines[pos][0])


def _sequence(lines: list[tuple[int, str, int]], pos: int, indent: int) -> tuple[list[Any], int]:
    out = []
    while pos < len(lines) and lines[pos][0] == indent and lines[pos][1].startswith("- "):
        item = lines[pos][1][2:]
        if _KEY.match(item):
            raise MiniYamlError(f"line {lines[pos][2]}: sequences of mappings are not supported")
        out.append(_value(item))
        pos += 1
    if pos < len(lines) and lines[pos][0] > indent:
        raise MiniYamlError(f"line {lines[pos][2]}: unexpected indentation")
    return out, pos


def _mapping(lines: list[tuple[int, str, int]], pos: int, indent: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while pos < len(lines) and lines[pos][0] == indent:
        _, text, no = lines[pos]
        m = _KEY.match(text)
        if not m:
            raise MiniYamlError(f"line {no}: expected `key: value`, got {text!r}")
        key, rest = m.group(1), m.group(2)
        if key in out:
            raise MiniYamlError(f"line {no}: duplicate key {key!r}")
        pos += 1
        if rest is not None and rest.strip():
            out[key] = _value(rest)
        elif pos < len(lines) and lines[pos][0] > indent:
            out[key], pos = _block(lines, pos, lines[pos][0])
        else:
            out[key] = None
    if pos < len(lines) and lines[pos][0] > indent:
        raise MiniYamlError(f"line {lines[pos][2]}: unexpected indentation")
    return out, pos
