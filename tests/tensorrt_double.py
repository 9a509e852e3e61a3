"""A recorder of the TensorRT (>= 10) Python API calls segrt makes. It is NOT TensorRT and computes nothing.

:func:`install` puts a fresh fake ``tensorrt`` module into ``sys.modules`` (through pytest's monkeypatch, so it
is removed after the test) and returns its :class:`Recorder`. The module offers the part of TensorRT 10's
documented Python API that segrt calls (docs.nvidia.com/deeplearning/tensorrt, Python API: Logger, Builder,
INetworkDefinition / ILayer / ITensor, OnnxParser + OnnxParserFlag, IBuilderConfig, IOptimizationProfile,
ITimingCache, Runtime, ICudaEngine) and nothing else, so a call outside that surface fails with an
AttributeError. Every call is appended to :attr:`Recorder.calls`; each ``build_serialized_network`` appends a
snapshot of what the network and the config held at that moment to :attr:`Recorder.builds`.

What the recorder makes up, and the tests therefore never assert as a result:

* the parsed network: one layer per ONNX node, named after the node, its output data types read from ONNX
  shape inference (``Constant`` nodes become weights, no layer); ``InstanceNormalization`` is a
  ``LayerType.NORMALIZATION`` layer only when ``OnnxParserFlag.NATIVE_INSTANCENORM`` was set before parsing
  (the flag's documented meaning), else a ``PLUGIN_V2`` layer. A test may instead hand it the layers it
  wants (``layers=``) to exercise segrt's selection of layers to pin;
* a "plan": a JSON record of the build request (IO tensor names, the optimisation profile), prefixed by a
  marker. ``Runtime.deserialize_cuda_engine`` plays that record back as an ``ICudaEngine`` (IO tensors and
  ``get_tensor_profile_shape``) and returns None for any other bytes (as TensorRT does for a foreign or
  corrupt plan). Nothing is compiled, nothing executes: the execution context records only its creation;
* a timing cache: opaque bytes (what was loaded plus ``b"|build"`` per build), to follow how segrt loads
  and writes it back.

So the tests built on it check segrt's side only: which flags, precision constraints, profile, timing cache
and files segrt asks for, how it reads the plan's IO tensors and profile back, and its refusals and messages.

NOT VERIFIED HERE (there is no TensorRT and no GPU on segrt's test machines; ``test_gpu_real_tensorrt`` in
tests/test_backends.py covers these on a machine with both, and is skipped elsewhere):

* that real TensorRT accepts these calls: the API surface above is copied from the documentation by hand;
* that TensorRT's ONNX parser names layers after ONNX nodes (``NODE``, then ``NODE_1``, ``NODE_2`` ... for
  extra layers) - segrt's pinning of normalisation regions by name rests on it;
* that a built plan honours the fp32 pins, and its accuracy: the export gate of the plan
  (``gate["tensorrt"]``) runs only on a GPU;
* deserialising a real plan, and the enqueue path of ``TensorRTBackend.infer_torch`` (``set_input_shape``,
  ``set_tensor_address``, ``execute_async_v3`` on CUDA memory and torch's stream);
* that a timing cache written by one build is accepted by the next one.
"""

from __future__ import annotations

import enum
import json
import sys
import types

_PLAN_MAGIC = b"SEGRT-TENSORRT-RECORDER-PLAN\n"


# ---------------------------------------------------------------------------------------------
# enums (names as in TensorRT 10's Python API)
# ---------------------------------------------------------------------------------------------

class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 10


class LayerType(enum.Enum):
    CONVOLUTION = 0
    ACTIVATION = 2
    SCALE = 4
    DECONVOLUTION = 5
    CONCATENATION = 6
    ELEMENTWISE = 7
    UNARY = 9
    SHUFFLE = 13
    REDUCE = 14
    IDENTITY = 17
    CONSTANT = 18
    PLUGIN_V2 = 19
    PARAMETRIC_RELU = 20
    RESIZE = 21
    SHAPE = 23
    NORMALIZATION = 40
    CAST = 41


class BuilderFlag(enum.Enum):
    FP16 = 0
    INT8 = 1
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 4
    DISABLE_TIMING_CACHE = 5
    TF32 = 6
    SPARSE_WEIGHTS = 7
    SAFETY_SCOPE = 8
    OBEY_PRECISION_CONSTRAINTS = 9
    PREFER_PRECISION_CONSTRAINTS = 10
    DIRECT_IO = 11
    REJECT_EMPTY_ALGORITHMS = 12
    BF16 = 17
    STRIP_PLAN = 19


class NetworkDefinitionCreationFlag(enum.Enum):
    EXPLICIT_BATCH = 0  # deprecated and ignored in TensorRT 10
    STRONGLY_TYPED = 1


class OnnxParserFlag(enum.Enum):
    NATIVE_INSTANCENORM = 0


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class _Severity(enum.Enum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


# layer types of the ONNX ops the test models use; any other op stops the test (NotImplementedError)
_LAYER_OF_OP = {
    "Conv": LayerType.CONVOLUTION, "ConvTranspose": LayerType.DECONVOLUTION, "Relu": LayerType.ACTIVATION,
    "PRelu": LayerType.PARAMETRIC_RELU, "Add": LayerType.ELEMENTWISE, "Mul": LayerType.ELEMENTWISE,
    "Sub": LayerType.ELEMENTWISE, "Div": LayerType.ELEMENTWISE, "Pow": LayerType.ELEMENTWISE,
    "Reshape": LayerType.SHUFFLE, "Transpose": LayerType.SHUFFLE, "Flatten": LayerType.SHUFFLE,
    "Squeeze": LayerType.SHUFFLE, "Unsqueeze": LayerType.SHUFFLE, "Concat": LayerType.CONCATENATION,
    "Resize": LayerType.RESIZE, "Shape": LayerType.SHAPE, "Identity": LayerType.IDENTITY,
    "LayerNormalization": LayerType.NORMALIZATION, "GroupNormalization": LayerType.NORMALIZATION,
    "BatchNormalization": LayerType.SCALE, "ReduceMean": LayerType.REDUCE, "Sqrt": LayerType.UNARY,
    "Reciprocal": LayerType.UNARY, "Cast": LayerType.CAST,
}

_DTYPE_OF_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32,
                  7: DataType.INT64, 9: DataType.BOOL}


# ---------------------------------------------------------------------------------------------
# the recorder and the fake module
# ---------------------------------------------------------------------------------------------

class Recorder:
    """What segrt asked of the fake ``tensorrt`` module.

    ``calls``: every call, in order, as tuples ``(what, *args)``; ``builds``: one dict per
    ``build_serialized_network`` (see :meth:`_Builder.build_serialized_network`); ``plans``: the bytes each
    build returned; ``timing_cache_written``: the bytes each ``ITimingCache.serialize`` returned;
    ``parsed_models``: the bytes of each ONNX file the parser was pointed at.
    """

    def __init__(self, version: str, layers, parse_errors, build_fails: bool):
        self.version = version
        self.layers = layers
        self.parse_errors = list(parse_errors)
        self.build_fails = build_fails
        self.calls: list[tuple] = []
        self.builds: list[dict] = []
        self.plans: list[bytes] = []
        self.timing_cache_written: list[bytes] = []
        self.parsed_models: list[bytes] = []
        self.module = _make_module(self)

    def log(self, *call) -> None:
        self.calls.append(call)

    def called(self, what: str) -> list[tuple]:
        """The arguments of every call named ``what``."""
        return [c[1:] for c in self.calls if c[0] == what]

    def index(self, what: str) -> int:
        """Position of the first call named ``what`` in :attr:`calls` (ValueError if never called)."""
        return next(i for i, c in enumerate(self.calls) if c[0] == what)


def install(monkeypatch, version: str = "10.3.0", *, layers=None, parse_errors=(), build_fails: bool = False
            ) -> Recorder:
    """Put a fresh fake ``tensorrt`` module in ``sys.modules`` for this test; return its recorder.

    ``layers``: ``[(name, LayerType name, [output DataType names])]`` replaces the layers parsed from the
    ONNX file; ``parse_errors``: the parser fails with these messages; ``build_fails``: the build returns None.
    """
    rec = Recorder(version, layers, parse_errors, build_fails)
    monkeypatch.setitem(sys.modules, "tensorrt", rec.module)
    return rec


def is_recorder(module) -> bool:
    return getattr(module, "__segrt_recorder__", None) is not None


def _make_module(rec: Recorder) -> types.ModuleType:
    m = types.ModuleType("tensorrt", "segrt's recorder of TensorRT API calls (tests/tensorrt_double.py)")
    m.__version__ = rec.version
    m.__segrt_recorder__ = rec
    for e in (DataType, LayerType, BuilderFlag, NetworkDefinitionCreationFlag, OnnxParserFlag, MemoryPoolType,
              TensorIOMode):
        setattr(m, e.__name__, e)
    m.float32, m.float16, m.int8, m.int32, m.int64, m.bool = (
        DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.INT64, DataType.BOOL)
    m.Logger = type("Logger", (_Logger,), {"Severity": _Severity, **{s.name: s for s in _Severity}})
    m.Builder = type("Builder", (_Builder,), {"_rec": rec})
    m.OnnxParser = type("OnnxParser", (_OnnxParser,), {"_rec": rec})
    m.Runtime = type("Runtime", (_Runtime,), {"_rec": rec})
    return m


class _Logger:
    def __init__(self, min_severity=_Severity.WARNING):
        if not isinstance(min_severity, _Severity):
            raise TypeError(f"Logger(min_severity: Logger.Severity), got {min_severity!r}")
        self.min_severity = min_severity


# ---------------------------------------------------------------------------------------------
# network and parser
# ---------------------------------------------------------------------------------------------

class ITensor:
    def __init__(self, name: str, dtype: DataType, shape=()):
        self.name = name
        self.dtype = dtype
        self.shape = tuple(shape)


class ILayer:
    def __init__(self, rec: Recorder, name: str, type_: LayerType, outputs: list[ITensor]):
        self._rec = rec
        self.name = name
        self.type = type_
        self._outputs = outputs
        self._precision: DataType | None = None
        self.output_types: dict[int, DataType] = {}

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]

    @property
    def precision(self) -> DataType:
        return DataType.FLOAT if self._precision is None else self._precision

    @precision.setter
    def precision(self, dt) -> None:
        if not isinstance(dt, DataType):
            raise TypeError(f"ILayer.precision takes a tensorrt.DataType, got {dt!r}")
        self._precision = dt
        self._rec.log("layer.precision", self.name, dt)

    @property
    def precision_is_set(self) -> bool:
        return self._precision is not None

    def set_output_type(self, index: int, dtype) -> None:
        if not isinstance(dtype, DataType):
            raise TypeError(f"ILayer.set_output_type takes a tensorrt.DataType, got {dtype!r}")
        if not 0 <= index < len(self._outputs):
            raise IndexError(f"layer {self.name!r} has {len(self._outputs)} outputs, got index {index}")
        self.output_types[index] = dtype
        self._rec.log("layer.set_output_type", self.name, index, dtype)


class INetworkDefinition:
    def __init__(self, rec: Recorder, flags: int):
        self._rec = rec
        self.flags = flags
        self.layers: list[ILayer] = []
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, index: int) -> ILayer:
        return self.layers[index]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> ITensor:
        return self.inputs[index]

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_output(self, index: int) -> ITensor:
        return self.outputs[index]


class _ParserError:
    def __init__(self, desc: str):
        self._desc = desc

    def desc(self) -> str:
        return self._desc

    def __str__(self) -> str:
        return self._desc


class _OnnxParser:
    _rec: Recorder

    def __init__(self, network, logger):
        if not isinstance(network, INetworkDefinition) or not isinstance(logger, _Logger):
            raise TypeError("OnnxParser(network: INetworkDefinition, logger: ILogger)")
        self.network = network
        self.flags: set = set()
        self._errors: list[_ParserError] = []

    def set_flag(self, flag) -> None:
        if not isinstance(flag, OnnxParserFlag):
            raise TypeError(f"OnnxParser.set_flag takes an OnnxParserFlag, got {flag!r}")
        self.flags.add(flag)
        self._rec.log("parser.set_flag", flag)

    def get_flag(self, flag) -> bool:
        return flag in self.flags

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> _ParserError:
        return self._errors[index]

    def parse_from_file(self, model: str) -> bool:
        import onnx

        if not isinstance(model, str):
            raise TypeError(f"OnnxParser.parse_from_file takes a str path, got {type(model).__name__}")
        rec = self._rec
        rec.log("parser.parse_from_file", model, frozenset(self.flags))
        if rec.parse_errors:
            self._errors = [_ParserError(e) for e in rec.parse_errors]
            return False
        with open(model, "rb") as f:
            rec.parsed_models.append(f.read())
        proto = onnx.load_from_string(rec.parsed_models[-1])
        net = self.network
        inits = {i.name for i in proto.graph.initializer}

        def dims(vi):
            return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)

        net.inputs = [ITensor(i.name, _DTYPE_OF_ONNX[i.type.tensor_type.elem_type], dims(i))
                      for i in proto.graph.input if i.name not in inits]
        net.outputs = [ITensor(o.name, _DTYPE_OF_ONNX[o.type.tensor_type.elem_type], dims(o))
                       for o in proto.graph.output]
        if rec.layers is not None:
            net.layers = [ILayer(rec, name, LayerType[t], [ITensor(f"{name}:{j}", DataType[d])
                                                           for j, d in enumerate(outs)])
                          for name, t, outs in rec.layers]
            return True
        inferred = onnx.shape_inference.infer_shapes(proto)
        elem = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input,
                                                               *inferred.graph.output)}
        for node in proto.graph.node:
            if node.op_type == "Constant":
                continue
            if node.op_type == "InstanceNormalization":
                t = (LayerType.NORMALIZATION if OnnxParserFlag.NATIVE_INSTANCENORM in self.flags
                     else LayerType.PLUGIN_V2)
            elif node.op_type in _LAYER_OF_OP:
                t = _LAYER_OF_OP[node.op_type]
            else:
                raise NotImplementedError(f"the TensorRT recorder has no layer type for ONNX op {node.op_type}")
            outs = [ITensor(o, _DTYPE_OF_ONNX[elem[o]]) for o in node.output]
            net.layers.append(ILayer(rec, node.name, t, outs))
        return True


# ---------------------------------------------------------------------------------------------
# builder and config
# ---------------------------------------------------------------------------------------------

class IOptimizationProfile:
    def __init__(self, rec: Recorder):
        self._rec = rec
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input, min, opt, max) -> None:  # noqa: A002 - TensorRT's parameter names
        shapes = tuple(tuple(int(d) for d in s) for s in (min, opt, max))
        self.shapes[input] = shapes
        self._rec.log("profile.set_shape", input, *shapes)

    def get_shape(self, input):  # noqa: A002
        return [list(s) for s in self.shapes[input]]


class ITimingCache:
    def __init__(self, rec: Recorder, data: bytes):
        self._rec = rec
        self.data = data
        self.builds = 0

    def serialize(self) -> bytes:
        out = self.data + b"|build" * self.builds
        self._rec.timing_cache_written.append(out)
        self._rec.log("timing_cache.serialize", out)
        return out


class IBuilderConfig:
    def __init__(self, rec: Recorder):
        self._rec = rec
        self.flags: set = set()
        self.memory_pool_limits: dict = {}
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None
        self.timing_cache_ignore_mismatch: bool | None = None

    def set_flag(self, flag) -> None:
        if not isinstance(flag, BuilderFlag):
            raise TypeError(f"IBuilderConfig.set_flag takes a BuilderFlag, got {flag!r}")
        self.flags.add(flag)
        self._rec.log("config.set_flag", flag)

    def get_flag(self, flag) -> bool:
        return flag in self.flags

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)
        self._rec.log("config.clear_flag", flag)

    def set_memory_pool_limit(self, pool, pool_size) -> None:
        if not isinstance(pool, MemoryPoolType):
            raise TypeError(f"set_memory_pool_limit takes a MemoryPoolType, got {pool!r}")
        self.memory_pool_limits[pool] = int(pool_size)
        self._rec.log("config.set_memory_pool_limit", pool, int(pool_size))

    def add_optimization_profile(self, profile) -> int:
        if not isinstance(profile, IOptimizationProfile):
            raise TypeError("add_optimization_profile takes an IOptimizationProfile")
        self.profiles.append(profile)
        self._rec.log("config.add_optimization_profile", dict(profile.shapes))
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache) -> ITimingCache:
        data = bytes(serialized_timing_cache)
        self._rec.log("config.create_timing_cache", data)
        return ITimingCache(self._rec, data)

    def set_timing_cache(self, cache, ignore_mismatch) -> bool:
        if not isinstance(cache, ITimingCache):
            raise TypeError("set_timing_cache takes an ITimingCache")
        self.timing_cache = cache
        self.timing_cache_ignore_mismatch = bool(ignore_mismatch)
        self._rec.log("config.set_timing_cache", cache.data, bool(ignore_mismatch))
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.timing_cache


class _Builder:
    _rec: Recorder

    def __init__(self, logger):
        if not isinstance(logger, _Logger):
            raise TypeError("Builder(logger: ILogger)")

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        self._rec.log("builder.create_network", flags)
        return INetworkDefinition(self._rec, flags)

    def create_builder_config(self) -> IBuilderConfig:
        self._rec.log("builder.create_builder_config")
        return IBuilderConfig(self._rec)

    def create_optimization_profile(self) -> IOptimizationProfile:
        self._rec.log("builder.create_optimization_profile")
        return IOptimizationProfile(self._rec)

    def build_serialized_network(self, network, config):
        """Record what the network and config hold now; return a plan record (or None if ``build_fails``)."""
        rec = self._rec
        rec.log("builder.build_serialized_network")
        rec.builds.append({
            "network_flags": network.flags,
            "config_flags": {f.name for f in config.flags},
            "memory_pool_limits": {p.name: v for p, v in config.memory_pool_limits.items()},
            "profiles": [dict(p.shapes) for p in config.profiles],
            "timing_cache": None if config.timing_cache is None else {
                "loaded": config.timing_cache.data, "ignore_mismatch": config.timing_cache_ignore_mismatch},
            "precision": {ly.name: ly.precision for ly in network.layers if ly.precision_is_set},
            "output_types": {ly.name: dict(ly.output_types) for ly in network.layers if ly.output_types},
            "layers": {ly.name: (ly.type, [ly.get_output(j).dtype for j in range(ly.num_outputs)])
                       for ly in network.layers},
        })
        if rec.build_fails:
            return None
        if config.timing_cache is not None:
            config.timing_cache.builds += 1
        record = {
            "io": [[t.name, "INPUT", list(t.shape)] for t in network.inputs]
            + [[t.name, "OUTPUT", list(t.shape)] for t in network.outputs],
            "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in config.profiles],
        }
        plan = _PLAN_MAGIC + json.dumps(record).encode()
        rec.plans.append(plan)
        return plan


# ---------------------------------------------------------------------------------------------
# runtime: plays a plan record back; executes nothing
# ---------------------------------------------------------------------------------------------

class _Runtime:
    _rec: Recorder

    def __init__(self, logger):
        if not isinstance(logger, _Logger):
            raise TypeError("Runtime(logger: ILogger)")

    def deserialize_cuda_engine(self, serialized_engine):
        data = bytes(serialized_engine)
        self._rec.log("runtime.deserialize_cuda_engine", data)
        if not data.startswith(_PLAN_MAGIC):
            return None
        return ICudaEngine(self._rec, json.loads(data[len(_PLAN_MAGIC):]))


class ICudaEngine:
    def __init__(self, rec: Recorder, record: dict):
        self._rec = rec
        self._io = [(name, TensorIOMode[mode], tuple(shape)) for name, mode, shape in record["io"]]
        self._profiles = record["profiles"]

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def get_tensor_name(self, index: int) -> str:
        return self._io[index][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return next((mode for n, mode, _ in self._io if n == name), TensorIOMode.NONE)

    def get_tensor_shape(self, name: str) -> tuple:
        return next(shape for n, _, shape in self._io if n == name)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list:
        self._rec.log("engine.get_tensor_profile_shape", name, profile_index)
        return [tuple(s) for s in self._profiles[profile_index][name]]

    def create_execution_context(self):
        self._rec.log("engine.create_execution_context")
        return _ExecutionContext()


class _ExecutionContext:
    """Created, never run: the enqueue path needs CUDA memory and a real plan (unverified here)."""
