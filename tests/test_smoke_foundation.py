def test_cnn_onnx_fixture_builds(cnn_onnx):
    import onnx

    m = onnx.load(str(cnn_onnx))
    assert m.graph.input[0].name == "x"
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
