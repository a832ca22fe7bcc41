"""Importers: untrusted model bytes -> :class:`sdp.ir.Network`.

The format is sniffed from the content (ONNX protobuf, safetensors header, MATLAB 5 header),
never from the file name. Pickles are refused. Every failure raises
:class:`~sdp.errors.ModelRejected` (``UnsupportedOp`` for ONNX ops off the allow-list) with a
stable ``code``:

=======================  ==============================================================
code                     meaning
=======================  ==============================================================
empty                    zero bytes
unknown-format           not ONNX, safetensors or MATLAB 5
unsupported-format       a recognised container we do not read (HDF5 / MATLAB v7.3)
pickle-refused           pickle bytes or a torch zip archive (.pth/.pt): never unpickled
unreadable               the file could not be read from disk
too-large                file bytes (or inflated MATLAB data) above ``Limits.max_bytes``
too-many-parameters      parameters or a single tensor above the limits
too-wide                 a layer wider than ``Limits.max_width``
too-deep                 more ops than ``Limits.max_depth``
too-many-nodes           more ONNX nodes / layers / cells than ``Limits.max_nodes``
malformed                truncated or corrupt bytes, bad header/JSON, missing tensors
non-finite               NaN or inf in a weight
shape-mismatch           declared shapes disagree with the weights (dims that lie)
unsupported-op           ONNX op not on the allow-list (``UnsupportedOp``: node, op)
unsupported-graph        several inputs/outputs, dynamic weights, unsupported wiring
unsupported-attribute    an allowed op with attribute values we do not handle
external-data            ONNX tensor stored outside the file
custom-domain            ONNX op from a non-standard domain
subgraph                 ONNX node with a graph attribute (If/Loop/Scan)
unsupported-content      MATLAB objects, structs, sparse, char or function handles
unsupported-dtype        safetensors dtype that is not a float/int type
unsupported-kind         safetensors config ``kind`` we cannot build
missing-config           safetensors file without the ``lipcert`` metadata config
invalid-config           the lipcert config is not valid JSON / has bad fields
missing-tensor           the config names a tensor the file does not hold
unsupported-activation   a sandwich config activation outside the allowed set
=======================  ==============================================================

ONNX ops on the allow-list: :func:`supported_onnx_ops`. Example::

    from sdp.importers import Limits, load_model_file
    net = load_model_file("mnist-net_256x2.onnx", limits=Limits(max_parameters=10_000_000))
    net.input_shape   # (784, 1): the batch dim of 1 is dropped
"""

from sdp.importers.limits import Limits
from sdp.importers.loader import detect_format, load_model, load_model_file
from sdp.importers.onnx import supported_onnx_ops
from sdp.importers.safetensors import save_safetensors

#: Bumped whenever a stored file may import to a different network (2: ONNX constants folded
#: in their own dtypes, attribute allow-list, absorbed input Transposes recorded; 3: one BLAS
#: thread while importing, so a sandwich file's network no longer depends on the thread
#: count). Stores of parsed models re-import files recorded under another version
#: (service.storage).
IMPORTER_VERSION = 3

__all__ = [
    "IMPORTER_VERSION",
    "Limits",
    "detect_format",
    "load_model",
    "load_model_file",
    "save_safetensors",
    "supported_onnx_ops",
]
