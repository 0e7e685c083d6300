r"""The JSON-schema subset this project speaks, defined once here (its keywords and `check_schema`), OpenAI's
response_format read as one of its schemas, and constrained decoding: an incremental recognizer, over UTF-8 bytes, of
one JSON value that matches such a schema. llm.validate checks a finished value against the same subset.

    check_schema(EXTRACT_SCHEMA)   # ValueError naming the path of anything outside the subset, or unsatisfiable
    c = JsonConstraint(EXTRACT_SCHEMA)
    c.accepts(b'{"co')      # may the generator emit this token? (the state is unchanged)
    c.feed(b'{"co')         # emit it; then c.complete: end-of-sequence allowed, c.closed: stop now

The subset: `type` (a name or a non-empty list of names from TYPES), `properties` (a dict of schemas), `required` (a
list of key names), `enum` (at most MAX_ENUM JSON values), `items` (a schema), `minimum`/`maximum` (finite numbers),
`additionalProperties` (a bool or a schema), `minItems`/`maxItems`/`minLength`/`maxLength` (integers >= 0, min <= max),
plus the annotations (description, title, ...), nested at most MAX_DEPTH schemas deep. A schema no value can match (an
empty type list or enum, a closed object requiring a key it does not list) is refused too: decoding under it would
reach a dead end.

The generator asks, for each candidate token, whether its bytes keep the output a prefix of a valid answer, so a
small model cannot write JSON that `llm.validate` rejects. The state is a stack of immutable tuple frames: a check
costs O(len(data)), and a copy shares the stack. What is accepted:
- JSON per RFC 8259. Whitespace (space \t \n \r) before and after the root value and between tokens, at most
  `max_ws` bytes in a row (small models otherwise loop on newlines). Only whitespace may follow the root value.
- Strings: no unescaped `"`, `\` or control byte < 0x20; escapes \" \\ \/ \b \f \n \r \t \uXXXX. Bytes >= 0x80
  pass as they come (the tokenizer's UTF-8 is not checked). Outside strings only ASCII JSON syntax.
  minLength/maxLength (values, not keys) count code points as json.loads makes them: a UTF-8 lead byte (not
  0b10xxxxxx) or an escape is one, and a \uXXXX low surrogate right after a \uXXXX high surrogate joins it
  (so exact for valid UTF-8). The closing quote needs minLength; a character beyond maxLength is refused.
- Numbers: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?; type "integer" (without "number") only -?(0|[1-9][0-9]*).
  A root number is `complete` once it could end but not `closed`, since more digits could follow.
- `type` (absent: any) is checked on the first byte of a value.
  `enum`: the value is one of the candidates exactly as json.dumps(v, ensure_ascii=False, separators=(",", ":"))
  writes them (so "\u00e9" does not match "é", nor a spaced object); candidates the rest of the schema rejects
  are dropped. minimum/maximum are enforced only for an integer with both bounds at most 1024 apart (as the enum
  of its values); otherwise llm.validate checks them afterwards.
- Objects: `properties` keys take their schema, other keys take additionalProperties (False: rejected; a dict: that
  schema; else any value). With additionalProperties False a key is an unused property name exactly as
  json.dumps(k, ensure_ascii=False) writes it; otherwise any string, decoded (escapes included) to pick its schema,
  and a key already used is rejected at its closing quote. `}` needs every `required` key; `,` needs a key that can
  still be added.
- Arrays: every element matches `items` (absent: any); `]` needs minItems elements, `,` and an element need room
  under maxItems.
- `closed`: the root value ended with a byte nothing can extend (`}`, `]`, `"`, true/false/null, a whole enum
  candidate); only whitespace may follow.
"""
from __future__ import annotations

import json
import math
import re

# The subset (this module is standard-library only, so llm.py's API backend can use it without torch)
SCHEMA_KEYWORDS = {"type", "properties", "required", "enum", "items", "minimum", "maximum", "additionalProperties",
                   "minItems", "maxItems", "minLength", "maxLength"}
SCHEMA_ANNOTATIONS = {"description", "title", "default", "examples", "$comment", "$schema"}
SCHEMA_LENGTHS = (("minItems", "maxItems"), ("minLength", "maxLength"))  # non-negative integer bounds, min <= max
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_DEPTH, MAX_ENUM = 32, 1024  # deeper or longer schemas are refused: they cost recursion and decoding time


def check_schema(schema: dict, path: str = "schema") -> None:
    """Raise ValueError, naming the path, if `schema` is outside the subset or no value can match it."""
    _Node(schema, path)


def response_format_schema(fmt) -> dict | None:
    """OpenAI's response_format as a schema of the subset: None for none or "text", {"type": "object"} for
    json_object, the given (checked) schema for json_schema."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise ValueError("response_format.type must be 'text', 'json_object' or 'json_schema'")
    if kind == "text":
        return None
    spec = fmt.get("json_schema")
    schema = {"type": "object"} if kind == "json_object" else spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise ValueError("response_format.json_schema.schema must be a JSON schema object")
    check_schema(schema, "response_format.json_schema.schema")
    return schema


def _check_keywords(schema, path: str, depth: int) -> list[str]:
    """The type names of one (sub-)schema, after checking its keywords and their values (not its sub-schemas)."""
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a schema must be a dict, got {str(schema)[:80]}")
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: schemas nest more than {MAX_DEPTH} deep")
    unknown = set(schema) - SCHEMA_KEYWORDS - SCHEMA_ANNOTATIONS
    if unknown:
        raise ValueError(f"{path}: unsupported JSON-schema keywords {sorted(map(str, unknown))[:8]}; "
                         f"the subset knows {sorted(SCHEMA_KEYWORDS)}")
    types = schema.get("type", list(TYPES))
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or not types or not all(isinstance(t, str) and t in TYPES for t in types):
        raise ValueError(f"{path}.type: {str(types)[:80]} is not a name or non-empty list of names from {list(TYPES)}")
    for key, want in (("properties", dict), ("required", list), ("enum", list)):
        if not isinstance(schema.get(key, want()), want):
            raise ValueError(f"{path}.{key}: expected a {want.__name__}, got {str(schema[key])[:80]}")
    if not all(isinstance(k, str) for k in schema.get("required", [])):
        raise ValueError(f"{path}.required: {str(schema['required'])[:80]} must list key names (strings)")
    if len(schema.get("enum", [])) > MAX_ENUM:
        raise ValueError(f"{path}.enum: {len(schema['enum'])} candidates; at most {MAX_ENUM}")
    for key in ("minimum", "maximum"):
        v = schema.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{path}.{key}: {str(v)[:80]} must be a finite number")
    return types


# Frame kinds; a frame is a tuple whose first item is its kind.
END, VAL, OBJ, ARR, STR, LIT, NUM = range(7)
# Container states: after the opening bracket, after a key (objects), after a member, after a comma.
START, COLON, AFTER, COMMA = range(4)
_WS = frozenset(b" \t\n\r")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrtu')
_PLAIN = re.compile(rb'[^"\\\x00-\x1f]+')  # string bytes that change nothing but the length: skip them in one step
_CONT = bytes(range(0x80, 0xC0))  # UTF-8 continuation bytes: the rest of a character, not one more
_KIND = {ord("{"): "object", ord("["): "array", ord('"'): "string", ord("t"): "boolean", ord("f"): "boolean",
         ord("n"): "null", **dict.fromkeys(b"-0123456789", "number")}
_WORDS = {ord("t"): b"true", ord("f"): b"false", ord("n"): b"null"}


def _number_table(integer: bool) -> list[dict[int, int]]:
    """DFA of RFC 8259 numbers. States: 0 start, 1 after '-', 2 after a leading '0', 3 integer digits,
    4 after '.', 5 fraction digits, 6 after 'e', 7 after the exponent sign, 8 exponent digits."""
    digits, first = b"0123456789", {ord("0"): 2, **dict.fromkeys(b"123456789", 3)}
    table = [{ord("-"): 1, **first}, first, {}, dict.fromkeys(digits, 3), dict.fromkeys(digits, 5),
             dict.fromkeys(digits, 5), {ord("+"): 7, ord("-"): 7, **dict.fromkeys(digits, 8)},
             dict.fromkeys(digits, 8), dict.fromkeys(digits, 8)]
    if not integer:
        for state in (2, 3, 5):
            table[state].update({ord("e"): 6, ord("E"): 6, **({ord("."): 4} if state != 5 else {})})
    return table


_NUMBER, _INTEGER = _number_table(False), _number_table(True)
_ENDS = {2, 3, 5, 8}  # states in which a number may end


class _Node:
    """One compiled (sub-)schema: the kinds a value may start as, and the schemas of its members."""
    __slots__ = ("kinds", "table", "props", "keys", "required", "closed", "extra", "items", "enum", "min_items",
                 "max_items", "min_len", "max_len")

    def __init__(self, schema: dict, path: str, depth: int = 0):
        types = _check_keywords(schema, path, depth)
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        self.kinds = {"number" if t == "integer" else t for t in types}
        self.table = _INTEGER if "integer" in types and "number" not in types else _NUMBER
        self.props = {k: _Node(v, f"{path}.properties.{k}", depth + 1) for k, v in props.items()}
        self.keys = {json.dumps(k, ensure_ascii=False).encode(): k for k in props}  # literal keys of closed objects
        self.required, self.closed = frozenset(schema.get("required", [])), extra is False
        if not isinstance(extra, (bool, dict)):
            raise ValueError(f"{path}.additionalProperties: {str(extra)[:80]} must be true, false or a schema")
        self.extra = None if isinstance(extra, bool) else _Node(extra, f"{path}.additionalProperties", depth + 1)
        self.items = _Node(schema["items"], f"{path}.items", depth + 1) if "items" in schema else None  # None: any
        self.min_items, self.max_items = _bounds(schema, path, "minItems", "maxItems")
        self.min_len, self.max_len = _bounds(schema, path, "minLength", "maxLength")  # set before enum filtering
        self.enum = None
        if "enum" in schema:  # keep the candidates the rest of the schema allows: validate checks both
            try:
                cands = dict.fromkeys(json.dumps(v, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
                                      .encode() for v in schema["enum"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}.enum: a candidate is not JSON ({e})") from None
            self.enum = tuple(c for c in cands if (r := _run([(END,), (VAL, self)], 0, c, 0)) and _complete(r[0]))
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if self.enum is None and types == ["integer"] and lo is not None and hi is not None and hi - lo <= 1024:
            # a small integer range is enforced as the enum of its values (1 to the number of paragraphs, say)
            self.enum = tuple(str(i).encode() for i in range(math.ceil(lo), math.floor(hi) + 1))
        self._check_satisfiable(path)

    def _check_satisfiable(self, path: str) -> None:
        """Refuse a schema that decoding could enter but never finish (its sub-schemas were checked already)."""
        if self.enum == ():
            raise ValueError(f"{path}: no value can match (no enum candidate, or no integer in [minimum, maximum], "
                             "passes the rest of the schema)")
        if "object" in self.kinds and self.closed and not self.required <= set(self.props):
            raise ValueError(f"{path}: required keys {sorted(self.required - set(self.props))} are not in properties, "
                             "and additionalProperties is false: no object can match")


def _bounds(schema: dict, path: str, lo: str, hi: str) -> tuple[int, float]:
    """(schema[lo], schema[hi]) with defaults 0 and infinity, checked."""
    for key in (lo, hi):
        n = schema.get(key, 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{path}.{key}: {n!r} must be an integer >= 0")
    bounds = schema.get(lo, 0), schema.get(hi, math.inf)
    if bounds[0] > bounds[1]:
        raise ValueError(f"{path}: {lo} {bounds[0]} is more than {hi} {bounds[1]}; no value could match")
    return bounds


def _key(stack: list, name: str) -> bool:
    """Record a finished key in the object frame on top, with the schema of its value; False for a duplicate."""
    _, node, _, used, _ = stack[-1]
    if name in used:
        return False
    stack[-1] = (OBJ, node, COLON, used | {name}, node.props.get(name) or node.extra or _ANY)
    return True


def _complete(stack: list) -> bool:
    top = stack[-1]
    return top[0] == END or len(stack) == 2 and ((top[0] == NUM and top[2] in _ENDS) or
                                                 (top[0] == LIT and top[2] in map(len, top[1])))


def _run(stack: list, ws: int, data: bytes, max_ws: int) -> tuple[list, int] | None:
    """(stack, whitespace run) after `data`, or None if `data` leaves the valid prefixes. `stack` is not mutated.

    Each step reads from data[i] in the frame on top and returns the next index, -1 to reject. Inside a string,
    literal or number every byte is the token's (or ends it); between tokens whitespace is counted, then the frame
    reads one structural byte. A number or enum literal inside a container ends at a byte that cannot extend it:
    its frame is popped and the parent reads that byte again (the step returns i unchanged)."""
    stack, i, n = list(stack), 0, len(data)
    while i < n:
        top = stack[-1]
        kind = top[0]
        if kind >= STR:  # STR, LIT, NUM
            i = _TOKEN_STEPS[kind](stack, top, data, i)
        elif data[i] in _WS:
            ws += 1
            if ws > max_ws:
                return None
            i += 1
        else:
            ws = 0
            i = _STRUCTURE_STEPS[kind](stack, top, data[i], i)
        if i < 0:
            return None
    return stack, ws


def _string_step(stack: list, top: tuple, data: bytes, i: int) -> int:
    """(STR, node, code points, escape, \\u value so far, after a high surrogate, key bytes). escape: 0 | -1 after
    '\\' | hex digits still due. Key bytes: those of an object key, else None."""
    _, node, count, esc, code, high, raw = top
    b, room = data[i], count < node.max_len
    m = _PLAIN.match(data, i) if esc == 0 else None
    if m:
        j, high = m.end(), False
        count += len(data[i:j].translate(None, _CONT))
        if count > node.max_len:
            return -1
    elif esc == 0 and b == 34 and count >= node.min_len:  # closing quote
        stack.pop()
        if raw is not None and not _key(stack, json.loads('"' + raw.decode("utf-8", "replace") + '"')):
            return -1
        return i + 1
    elif esc == 0 and b == 92 and (room or high):  # backslash; at maxLength only a joining low surrogate
        j, esc = i + 1, -1
    elif esc == -1 and b == 117:  # u
        j, esc, code = i + 1, 4, 0
    elif esc == -1 and b in _ESCAPES and room:
        j, esc, count, high = i + 1, 0, count + 1, False
    elif esc > 0 and b in _HEX:
        j, esc, code = i + 1, esc - 1, code * 16 + int(chr(b), 16)
        if not room and not 0xDC00 >> 4 * esc <= code <= 0xDFFF >> 4 * esc:  # can no longer be a low one
            return -1
        if esc == 0:  # json.loads joins a high surrogate and the low one right after it into one code point
            joined = high and 0xDC00 <= code <= 0xDFFF
            count, high = count + (not joined), not joined and 0xD800 <= code <= 0xDBFF
    else:
        return -1
    stack[-1] = (STR, node, count, esc, code, high, None if raw is None else raw + data[i:j])
    return j


def _literal_step(stack: list, top: tuple, data: bytes, i: int) -> int:
    """(LIT, candidates, bytes matched, key names by literal for object keys, else None)."""
    cands, pos, b = top[1], top[2], data[i]
    nxt = tuple(c for c in cands if len(c) > pos and c[pos] == b)
    if nxt:
        if any(len(c) > pos + 1 for c in nxt):
            stack[-1] = (LIT, nxt, pos + 1, top[3])
        else:  # one candidate, matched whole: nothing can extend it
            stack.pop()
            if top[3] is not None and not _key(stack, top[3][nxt[0]]):
                return -1
        return i + 1
    if pos in map(len, cands):  # a whole candidate (a number, e.g. 1 of [1, 10]) ended before b
        stack.pop()
        return i
    return -1


def _number_step(stack: list, top: tuple, data: bytes, i: int) -> int:
    """(NUM, DFA table, state)."""
    state = top[1][top[2]].get(data[i])
    if state is not None:
        if top[1][state]:
            stack[-1] = (NUM, top[1], state)
        else:  # an integer "0" or "-0": nothing can follow
            stack.pop()
        return i + 1
    if top[2] in _ENDS:
        stack.pop()
        return i
    return -1


def _value_step(stack: list, top: tuple, b: int, i: int) -> int:
    """(VAL, node): a value starts here."""
    node = top[1]
    if node.enum is not None:
        stack[-1] = (LIT, node.enum, 0, None)
        return i
    if _KIND.get(b) not in node.kinds:
        return -1
    if b == 123:  # {
        stack[-1] = (OBJ, node, START, frozenset(), None)
    elif b == 91:  # [
        stack[-1] = (ARR, node, START, 0)
    elif b == 34:  # "
        stack[-1] = (STR, node, 0, 0, 0, False, None)
    else:
        stack[-1] = (LIT, (_WORDS[b],), 0, None) if b in _WORDS else (NUM, node.table, 0)
        return i
    return i + 1


def _array_step(stack: list, top: tuple, b: int, i: int) -> int:
    """(ARR, node, state, elements so far)."""
    _, node, state, count = top
    if b == 93 and state != COMMA and count >= node.min_items:  # ]
        stack.pop()
    elif b == 44 and state == AFTER and count < node.max_items:  # ,
        stack[-1] = (ARR, node, COMMA, count)
    elif state != AFTER and b != 93 and count < node.max_items:
        stack[-1] = (ARR, node, AFTER, count + 1)
        stack.append((VAL, node.items or _ANY))
        return i
    else:
        return -1
    return i + 1


def _object_step(stack: list, top: tuple, b: int, i: int) -> int:
    """(OBJ, node, state, keys used, schema of the value after the colon)."""
    _, node, state, used, sub = top
    if b == 125 and state in (START, AFTER) and node.required <= used:  # }
        stack.pop()
    elif b == 34 and state in (START, COMMA):
        if not node.closed:
            stack.append((STR, _ANY, 0, 0, 0, False, b""))  # keys have no length bounds
        elif free := tuple(lit for lit, k in node.keys.items() if k not in used):
            stack.append((LIT, free, 1, node.keys))
        else:
            return -1
    elif b == 58 and state == COLON:  # :
        stack[-1] = (OBJ, node, AFTER, used, None)
        stack.append((VAL, sub))
    elif b == 44 and state == AFTER and (not node.closed or len(used) < len(node.props)):
        stack[-1] = (OBJ, node, COMMA, used, None)
    else:
        return -1
    return i + 1


def _end_step(stack: list, top: tuple, b: int, i: int) -> int:
    """(END,): only whitespace follows the root value."""
    return -1


_TOKEN_STEPS = {STR: _string_step, LIT: _literal_step, NUM: _number_step}
_STRUCTURE_STEPS = {END: _end_step, VAL: _value_step, OBJ: _object_step, ARR: _array_step}
_ANY = _Node({}, "schema")


class JsonConstraint:
    """Incremental recognizer, over UTF-8 bytes, of one JSON value that matches a JSON-schema subset."""

    def __init__(self, schema: dict | None = None, max_ws: int = 16):
        if not isinstance(max_ws, int) or max_ws < 0:
            raise ValueError(f"max_ws={max_ws!r} must be an int >= 0")
        self.max_ws = max_ws
        self._stack, self._ws = [(END,), (VAL, _Node(schema or {}, "schema"))], 0

    def accepts(self, data: bytes) -> bool:
        """Would feed(data) succeed? The state is unchanged."""
        return _run(self._stack, self._ws, data, self.max_ws) is not None

    def feed(self, data: bytes) -> bool:
        """Advance over `data` if the text stays a valid prefix; else return False and change nothing."""
        state = _run(self._stack, self._ws, data, self.max_ws)
        if state is None:
            return False
        self._stack, self._ws = state  # a new list: stacks are replaced, never mutated, so copies may share them
        return True

    @property
    def complete(self) -> bool:
        """The bytes so far form a whole valid value (plus whitespace): end-of-sequence is allowed."""
        return _complete(self._stack)

    @property
    def closed(self) -> bool:
        """Complete, and no non-whitespace byte can follow (e.g. the root's closing brace was read): stop now."""
        return self._stack[-1][0] == END

    def copy(self) -> JsonConstraint:
        """An independent copy, in O(1): the stack is shared until one of them feeds."""
        new = object.__new__(JsonConstraint)
        new.__dict__.update(self.__dict__)
        return new
