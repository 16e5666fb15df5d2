"""The rooms of docs/design.md, section 7: imports point one way, towards torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# room -> modules it must not load (directly or through another room)
FORBIDDEN = {
    "lightning_nfk.kernel": ("pytorch_lightning", "lightning_nfk.models", "lightning_nfk.data"),
    "lightning_nfk.protocol": ("lightning_nfk.models", "lightning_nfk.callbacks"),
    "lightning_nfk.callbacks": ("lightning_nfk.models", "lightning_nfk.data"),
    "lightning_nfk.models": ("lightning_nfk.callbacks", "lightning_nfk.data"),
    "lightning_nfk.data": ("lightning_nfk.kernel", "lightning_nfk.models"),
    "lightning_nfk.cli": (
        "lightning_nfk.kernel",
        "lightning_nfk.models",
        "lightning_nfk.callbacks",
    ),
}
# Imported in this order in one interpreter each, so that what a room loads is what is new
# after it (a room never depends on one after it in its list).
ORDERS = [
    [
        "lightning_nfk.kernel",
        "lightning_nfk.protocol",
        "lightning_nfk.callbacks",
        "lightning_nfk.models",
    ],
    ["lightning_nfk.data", "lightning_nfk.cli"],
]
_PROBE = """
import importlib, json, sys
out = {}
for room in sys.argv[1:]:
    before = set(sys.modules)
    importlib.import_module(room)
    out[room] = sorted(set(sys.modules) - before)
print(json.dumps(out))
"""


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o[0].split(".")[-1])
def test_a_room_loads_only_the_rooms_below_it(order):
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", _PROBE, *order],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    for room in order:
        assert room in loaded[room]  # imported fresh by the probe
        wrong = [
            m for m in loaded[room] for f in FORBIDDEN[room] if m == f or m.startswith(f + ".")
        ]
        assert not wrong, f"importing {room} loads {wrong[:5]}"
