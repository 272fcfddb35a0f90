"""ONNX graph passes for learned members: what a recurrent node computes that nobody reads.

The TorchScript exporter writes ``nn.LSTM`` (and GRU, RNN) as the fused ONNX
op with every output named and the initial states fed from a
``Shape -> Gather -> Concat -> ConstantOfShape(0)`` chain. ONNX Runtime's CPU
kernel then writes the whole output sequence ``Y`` ([window, batch, hidden],
1 MB at batch 256 for the baseline LSTM) even when the graph reads only the
last hidden state ``Y_h``, and copies the zero states in. ``lean_recurrent``
blanks outputs nothing consumes and zero initial states (the op's own default
is zero) and drops the nodes left dead; the graph computes the same numbers.

``gate_bytes_per_row`` is the size of the gate buffer ONNX Runtime's CPU
kernel allocates per batch row (``window x gates x hidden`` floats): the model
cache runs large batches of a recurrent model in chunks that keep that buffer
within a core's L2 cache.

Used by the baseline export (``core.baselines``) and by the model cache when
it loads any model (``actors.model_cache``), so models registered before this
pass, or imported from elsewhere, get it too. Not here: anything that changes
what a graph computes.
"""

from __future__ import annotations

from typing import Iterable

RECURRENT_OPS = {"LSTM": 4, "GRU": 3, "RNN": 1}  # op -> gates per hidden unit
# Optional inputs that hold initial states (zero when absent), per op.
_INITIAL_STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}


def _is_zero_fill(node) -> bool:
    """A ConstantOfShape whose value is 0 (its default when the attribute is absent)."""
    if node.op_type != "ConstantOfShape":
        return False
    from onnx import numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return not numpy_helper.to_array(a.t).any()
    return True


def _names_read(nodes: Iterable) -> set[str]:
    """Every name a node reads, including those read inside its subgraphs (Loop, If, Scan bodies)."""
    import onnx

    used: set[str] = set()
    for n in nodes:
        used.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _names_read(a.g.node)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    used |= _names_read(sub.node)
    return used


def lean_recurrent(data: bytes) -> bytes:
    """The same model without unread recurrent outputs, zero initial states and the nodes left dead.

    Returns ``data`` unchanged when the graph has no recurrent node or nothing
    to drop, so a model without one loads byte for byte as stored.
    """
    import onnx

    model = onnx.load_from_string(data)
    g = model.graph
    if not any(n.op_type in RECURRENT_OPS for n in g.node):
        return data
    outputs = {o.name for o in g.output}
    producers = {o: n for n in g.node for o in n.output if o}
    changed = False
    used = _names_read(g.node) | outputs
    for n in g.node:
        if n.op_type not in RECURRENT_OPS:
            continue
        for k, name in enumerate(n.output):
            if name and name not in used:
                n.output[k] = ""
                changed = True
        for k in _INITIAL_STATE_INPUTS[n.op_type]:
            if k < len(n.input) and n.input[k] and n.input[k] in producers and _is_zero_fill(producers[n.input[k]]):
                n.input[k] = ""
                changed = True
        while n.input and not n.input[-1]:  # trailing optional inputs need no placeholder
            n.input.pop()
        while n.output and not n.output[-1]:
            n.output.pop()
    if not changed:
        return data
    while True:  # drop nodes whose outputs nobody reads any more
        used = _names_read(g.node) | outputs
        dead = [n for n in g.node if not any(o and o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    live = _names_read(g.node) | outputs
    for init in [i for i in g.initializer if i.name not in live]:
        g.initializer.remove(init)
    return model.SerializeToString()


def gate_bytes_per_row(data: bytes, window: int) -> int:
    """Bytes of recurrent gate buffer per batch row (0 for a graph without a recurrent node)."""
    import onnx

    total = 0
    for n in onnx.load_from_string(data).graph.node:
        gates = RECURRENT_OPS.get(n.op_type)
        if gates is None:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        directions = 2 if attrs.get("direction", b"forward") == b"bidirectional" else 1
        total += window * gates * int(attrs.get("hidden_size", 0)) * directions * 4
    return total
