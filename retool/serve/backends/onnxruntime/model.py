"""retool's stand-in for Triton's C++ onnxruntime backend, as a Python-based backend.

Triton runs this file for every model whose config says ``platform: "onnxruntime_onnx"`` (or
``backend: "onnxruntime"``), so a repository that retool publishes is served unchanged. Like the
C++ backend it checks the config's input/output names, dtypes and dims against the ONNX graph
(with its wording), honours max_batch_size and the ORT parameters it reads (intra_op_thread_count,
inter_op_thread_count, execution_mode, enable_mem_arena), and joins the requests of one execute()
along dim 0 so that dynamic batching really runs one batch. It costs more than the C++ backend:
each instance is a python stub process, and tensors cross shared memory (docs/serving.md).
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

ORT_TO_TRITON = {
    "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
    "tensor(bfloat16)": "TYPE_BF16", "tensor(int8)": "TYPE_INT8", "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64", "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16", "tensor(uint32)": "TYPE_UINT32", "tensor(uint64)": "TYPE_UINT64",
    "tensor(bool)": "TYPE_BOOL", "tensor(string)": "TYPE_STRING",
}


def _dims(shape):
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def _fmt(dims):
    return "[" + ",".join(str(d) for d in dims) + "]"


def _param(cfg, key, default=None):
    p = (cfg.get("parameters") or {}).get(key)
    if isinstance(p, dict):
        p = p.get("string_value")
    return default if p in (None, "") else p


def _quiet_capsules(hook=sys.unraisablehook):
    """The stub marks a consumed DLPack capsule "used_dlpack", not the standard "used_dltensor", so
    numpy's capsule destructor complains (the stub frees the tensor itself): drop that one message."""
    def unraisable(u):
        if isinstance(u.exc_value, ValueError) and "PyCapsule_GetPointer" in str(u.exc_value):
            return
        hook(u)
    sys.unraisablehook = unraisable


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        _quiet_capsules()

        cfg = json.loads(args["model_config"])
        self.name = cfg.get("name") or args.get("model_name")
        self.max_batch = int(cfg.get("max_batch_size") or 0)
        model_dir = args["model_repository"]
        fname = cfg.get("default_model_filename") or "model.onnx"
        path = os.path.join(model_dir, str(args["model_version"]), fname)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(
                f"unable to load model '{self.name}', unable to find '{path}' for model instance "
                f"'{args.get('model_instance_name')}'")
        so = ort.SessionOptions()
        intra, inter = _param(cfg, "intra_op_thread_count"), _param(cfg, "inter_op_thread_count")
        if intra is not None:
            so.intra_op_num_threads = int(intra)
        if inter is not None:
            so.inter_op_num_threads = int(inter)
        if _param(cfg, "execution_mode") is not None:
            so.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if int(_param(cfg, "execution_mode")) == 1
                                 else ort.ExecutionMode.ORT_SEQUENTIAL)
        if _param(cfg, "enable_mem_arena") is not None:
            so.enable_cpu_mem_arena = str(_param(cfg, "enable_mem_arena")).lower() in ("1", "true", "on")
        try:
            self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # an unreadable or invalid graph: ORT's own words
            raise pb_utils.TritonModelException(f"unable to load model '{self.name}', {exc}") from None
        self.inputs = self._validate(cfg, "input", self.sess.get_inputs())
        self.outputs = self._validate(cfg, "output", self.sess.get_outputs())
        self.out_names = [o["name"] for o in cfg.get("output", [])]

    def _validate(self, cfg, kind, graph):
        """The C++ backend's checks, in its words; returns name -> (numpy dtype, reshape or None)."""
        model = {t.name: t for t in graph}
        conf = cfg.get(kind, [])
        required = [t.name for t in graph]
        if kind == "input" and len(conf) != len(required):
            raise pb_utils.TritonModelException(
                f"unable to load model '{self.name}', configuration expects {len(conf)} inputs, "
                f"model provides {len(required)}")
        out = {}
        for t in conf:
            io = t["name"]
            if io not in model:
                allowed = ", ".join(required)
                raise pb_utils.TritonModelException(
                    f"unable to load model '{self.name}', unexpected inference {kind} '{io}', "
                    f"allowed {kind}s are: {allowed}")
            g = model[io]
            want = ORT_TO_TRITON.get(g.type, g.type)
            if want in ("TYPE_STRING", "TYPE_BF16"):  # tensors cross the stub by DLPack, which has neither
                raise pb_utils.TritonModelException(
                    f"unable to load model '{self.name}', {kind} '{io}' is {want}, which retool's stand-in "
                    f"onnxruntime backend does not serve; use Triton's C++ onnxruntime backend (--url)")
            if t.get("data_type") != want:
                raise pb_utils.TritonModelException(
                    f"unable to load model '{self.name}', unexpected datatype {t.get('data_type')} for "
                    f"inference {kind} '{io}', expecting {want}")
            reshape = (t.get("reshape") or {}).get("shape") if "reshape" in t else None
            conf_dims = [int(d) for d in (reshape if reshape is not None else t.get("dims", []))]
            full = ([-1] if self.max_batch > 0 else []) + conf_dims
            mdims = _dims(g.shape)
            if self.max_batch > 0 and (not mdims or mdims[0] != -1):
                raise pb_utils.TritonModelException(
                    f"model '{self.name}', tensor '{io}': for the model to support batching the shape should "
                    f"have at least 1 dimension and the first dimension must be -1; but shape expected by the "
                    f"model is {_fmt(mdims)}")
            batch_note = (" (an initial batch dimension because max_batch_size > 0 followed by the explicit "
                          f"tensor shape, making complete shape {_fmt(full)})") if self.max_batch > 0 else ""
            if len(full) != len(mdims):
                raise pb_utils.TritonModelException(
                    f"model '{self.name}', tensor '{io}': the model expects {len(mdims)} dimensions (shape "
                    f"{_fmt(mdims)}) but the model configuration specifies {len(full)} dimensions{batch_note}")
            for c, m in zip(full, mdims):
                if m != -1 and c != m:  # a variable dim in the model takes any configured size
                    raise pb_utils.TritonModelException(
                        f"model '{self.name}', tensor '{io}': the model expects dims {_fmt(mdims)} but the "
                        f"model configuration specifies dims {_fmt(full)}")
            out[io] = (pb_utils.triton_string_to_numpy(want), reshape)
        return out

    def _feed(self, request, batched):
        feed = {}
        for name, (dtype, reshape) in self.inputs.items():
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                raise pb_utils.TritonModelException(f"expected input '{name}' in the request")
            arr = np.from_dlpack(t)  # as_numpy() reads zero-size arrays under numpy 2 (old pybind11 in the stub)
            if reshape is not None:
                arr = arr.reshape(([arr.shape[0]] if batched else []) + list(reshape))
            feed[name] = arr.astype(dtype, copy=False)
        return feed

    def _response(self, values):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor.from_dlpack(n, np.ascontiguousarray(v).__dlpack__()) for n, v in zip(self.out_names, values)])

    def execute(self, requests):
        responses = [None] * len(requests)
        feeds = []
        for i, r in enumerate(requests):
            try:
                feeds.append((i, self._feed(r, self.max_batch > 0)))
            except Exception as exc:  # one bad request must not fail the others
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        groups = []
        if self.max_batch > 0 and len(feeds) > 1:
            # requests that agree on every non-batch dim run as one batch, as in the C++ backend
            by_shape = {}
            for i, f in feeds:
                key = tuple((n, a.shape[1:]) for n, a in sorted(f.items()))
                by_shape.setdefault(key, []).append((i, f))
            groups = list(by_shape.values())
        else:
            groups = [[x] for x in feeds]
        for group in groups:
            try:
                if len(group) == 1:
                    i, f = group[0]
                    responses[i] = self._response(self.sess.run(self.out_names, f))
                    continue
                sizes = [next(iter(f.values())).shape[0] for _, f in group]
                joined = {n: np.concatenate([f[n] for _, f in group]) for n in group[0][1]}
                outs = self.sess.run(self.out_names, joined)
                bounds = np.cumsum(sizes)[:-1]
                parts = [np.split(o, bounds) for o in outs]
                for k, (i, _) in enumerate(group):
                    responses[i] = self._response([p[k] for p in parts])
            except Exception as exc:
                for i, _ in group:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        return responses

    def finalize(self):
        self.sess = None
