"""Shared by the bad-input tests (tests/test_fuzz.py, tests/test_fuzz_options.py): the guarantee
every generated input is held to, and generators of JSON values and numbers at the edges of their types."""
import contextlib
import copy
import json
import os
import tempfile
from pathlib import Path

from hypothesis import strategies as st

from machinery import config, files, runtime


SCALE = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 1  # the longer run: 20 times the examples
KNOWN = (config.ConfigError, files.DataError, runtime.TrainingError)  # what runtime.command prints as one line


@contextlib.contextmanager
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def one_line(e):
    """The guarantee for an error: a known kind, one line."""
    assert isinstance(e, KNOWN), f"{type(e).__name__}: {e}"
    assert "\n" not in str(e) and str(e).strip(), repr(str(e))


def outcome(fn):
    """fn()'s value, or the known one-line error it raised; anything else fails the test."""
    try:
        return fn()
    except KNOWN as e:
        one_line(e)
        return e


# ---- generators ------------------------------------------------------------------------------------

# numbers at the edges: huge whole numbers, sub- and super-normal floats, the non-finite ones
EDGE_INTS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63, 2**64, 10**30]))
EDGE_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e-39, 1e38, 3.5e38, 1e300, 1e308]))
JSON_LEAVES = st.one_of(st.none(), st.booleans(), EDGE_INTS, EDGE_FLOATS, st.text(max_size=8), st.just(""))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)


def paths(value, at=()):
    """Every place inside a decoded JSON value: dict keys and list indices, at every depth."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        yield at + (k,)
        yield from paths(v, at + (k,))


@st.composite
def mutated(draw, record, most=3):
    """record with one to `most` of its fields, at any depth, missing, null, of another JSON type,
    empty, or out of range."""
    rec = copy.deepcopy(record)
    for _ in range(draw(st.integers(1, most))):
        places = list(paths(rec))
        if not places:
            break
        place = draw(st.sampled_from(places))
        parent = rec
        for k in place[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["delete", "replace", "empty", "range"]))
        if action == "delete":
            parent.pop(place[-1]) if isinstance(parent, dict) else parent.pop(place[-1])
        elif action == "empty":
            parent[place[-1]] = draw(st.sampled_from(["", " ", [], {}, None]))
        elif action == "range":
            parent[place[-1]] = draw(st.sampled_from([-1, 2, 1.0, 0.5, True, 10**30, -10**30, 1e39, 1e-45]))
        else:
            parent[place[-1]] = draw(JSON_VALUES)
    return rec


def dumps(rec):
    return json.dumps(rec, allow_nan=True)  # Python's parser reads NaN and Infinity: so may a file


def skipped(notes):
    """How many records a lenient loader's notes say it skipped."""
    return int(notes[0].split("skipped ")[1].split()[0]) if notes else 0
