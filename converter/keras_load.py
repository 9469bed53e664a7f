"""Load a large ``.keras`` file with one copy of its weights in memory, not three.

Keras 3.15 loading a 2.2 GB file peaked 700 MB above the loaded model: it reads all of
``model.weights.h5`` into a BytesIO when memory allows, fills every variable from its initializer
(a random kernel costs two temporaries), then ``assign``s the stored value through two more. Here,
only while retool loads a large file:
- the weights are read from disk one tensor at a time (Keras's own "not enough memory" path);
- the model is built inside a StatelessScope, which defers each variable's initializer;
- the first assign of a deferred variable creates it from the stored value, which TensorFlow
  adopts without a copy.
A variable that the file does not hold is initialized as Keras would. If any of the private
hooks is missing (another Keras), the plain load runs.
"""
from __future__ import annotations

import contextlib

#: Above this, a .keras file's weights take the lean path.
KERAS_STREAM_BYTES = 256 * 2**20


@contextlib.contextmanager
def lean_keras_load(flavor: str, weights_size: int, threshold: int | None = None):
    limit = KERAS_STREAM_BYTES if threshold is None else threshold
    hooks = _hooks() if flavor == "keras" and weights_size >= limit else None
    if hooks is None:
        yield
        return
    saving_lib, stateless_scope, variables, tf_variable = hooks
    original = (saving_lib.is_memory_sufficient, saving_lib._model_from_config, tf_variable._direct_assign)

    def model_from_config(*args, **kwargs):
        with stateless_scope.StatelessScope(initialize_variables=False):
            return original[1](*args, **kwargs)

    def direct_assign(self, value):
        if self._value is None:  # deferred above: the stored value becomes the variable
            self._initialize(value)
        else:
            original[2](self, value)

    saving_lib.is_memory_sufficient = lambda model: False
    saving_lib._model_from_config = model_from_config
    tf_variable._direct_assign = direct_assign
    try:
        yield
    finally:
        saving_lib.is_memory_sufficient, saving_lib._model_from_config, tf_variable._direct_assign = original
        _initialize_the_rest(variables)


def _hooks():
    try:
        from keras.src.backend.common import stateless_scope, variables
        from keras.src.backend.tensorflow.core import Variable
        from keras.src.saving import saving_lib
    except ImportError:
        return None
    needed = ((saving_lib, "is_memory_sufficient"), (saving_lib, "_model_from_config"),
              (Variable, "_direct_assign"), (Variable, "_initialize"), (stateless_scope, "StatelessScope"),
              (variables, "initialize_all_variables"))
    if not all(hasattr(obj, name) for obj, name in needed):
        return None
    return saving_lib, stateless_scope, variables, Variable


def _initialize_the_rest(variables) -> None:
    """Deferred variables the file did not fill (a seed generator's state) get their initializer;
    the ones it filled leave Keras's list of uninitialized variables."""
    from keras.src.backend.common import global_state

    pending = global_state.get_global_attribute("uninitialized_variables") or []
    global_state.set_global_attribute("uninitialized_variables", [v for v in pending if v._value is None])
    variables.initialize_all_variables()
