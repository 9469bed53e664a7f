"""Caffe -> ONNX: our own reader of prototxt/caffemodel files, verified against OpenCV's dnn module."""
