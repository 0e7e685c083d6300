"""constrain.JsonConstraint against references: json.dumps output of values llm.validate accepts must be recognized
(completeness), and whatever it recognizes as complete must parse with json.loads and pass llm.validate (soundness)."""
import json
import random

import pytest

from annotate.schema import ANNOTATION_SCHEMA, CLEAN_SCHEMA, EXTRACT_SCHEMA, SENTIMENT_SCHEMA
from constrain import JsonConstraint
from llm import validate

CLOSED = {"type": "object", "required": ["id", "tags"], "additionalProperties": False,
          "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["x", "y", "xy"]}},
                         "ratio": {"type": ["number", "null"]}, "key with space": {"type": "string"},
                         "meta": {"type": "object", "additionalProperties": {"type": ["boolean", "null"]}}}}
OPEN = {"type": "object", "required": ["é"], "properties": {"é": {"type": "integer"}, 'a"b': {"type": "boolean"}}}
TAGS = {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "string", "minLength": 1, "maxLength": 2}}
LENGTHS = {"type": "object", "required": ["name", "pair"], "additionalProperties": {"type": "string", "maxLength": 1},
           "properties": {"name": {"type": "string", "minLength": 2, "maxLength": 4},
                          "code": {"type": ["string", "null"], "minLength": 1, "maxLength": 1},
                          "pair": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer"}},
                          "none": {"type": "array", "maxItems": 0},
                          "pick": {"enum": ["ab", "abc", "", 7, None], "maxLength": 2}}}
SCHEMAS = {
    "any": {}, "clean": CLEAN_SCHEMA, "extract": EXTRACT_SCHEMA, "sentiment": SENTIMENT_SCHEMA,
    "annotation": ANNOTATION_SCHEMA, "closed": CLOSED, "open": OPEN,
    "type_list": {"type": ["string", "null", "integer"]},
    "enum": {"enum": [1, 10, -2, 1.5, "a", "ab", None, True, "q\"\\"]},
    "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
    "tags": TAGS, "lengths": LENGTHS, "three_chars": {"type": "string", "minLength": 3, "maxLength": 3},
}
DUMPS = [dict(separators=(",", ":")), dict(indent=2), dict(ensure_ascii=False), dict(indent=2, ensure_ascii=False)]
CHARS = list("abcXYZ 09") + ['"', "\\", "/", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "中", "😀", "\u2028"]
ALL_TYPES = ["object", "array", "string", "number", "integer", "boolean", "null"]


def random_length(rng: random.Random, schema: dict, lo: str, hi: str, most: int) -> int:
    """A random length within the schema's bounds lo..hi, at most `most` unless lo asks for more."""
    low = schema.get(lo, 0)
    return rng.randint(low, min(schema.get(hi, most), max(low, most)))


def random_string(rng: random.Random, schema: dict | None = None) -> str:
    return "".join(rng.choice(CHARS) for _ in range(random_length(rng, schema or {}, "minLength", "maxLength", 8)))


def random_value(schema: dict, rng: random.Random, depth: int = 0):
    """A random value meant to pass llm.validate(value, schema); the tests check that it does."""
    if "enum" in schema:  # the candidates the rest of the schema allows
        return rng.choice([v for v in schema["enum"] if validate(v, schema) == []])
    types = schema.get("type", ALL_TYPES)
    types = [types] if isinstance(types, str) else types
    if depth >= 3:  # keep documents small: containers only where the schema insists
        types = [t for t in types if t not in ("object", "array")] or types
    kind = rng.choice(types)
    if kind == "object":
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        keys = [k for k in props if k in schema.get("required", []) or rng.random() < 0.5]
        if extra is not False:
            keys += [k for k in (random_string(rng) for _ in range(rng.randint(0, 2))) if k not in props]
        rng.shuffle(keys)
        return {k: random_value(props.get(k, extra if isinstance(extra, dict) else {}), rng, depth + 1) for k in keys}
    if kind == "array":
        n = random_length(rng, schema, "minItems", "maxItems", 3)
        return [random_value(schema.get("items", {}), rng, depth + 1) for _ in range(n)]
    if kind in ("integer", "number"):
        value = rng.choice([0, 1, 7, -3, rng.randint(-10**6, 10**6), 10**20])
        if kind == "number":
            value = rng.choice([value, 0.0, -0.5, 1e-7, 3.25e21, rng.uniform(-1e3, 1e3)])
        return abs(value) + schema["minimum"] if "minimum" in schema else value
    if kind == "string":
        return random_string(rng, schema)
    return {"boolean": lambda r: r.random() < 0.5, "null": lambda r: None}[kind](rng)


def documents(seed: int, per_schema: int):
    """(schema, value, serialized bytes) for random valid values in every serialization."""
    rng = random.Random(seed)
    for name, schema in SCHEMAS.items():
        for _ in range(per_schema):
            value = random_value(schema, rng)
            assert validate(value, schema) == [], (name, value)
            for kw in DUMPS:
                yield schema, value, json.dumps(value, **kw).encode()


def fed(schema: dict, data: bytes, chunks: list[int] | None = None) -> JsonConstraint | None:
    """The constraint after feeding `data` in pieces of the given sizes (default: byte by byte), or None if refused."""
    c, i = JsonConstraint(schema), 0
    for size in chunks or [1] * len(data):
        if not c.feed(data[i:i + size]):
            return None
        i += size
    return c


# ----------------------------------------------------------------------------- completeness

def test_valid_documents_are_accepted_byte_by_byte_and_in_chunks():
    rng = random.Random(1)
    n = 0
    for schema, value, data in documents(seed=0, per_schema=12):
        c = fed(schema, data)
        assert c is not None and c.complete, data
        if data[:1] in b'{["tfn':  # containers, strings and true/false/null end with a byte nothing can follow
            assert c.closed, data
        chunks = []
        while sum(chunks) < len(data):
            chunks.append(rng.randint(1, 16))
        c = fed(schema, data, chunks)
        assert c is not None and c.complete, (data, chunks)
        assert JsonConstraint(schema).accepts(b"\n" + data + b" \n\t\r")
        n += 1
    assert n == len(SCHEMAS) * 12 * len(DUMPS)


def test_roots_that_could_grow_are_complete_but_not_closed():
    cases = [({}, b"12", True, False), ({}, b"-", False, False), ({}, b"1.", False, False), ({}, b"1e5", True, False),
             ({"type": "integer"}, b"0", True, True), ({}, b"0", True, False), ({"enum": [1, 10]}, b"1", True, False),
             ({"enum": [1, 10]}, b"10", True, True), ({}, b"tru", False, False), ({}, b"true", True, True),
             ({}, b'"ab', False, False), ({}, b'"ab" ', True, True)]
    for schema, text, complete, closed in cases:
        c = fed(schema, text)
        assert (c.complete, c.closed) == (complete, closed), text


# ----------------------------------------------------------------------------- soundness

STRUCTURAL = b'{}[]:,"\\ \n0123456789.eE+-tfnul'


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(data) + 1)
        byte = rng.choice(STRUCTURAL) if rng.random() < 0.8 else rng.randrange(256)
        op = rng.choice(["delete", "insert", "replace"])
        if op == "insert" or not data:
            data[i:i] = bytes([byte])
        elif op == "delete":
            del data[min(i, len(data) - 1)]
        else:
            data[min(i, len(data) - 1)] = byte
    return bytes(data)


def no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), keys
    return dict(pairs)


def check_sound(schema: dict, text: bytes) -> bool:
    """If the constraint takes `text` as a whole value, json and llm.validate must agree; True if it did."""
    c = fed(schema, text)
    assert JsonConstraint(schema).accepts(text) == (c is not None), text  # one call == byte by byte
    if c is None or not c.complete:
        return False
    value = json.loads(text.decode("utf-8", "replace"), object_pairs_hook=no_duplicates)
    errors = [e for e in validate(value, schema) if "minimum" not in e and "maximum" not in e]
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:  # lengths count UTF-8 lead bytes: exact for valid UTF-8 only, which is not checked
        errors = [e for e in errors if "Length" not in e]
    assert errors == [], (text, errors)
    return True


def test_mutated_documents_that_are_accepted_whole_parse_and_validate():
    rng = random.Random(2)
    complete = total = 0
    for schema, _, data in documents(seed=3, per_schema=10):
        for _ in range(8):
            complete += check_sound(schema, mutate(data, rng))
            total += 1
    assert complete > total // 20  # the check had teeth: many mutants were still whole values


def test_random_bytes_that_are_accepted_whole_parse_and_validate():
    rng = random.Random(4)
    complete = 0
    for _ in range(3000):
        text = bytes(rng.choice(STRUCTURAL) for _ in range(rng.randint(1, 12)))
        for schema in ({}, SCHEMAS["type_list"], SCHEMAS["enum"], SCHEMAS["matrix"], TAGS):
            complete += check_sound(schema, text)
    assert complete > 100


# Pieces of string text: raw UTF-8 (1-4 bytes a code point), escapes, and \u surrogates json.loads joins in pairs.
PIECES = ["a", "é", "中", "😀", "\\n", '\\"', "\\u00e9", "\\u0041", "\\ud83d", "\\ude00", "\\udbff", "\\udc00"]


def test_string_lengths_are_counted_as_json_loads_counts_them():
    """Exact on whole strings (accepted iff json.loads gives a length in bounds), and no dead end on the way."""
    rng = random.Random(5)
    ends = [b"\\udc00"[len(b"\\udc00") - k:] for k in range(7)]  # finishes any escape, joining a high surrogate
    for _ in range(400):
        lo = rng.randint(0, 3)
        schema = {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 2)}
        text = ('"' + "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6))) + '"').encode()
        c = fed(schema, text)
        assert (c is not None and c.complete) == (lo <= len(json.loads(text)) <= schema["maxLength"]), (schema, text)
        for i in range(1, len(text)):  # every accepted prefix can still be finished
            if (c := fed(schema, text[:i])) is None:
                break
            assert any(c.accepts(end + b"a" * k + b'"') for end in ends for k in range(lo + 1)), (schema, text[:i])


# ----------------------------------------------------------------------------- handcrafted prefixes

def test_required_keys_gate_the_closing_brace():
    c = fed(EXTRACT_SCHEMA, b'{"coins": [], "organizations": [], "people": [], "events": []')
    assert c.accepts(b"}") and c.accepts(b" }") and c.accepts(b', "x')  # additionalProperties absent: any key
    c = fed(EXTRACT_SCHEMA, b'{"coins": []')
    assert not c.accepts(b"}") and c.accepts(b", ") and not c.complete
    assert not fed(EXTRACT_SCHEMA, b"{").accepts(b"}")
    assert fed({"type": "object"}, b"{}").closed


def test_closed_objects_take_only_unused_property_names():
    c = fed(CLOSED, b'{"id": 1, ')
    assert not c.accepts(b'"idx') and not c.accepts(b'"id"') and not c.accepts(b'"z')
    assert c.accepts(b'"key with space": "v"') and c.accepts(b'"tags"')
    assert not fed({"type": "object", "additionalProperties": False}, b"{").accepts(b'"')
    one = {"type": "object", "additionalProperties": False, "properties": {"a": {"type": "null"}}}
    c = fed(one, b'{"a": null')
    assert not c.accepts(b",") and c.accepts(b"}")


def test_keys_are_decoded_and_duplicates_rejected():
    c = fed({}, b'{"a": 1, "a')
    assert not c.accepts(b'"') and c.accepts(b'b"')
    assert not fed({}, b'{"a": 1, ').accepts(b'"\\u0061"')
    c = fed(OPEN, b'{"\\u00e9": ')  # é written escaped still takes the integer schema
    assert not c.accepts(b'"x"') and c.accepts(b"3")
    assert fed(OPEN, b'{"a\\"b": ').accepts(b"true") and not fed(OPEN, b'{"a\\"b": ').accepts(b"1")


def test_enum_and_types_reject_wrong_first_bytes():
    c = fed(SENTIMENT_SCHEMA, b'{"market": {"sentiment": ')
    assert c.accepts(b'"neg') and not c.accepts(b'"x') and not c.accepts(b"1")
    assert not fed({"type": ["string", "null"]}, b"").accepts(b"1")
    assert not fed({"type": "boolean"}, b"").accepts(b"n")
    assert not fed({"type": "string", "enum": ["a", 1]}, b"").accepts(b"1")  # validate checks type and enum both
    c = fed({"type": "array", "items": {"enum": [1, 10]}}, b"[1")
    assert c.accepts(b"]") and c.accepts(b",10]") and c.accepts(b"0]") and not c.accepts(b"00")
    assert fed({"enum": ["é"]}, '"é"'.encode()).closed and not fed({"enum": ["é"]}, b"").accepts(b'"\\u00e9"')
    assert fed({"enum": [{"a": 1}]}, b'{"a":1}').closed and fed({"enum": [{"a": 1}]}, b'{"a": 1}') is None


def test_min_and_max_items_gate_brackets_and_commas():
    c = fed({"type": "array", "maxItems": 2}, b"[1, 2")
    assert not c.accepts(b",") and not c.accepts(b" ,") and c.accepts(b"]") and c.accepts(b" ]")
    c = fed({"type": "array", "minItems": 1}, b"[")
    assert not c.accepts(b"]") and not c.accepts(b" ]") and c.accepts(b"1]") and not c.accepts(b"1,]")
    assert fed({"maxItems": 0}, b"[").accepts(b"]") and not fed({"maxItems": 0}, b"[").accepts(b"1")
    c = fed(TAGS, b'["a", "b", "c"')
    assert not c.accepts(b",") and c.accepts(b"]") and not fed(TAGS, b'["a",').accepts(b'""')


def test_max_length_refuses_a_character_too_many_however_it_is_written():
    c = fed({"type": "string", "maxLength": 3}, b'"abc')
    for fourth in (b"d", "é".encode(), "😀".encode()[:1], b"\\", b"\\n", b"\\u00e9", b"\\ud83d\\ude00"):
        assert not c.accepts(fourth), fourth
    assert c.accepts(b'"') and fed({"type": "string", "maxLength": 3}, "\"a😀é\"".encode()).closed
    c = fed({"type": "string", "maxLength": 3}, b'"ab')
    assert c.accepts("😀\"".encode()) and c.accepts(b'\\ud83d\\ude00"') and c.accepts(b'\\ud83d"')
    c = fed({"type": "string", "maxLength": 3}, b'"ab\\ud83d')  # at maxLength: only the low half may follow
    assert c.accepts(b'\\ude00"') and c.accepts(b'\\uDFFF"') and c.accepts(b'"')
    assert not c.accepts(b"\\n") and not c.accepts(b"\\ud83d") and not c.accepts(b"\\u0") and not c.accepts(b"\\ue")
    c = fed({"type": "string", "minLength": 2, "maxLength": 2}, b'"')
    assert not c.accepts(b'\\ud83d\\ude00"') and c.accepts(b'\\ud83d\\ud83d"') and c.accepts(b'\\ude00\\ud83d"')
    assert fed({"minLength": 1}, b'"').accepts(b'\\ud83d\\ude00"') and not fed({"minLength": 1}, b'"').accepts(b'"')


def test_length_keywords_apply_to_values_and_enum_candidates_not_keys():
    schema = {"type": "object", "additionalProperties": {"type": "string", "maxLength": 1}}
    assert fed(schema, b'{"a long key": "x"}').closed and fed(schema, b'{"k": "xy"}') is None
    assert fed({"type": ["integer", "array", "string"], "maxLength": 0, "maxItems": 0}, b"12345").complete
    c = fed(LENGTHS, b'{"pick": ')
    assert c.accepts(b'"ab"') and c.accepts(b'""') and c.accepts(b"7") and not c.accepts(b'"abc"')
    c = JsonConstraint({"enum": ["😀é", "é😀é", ["x", "y"]], "maxLength": 2, "maxItems": 1})
    assert c.accepts('"😀é"'.encode()) and not c.accepts('"é😀'.encode()) and not c.accepts(b"[")


def test_integers_reject_fraction_exponent_and_leading_zero():
    c = fed(CLEAN_SCHEMA, b'{"drop": [1')
    assert not c.accepts(b".") and not c.accepts(b"e") and c.accepts(b"2, 3]}")
    assert not fed(CLEAN_SCHEMA, b'{"drop": [').accepts(b"01")
    assert fed({"type": "number"}, b"").accepts(b"-0.5e+3") and not fed({}, b"").accepts(b"01")
    assert not fed({}, b"").accepts(b"1.e5") and not fed({}, b"").accepts(b"+1") and not fed({}, b"").accepts(b".5")


def test_strings_reject_control_bytes_and_bad_escapes():
    c = fed({}, b'"a')
    assert not c.accepts(b"\x01") and not c.accepts(b"\n") and c.accepts(b"\xc3\xa9\x7f")
    assert not c.accepts(b"\\x") and not c.accepts(b"\\u12g4") and c.accepts(b'\\u12aF\\n\\"\\/"')


def test_whitespace_runs_are_limited_outside_strings():
    c = JsonConstraint({}, max_ws=3)
    assert c.accepts(b"   [") and not c.accepts(b"    [")
    assert c.feed(b"[1,\n  ") and not c.accepts(b"\n2") and c.accepts(b"2 \n ]   ") and not c.accepts(b"2]    ")
    assert JsonConstraint({}, max_ws=0).accepts(b'"        "') and not JsonConstraint({}, max_ws=0).accepts(b" ")


def test_only_whitespace_follows_the_root_value():
    c = fed({}, b"{} ")
    assert c.closed and not c.accepts(b"x") and not c.accepts(b"{}") and not fed({}, b"1").accepts(b" 2")


def test_accepts_and_failed_feed_leave_the_state_unchanged():
    prefix, probes = b'{"coins": [', [b"x", b'{"name": "a", "ticker": 1', b"]", b'{"name": "\x01', b"", b'{"na']
    continuations = probes + [b'{"name": "a", "ticker": null}], "organizations": [], "people": [], "events": []}']
    c = fed(EXTRACT_SCHEMA, prefix)
    for probe in probes:
        c.accepts(probe)
        if not c.accepts(probe):
            assert not c.feed(probe)
    reference = fed(EXTRACT_SCHEMA, prefix)  # never probed
    assert [c.accepts(x) for x in continuations] == [reference.accepts(x) for x in continuations] == \
        [False, False, True, False, True, True, True]
    assert (c.complete, c.closed) == (False, False) and c.feed(continuations[-1]) and c.closed
    assert JsonConstraint().accepts(b"")


def test_copies_are_independent():
    c = fed({}, b"[1")
    d = c.copy()
    assert d.feed(b"]") and d.closed and not c.closed and c.accepts(b",2")
    assert c.feed(b"2") and d.closed and not d.accepts(b"2")


def test_unsupported_schemas_are_refused_with_their_path():
    with pytest.raises(ValueError, match=r"schema\.properties\.a.*pattern"):
        JsonConstraint({"properties": {"a": {"type": "string", "pattern": "x"}}})
    with pytest.raises(ValueError, match=r"schema\.items\.type"):
        JsonConstraint({"items": {"type": "float"}})
    for bad in ({"maxItems": -1}, {"minLength": 1.5}, {"maxLength": True}, {"minItems": "1"}):
        with pytest.raises(ValueError, match=rf"schema\.items\.{next(iter(bad))}: .* must be an integer >= 0"):
            JsonConstraint({"items": bad})
    with pytest.raises(ValueError, match=r"schema: minLength 3 is more than maxLength 2"):
        JsonConstraint({"minLength": 3, "maxLength": 2})
    with pytest.raises(ValueError, match="max_ws"):
        JsonConstraint({}, max_ws=-1)
    JsonConstraint({"title": "t", "$schema": "x", "description": "d", "default": 1, "examples": [], "$comment": "c",
                    "minimum": 0, "maximum": 1})


def test_a_small_integer_range_is_enforced():
    c = JsonConstraint({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 12}})
    assert c.feed(b"[1") and c.accepts(b"2,") and c.accepts(b",") and not c.accepts(b"3")  # 1, 12 ok; 13 not
    assert not c.accepts(b",0") and not c.accepts(b",-1") and c.accepts(b",9]")
    schema = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 12}}
    for v in (0, 13, 5.5):  # what validate rejects, the constraint rejects while decoding
        assert validate([v], schema) and not JsonConstraint(schema).feed(json.dumps([v]).encode())
    wide = JsonConstraint({"type": "integer", "minimum": 0, "maximum": 10**6})  # a wide range is left to validate
    assert wide.feed(b"2000000") and wide.complete


def test_schemas_decoding_could_not_finish_are_refused():
    import llm
    from constrain import MAX_DEPTH, check_schema

    assert llm.check_schema is check_schema  # the subset is defined once
    for bad, words in (({"type": []}, "non-empty list"), ({"enum": []}, "no value can match"),
                       ({"enum": [1, 2], "type": "string"}, "no value can match"),
                       ({"type": "integer", "minimum": 3, "maximum": 2}, "no value can match"),
                       ({"type": "object", "required": ["a"], "additionalProperties": False}, "'a'"),
                       ({"properties": {"x": {"enum": []}}}, r"schema\.properties\.x"),
                       ({"minimum": "1"}, "finite number"), ({"maximum": float("inf")}, "finite number"),
                       ({"required": [1]}, "key names"), ({"additionalProperties": 3}, "true, false or a schema"),
                       ({"enum": [float("nan")]}, "not JSON"), ({"enum": list(range(1025))}, "at most 1024"),
                       (json.loads('{"items": ' * (MAX_DEPTH + 1) + "{}" + "}" * (MAX_DEPTH + 1)), "nest")):
        with pytest.raises(ValueError, match=words):
            JsonConstraint(bad)
        with pytest.raises(ValueError, match=words):
            check_schema(bad)
    JsonConstraint(json.loads('{"items": ' * MAX_DEPTH + "{}" + "}" * MAX_DEPTH))  # as deep as allowed


@pytest.mark.parametrize("fmt, schema", [(None, None), ({"type": "text"}, None),
                                         ({"type": "json_object"}, {"type": "object"}),
                                         ({"type": "json_schema", "json_schema": {"schema": TAGS}}, TAGS)])
def test_response_format_reads_as_a_schema(fmt, schema):
    from constrain import response_format_schema

    assert response_format_schema(fmt) == schema
    for bad in ("json", {"type": "yaml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": []}):
        with pytest.raises(ValueError, match="response_format"):
            response_format_schema(bad)
