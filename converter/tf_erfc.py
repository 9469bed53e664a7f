"""tf2onnx handler for TF ``Erfc`` (exact GELU lowers to it): erfc(x) = 1 - erf(x).

tf2onnx has no mapping for Erfc and, because it continues on error, would
otherwise leave a raw ``Erfc`` node in the ONNX file. Import registers it.
"""
from __future__ import annotations

import numpy as np

_registered = False


def register() -> None:
    """Register the handler with tf2onnx once (a no-op if tf2onnx already has one)."""
    global _registered
    if _registered:
        return
    from tf2onnx import constants, utils
    from tf2onnx.handler import tf_op

    if any("Erfc" in ops for ops in tf_op.get_opsets().get(constants.ONNX_DOMAIN, [])):
        _registered = True
        return

    @tf_op("Erfc")
    class Erfc:
        @classmethod
        def version_9(cls, ctx, node, **kwargs):  # Erf exists from opset 9
            dtype = ctx.get_dtype(node.output[0])
            one = ctx.make_const(utils.make_name(node.name + "_one"),
                                 np.array(1, dtype=utils.map_onnx_to_numpy_type(dtype)))
            node.type = "Erf"  # the node keeps its input; a Sub turns erf into erfc
            sub = ctx.insert_new_node_on_output("Sub", node.output[0], name=utils.make_name(node.name + "_erfc"))
            ctx.replace_inputs(sub, [one.output[0], node.output[0]])
            ctx.copy_shape(node.output[0], sub.output[0])
            ctx.set_dtype(sub.output[0], dtype)

    _registered = True
