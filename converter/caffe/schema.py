"""The subset of Caffe's protobuf schema that retool reads, built at runtime.

The descriptor lives in a private pool under a unique file name and package, so
it can never clash with another ``caffe.proto`` loaded in the same process, and it
needs no generated code: it works with protobuf 4 to 7 and whichever backend
(upb/C++/Python) is installed. Field numbers follow BVLC's caffe.proto and the
SSD fork (Permute/Normalize/PriorBox/DetectionOutput) so real files parse.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

FILE_NAME = "retool/caffe_subset_v1.proto"
PACKAGE = "retool_caffe"

# (field name, number, type, label, default). label: o optional, r repeated, p repeated packed.
# A type starting with "." is a message or enum of this package.
_ENUMS = {
    "Phase": [("TRAIN", 0), ("TEST", 1)],
    "PoolMethod": [("MAX", 0), ("AVE", 1), ("STOCHASTIC", 2)],
    "RoundMode": [("CEIL", 0), ("FLOOR", 1)],
    "EltwiseOp": [("PROD", 0), ("SUM", 1), ("MAX", 2)],
    "NormRegion": [("ACROSS_CHANNELS", 0), ("WITHIN_CHANNEL", 1)],
    "Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "CodeType": [("CORNER", 1), ("CENTER_SIZE", 2), ("CORNER_SIZE", 3)],
    "V1LayerType": [
        ("NONE", 0), ("ABSVAL", 35), ("ACCURACY", 1), ("ARGMAX", 30), ("BNLL", 2), ("CONCAT", 3),
        ("CONTRASTIVE_LOSS", 37), ("CONVOLUTION", 4), ("DATA", 5), ("DECONVOLUTION", 39), ("DROPOUT", 6),
        ("DUMMY_DATA", 32), ("EUCLIDEAN_LOSS", 7), ("ELTWISE", 25), ("EXP", 38), ("FLATTEN", 8),
        ("HDF5_DATA", 9), ("HDF5_OUTPUT", 10), ("HINGE_LOSS", 28), ("IM2COL", 11), ("IMAGE_DATA", 12),
        ("INFOGAIN_LOSS", 13), ("INNER_PRODUCT", 14), ("LRN", 15), ("MEMORY_DATA", 29),
        ("MULTINOMIAL_LOGISTIC_LOSS", 16), ("MVN", 34), ("POOLING", 17), ("POWER", 26), ("RELU", 18),
        ("SIGMOID", 19), ("SIGMOID_CROSS_ENTROPY_LOSS", 27), ("SILENCE", 36), ("SOFTMAX", 20),
        ("SOFTMAX_LOSS", 21), ("SPLIT", 22), ("SLICE", 33), ("TANH", 23), ("WINDOW_DATA", 24),
        ("THRESHOLD", 31)],
}

# Enum value names must be unique within a package, so enums that reuse names
# (MAX in PoolMethod and EltwiseOp, DEFAULT in every Engine) are nested in the
# message that uses them, as in caffe.proto.
_NESTED_ENUMS = {
    "PoolingParameter": ["PoolMethod", "RoundMode", "Engine"],
    "EltwiseParameter": ["EltwiseOp"],
    "LRNParameter": ["NormRegion", "Engine"],
    "V1LayerParameter": ["V1LayerType"],
    "ConvolutionParameter": ["Engine"],
    "ReLUParameter": ["Engine"],
    "SigmoidParameter": ["Engine"],
    "TanHParameter": ["Engine"],
    "SoftmaxParameter": ["Engine"],
    "PriorBoxParameter": ["CodeType"],
}

_MESSAGES = {
    "BlobShape": [("dim", 1, "int64", "p", None)],
    "BlobProto": [
        ("shape", 7, ".BlobShape", "o", None), ("data", 5, "float", "p", None), ("diff", 6, "float", "p", None),
        ("double_data", 8, "double", "p", None), ("double_diff", 9, "double", "p", None),
        ("num", 1, "int32", "o", "0"), ("channels", 2, "int32", "o", "0"),
        ("height", 3, "int32", "o", "0"), ("width", 4, "int32", "o", "0")],
    "NetStateRule": [
        ("phase", 1, ".Phase", "o", None), ("min_level", 2, "int32", "o", None),
        ("max_level", 3, "int32", "o", None), ("stage", 4, "string", "r", None),
        ("not_stage", 5, "string", "r", None)],
    "FillerParameter": [("type", 1, "string", "o", "constant"), ("value", 2, "float", "o", "0")],
    "NetParameter": [
        ("name", 1, "string", "o", None), ("input", 3, "string", "r", None),
        ("input_shape", 8, ".BlobShape", "r", None), ("input_dim", 4, "int32", "r", None),
        ("layer", 100, ".LayerParameter", "r", None), ("layers", 2, ".V1LayerParameter", "r", None)],
    "LayerParameter": [
        ("name", 1, "string", "o", None), ("type", 2, "string", "o", None),
        ("bottom", 3, "string", "r", None), ("top", 4, "string", "r", None),
        ("phase", 10, ".Phase", "o", None), ("blobs", 7, ".BlobProto", "r", None),
        ("include", 8, ".NetStateRule", "r", None), ("exclude", 9, ".NetStateRule", "r", None),
        ("batch_norm_param", 139, ".BatchNormParameter", "o", None),
        ("bias_param", 141, ".BiasParameter", "o", None),
        ("concat_param", 104, ".ConcatParameter", "o", None),
        ("convolution_param", 106, ".ConvolutionParameter", "o", None),
        ("crop_param", 144, ".CropParameter", "o", None),
        ("dropout_param", 108, ".DropoutParameter", "o", None),
        ("eltwise_param", 110, ".EltwiseParameter", "o", None),
        ("elu_param", 140, ".ELUParameter", "o", None),
        ("exp_param", 111, ".ExpParameter", "o", None),
        ("flatten_param", 135, ".FlattenParameter", "o", None),
        ("inner_product_param", 117, ".InnerProductParameter", "o", None),
        ("input_param", 143, ".InputParameter", "o", None),
        ("log_param", 134, ".LogParameter", "o", None),
        ("lrn_param", 118, ".LRNParameter", "o", None),
        ("pooling_param", 121, ".PoolingParameter", "o", None),
        ("power_param", 122, ".PowerParameter", "o", None),
        ("prelu_param", 131, ".PReLUParameter", "o", None),
        ("relu_param", 123, ".ReLUParameter", "o", None),
        ("reshape_param", 133, ".ReshapeParameter", "o", None),
        ("scale_param", 142, ".ScaleParameter", "o", None),
        ("sigmoid_param", 124, ".SigmoidParameter", "o", None),
        ("softmax_param", 125, ".SoftmaxParameter", "o", None),
        ("slice_param", 126, ".SliceParameter", "o", None),
        ("tanh_param", 127, ".TanHParameter", "o", None),
        ("threshold_param", 128, ".ThresholdParameter", "o", None),
        # SSD fork
        ("permute_param", 202, ".PermuteParameter", "o", None),
        ("prior_box_param", 203, ".PriorBoxParameter", "o", None),
        ("norm_param", 206, ".NormalizeParameter", "o", None),
        ("detection_output_param", 204, ".DetectionOutputParameter", "o", None)],
    "V1LayerParameter": [
        ("bottom", 2, "string", "r", None), ("top", 3, "string", "r", None), ("name", 4, "string", "o", None),
        ("include", 32, ".NetStateRule", "r", None), ("exclude", 33, ".NetStateRule", "r", None),
        ("type", 5, ".V1LayerParameter.V1LayerType", "o", None), ("blobs", 6, ".BlobProto", "r", None),
        ("concat_param", 9, ".ConcatParameter", "o", None),
        ("convolution_param", 10, ".ConvolutionParameter", "o", None),
        ("dropout_param", 12, ".DropoutParameter", "o", None),
        ("eltwise_param", 24, ".EltwiseParameter", "o", None),
        ("exp_param", 41, ".ExpParameter", "o", None),
        ("inner_product_param", 17, ".InnerProductParameter", "o", None),
        ("lrn_param", 18, ".LRNParameter", "o", None),
        ("pooling_param", 19, ".PoolingParameter", "o", None),
        ("power_param", 21, ".PowerParameter", "o", None),
        ("relu_param", 30, ".ReLUParameter", "o", None),
        ("sigmoid_param", 38, ".SigmoidParameter", "o", None),
        ("softmax_param", 39, ".SoftmaxParameter", "o", None),
        ("slice_param", 31, ".SliceParameter", "o", None),
        ("tanh_param", 37, ".TanHParameter", "o", None),
        ("threshold_param", 25, ".ThresholdParameter", "o", None)],
    "BatchNormParameter": [("use_global_stats", 1, "bool", "o", None),
                           ("moving_average_fraction", 2, "float", "o", "0.999"), ("eps", 3, "float", "o", "1e-05")],
    "BiasParameter": [("axis", 1, "int32", "o", "1"), ("num_axes", 2, "int32", "o", "1"),
                      ("filler", 3, ".FillerParameter", "o", None)],
    "ConcatParameter": [("axis", 2, "int32", "o", "1"), ("concat_dim", 1, "uint32", "o", "1")],
    "ConvolutionParameter": [
        ("num_output", 1, "uint32", "o", None), ("bias_term", 2, "bool", "o", "true"),
        ("pad", 3, "uint32", "r", None), ("kernel_size", 4, "uint32", "r", None),
        ("stride", 6, "uint32", "r", None), ("dilation", 18, "uint32", "r", None),
        ("pad_h", 9, "uint32", "o", "0"), ("pad_w", 10, "uint32", "o", "0"),
        ("kernel_h", 11, "uint32", "o", None), ("kernel_w", 12, "uint32", "o", None),
        ("stride_h", 13, "uint32", "o", None), ("stride_w", 14, "uint32", "o", None),
        ("group", 5, "uint32", "o", "1"),
        ("weight_filler", 7, ".FillerParameter", "o", None), ("bias_filler", 8, ".FillerParameter", "o", None),
        ("engine", 15, ".ConvolutionParameter.Engine", "o", "DEFAULT"),
        ("axis", 16, "int32", "o", "1"), ("force_nd_im2col", 17, "bool", "o", "false")],
    "CropParameter": [("axis", 1, "int32", "o", "2"), ("offset", 2, "uint32", "r", None)],
    "DropoutParameter": [("dropout_ratio", 1, "float", "o", "0.5")],
    "EltwiseParameter": [("operation", 1, ".EltwiseParameter.EltwiseOp", "o", "SUM"),
                         ("coeff", 2, "float", "r", None), ("stable_prod_grad", 3, "bool", "o", "true")],
    "ELUParameter": [("alpha", 1, "float", "o", "1")],
    "ExpParameter": [("base", 1, "float", "o", "-1"), ("scale", 2, "float", "o", "1"),
                     ("shift", 3, "float", "o", "0")],
    "FlattenParameter": [("axis", 1, "int32", "o", "1"), ("end_axis", 2, "int32", "o", "-1")],
    "InnerProductParameter": [
        ("num_output", 1, "uint32", "o", None), ("bias_term", 2, "bool", "o", "true"),
        ("weight_filler", 3, ".FillerParameter", "o", None), ("bias_filler", 4, ".FillerParameter", "o", None),
        ("axis", 5, "int32", "o", "1"), ("transpose", 6, "bool", "o", "false")],
    "InputParameter": [("shape", 1, ".BlobShape", "r", None)],
    "LogParameter": [("base", 1, "float", "o", "-1"), ("scale", 2, "float", "o", "1"),
                     ("shift", 3, "float", "o", "0")],
    "LRNParameter": [
        ("local_size", 1, "uint32", "o", "5"), ("alpha", 2, "float", "o", "1"), ("beta", 3, "float", "o", "0.75"),
        ("norm_region", 4, ".LRNParameter.NormRegion", "o", "ACROSS_CHANNELS"), ("k", 5, "float", "o", "1"),
        ("engine", 6, ".LRNParameter.Engine", "o", "DEFAULT")],
    "PoolingParameter": [
        ("pool", 1, ".PoolingParameter.PoolMethod", "o", "MAX"), ("pad", 4, "uint32", "o", "0"),
        ("pad_h", 9, "uint32", "o", "0"), ("pad_w", 10, "uint32", "o", "0"),
        ("kernel_size", 2, "uint32", "o", None), ("kernel_h", 5, "uint32", "o", None),
        ("kernel_w", 6, "uint32", "o", None), ("stride", 3, "uint32", "o", "1"),
        ("stride_h", 7, "uint32", "o", None), ("stride_w", 8, "uint32", "o", None),
        ("engine", 11, ".PoolingParameter.Engine", "o", "DEFAULT"),
        ("global_pooling", 12, "bool", "o", "false"),
        ("round_mode", 13, ".PoolingParameter.RoundMode", "o", "CEIL")],
    "PowerParameter": [("power", 1, "float", "o", "1"), ("scale", 2, "float", "o", "1"),
                       ("shift", 3, "float", "o", "0")],
    "PReLUParameter": [("filler", 1, ".FillerParameter", "o", None), ("channel_shared", 2, "bool", "o", "false")],
    "ReLUParameter": [("negative_slope", 1, "float", "o", "0"),
                      ("engine", 2, ".ReLUParameter.Engine", "o", "DEFAULT")],
    "ReshapeParameter": [("shape", 1, ".BlobShape", "o", None), ("axis", 2, "int32", "o", "0"),
                         ("num_axes", 3, "int32", "o", "-1")],
    "ScaleParameter": [
        ("axis", 1, "int32", "o", "1"), ("num_axes", 2, "int32", "o", "1"),
        ("filler", 3, ".FillerParameter", "o", None), ("bias_term", 4, "bool", "o", "false"),
        ("bias_filler", 5, ".FillerParameter", "o", None)],
    "SigmoidParameter": [("engine", 1, ".SigmoidParameter.Engine", "o", "DEFAULT")],
    "SoftmaxParameter": [("engine", 1, ".SoftmaxParameter.Engine", "o", "DEFAULT"), ("axis", 2, "int32", "o", "1")],
    "SliceParameter": [("axis", 3, "int32", "o", "1"), ("slice_point", 2, "uint32", "r", None),
                       ("slice_dim", 1, "uint32", "o", "1")],
    "TanHParameter": [("engine", 1, ".TanHParameter.Engine", "o", "DEFAULT")],
    "ThresholdParameter": [("threshold", 1, "float", "o", "0")],
    "PermuteParameter": [("order", 1, "uint32", "r", None)],
    "NonMaximumSuppressionParameter": [("nms_threshold", 1, "float", "o", "0.3"), ("top_k", 2, "int32", "o", None),
                                       ("eta", 3, "float", "o", "1")],
    "DetectionOutputParameter": [
        ("num_classes", 1, "uint32", "o", None), ("share_location", 2, "bool", "o", "true"),
        ("background_label_id", 3, "int32", "o", "0"),
        ("nms_param", 4, ".NonMaximumSuppressionParameter", "o", None),
        ("code_type", 6, ".PriorBoxParameter.CodeType", "o", "CORNER"),
        ("variance_encoded_in_target", 8, "bool", "o", "false"), ("keep_top_k", 7, "int32", "o", "-1"),
        ("confidence_threshold", 9, "float", "o", None)],
    "NormalizeParameter": [
        ("across_spatial", 1, "bool", "o", "true"), ("scale_filler", 2, ".FillerParameter", "o", None),
        ("channel_shared", 3, "bool", "o", "true"), ("eps", 4, "float", "o", "1e-10")],
    "PriorBoxParameter": [
        ("min_size", 1, "float", "r", None), ("max_size", 2, "float", "r", None),
        ("aspect_ratio", 3, "float", "r", None), ("flip", 4, "bool", "o", "true"),
        ("clip", 5, "bool", "o", "false"), ("variance", 6, "float", "r", None),
        ("img_size", 7, "uint32", "o", None), ("img_h", 8, "uint32", "o", None), ("img_w", 9, "uint32", "o", None),
        ("step", 10, "float", "o", None), ("step_h", 11, "float", "o", None), ("step_w", 12, "float", "o", None),
        ("offset", 13, "float", "o", "0.5")],
}


def _file_descriptor():
    from google.protobuf import descriptor_pb2 as d

    T = d.FieldDescriptorProto
    scalar = {"int32": T.TYPE_INT32, "int64": T.TYPE_INT64, "uint32": T.TYPE_UINT32, "float": T.TYPE_FLOAT,
              "double": T.TYPE_DOUBLE, "bool": T.TYPE_BOOL, "string": T.TYPE_STRING, "bytes": T.TYPE_BYTES}
    enum_names = set(_ENUMS)
    fdp = d.FileDescriptorProto(name=FILE_NAME, package=PACKAGE, syntax="proto2")

    def add_enum(container, name):
        e = container.enum_type.add(name=name)
        for value_name, number in _ENUMS[name]:
            e.value.add(name=value_name, number=number)

    nested = {e for names in _NESTED_ENUMS.values() for e in names}
    for name in _ENUMS:
        if name not in nested:
            add_enum(fdp, name)
    for msg_name, fields in _MESSAGES.items():
        m = fdp.message_type.add(name=msg_name)
        for e in _NESTED_ENUMS.get(msg_name, ()):
            add_enum(m, e)
        for fname, number, ftype, label, default in fields:
            f = m.field.add(name=fname, number=number)
            f.label = T.LABEL_OPTIONAL if label == "o" else T.LABEL_REPEATED
            if label == "p":
                f.options.packed = True
            if ftype in scalar:
                f.type = scalar[ftype]
            else:
                f.type_name = f".{PACKAGE}{ftype}"
                f.type = T.TYPE_ENUM if ftype.rsplit(".", 1)[-1] in enum_names else T.TYPE_MESSAGE
            if default is not None:
                f.default_value = default
    return fdp


@functools.lru_cache(maxsize=1)
def messages() -> SimpleNamespace:
    """The message classes, e.g. ``messages().NetParameter``; built once per process."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor())
    try:
        from google.protobuf.message_factory import GetMessageClass
    except ImportError:  # protobuf < 4.21 lacks it; kept for clarity, pyproject pins >= 4.21
        from google.protobuf import message_factory

        factory = message_factory.MessageFactory(pool)
        GetMessageClass = lambda desc: factory.GetPrototype(desc)  # noqa: E731
    return SimpleNamespace(**{name: GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
                              for name in _MESSAGES})
